"""Prometheus metrics in TF Serving's names, rendered in the Prometheus text exposition format.

TF Serving exports its `/tensorflow/serving/...` metrics to Prometheus with '/' turned into ':'
(`:tensorflow:serving:request_count`), so dashboards written for it work here too. A few dozen
lines of thread-safe counters and histograms are all that is needed; no extra dependency.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence


def exponential_buckets(scale: float, growth: float, count: int) -> list[float]:
    """Upper bounds scale * growth**i for i < count (TensorFlow's Buckets::Exponential)."""
    return [scale * growth**i for i in range(count)]


def _escape(value: str) -> str:
    """A label value escaped for the exposition format."""
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    """'{a="x",b="y"}' (empty string when there are no labels)."""
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _number(value: float) -> str:
    """A sample value as Prometheus writes it."""
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


MAX_SERIES = 1000  # label sets kept per metric; the rest share one, so random model names cannot grow memory
OVERFLOW = "__overflow__"


class _Metric:
    """A named metric family with fixed label names (at most MAX_SERIES label sets, then one shared)."""

    kind = ""

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = ()):
        self.name, self.help, self.label_names = name, help_text, tuple(labels)
        self._lock = threading.Lock()
        self._cells: dict[tuple[str, ...], object] = {}

    def _key(self, labels: Sequence[str]) -> tuple[str, ...]:
        if len(labels) != len(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {tuple(labels)}")
        key = tuple(str(v) for v in labels)
        if key not in self._cells and len(self._cells) >= MAX_SERIES:
            return (OVERFLOW,) * len(key)
        return key

    def render(self) -> list[str]:
        """The # HELP / # TYPE header and one line per sample."""
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        with self._lock:
            cells = sorted(self._cells.items())
        for key, cell in cells:
            lines.extend(self._samples(key, cell))
        return lines


class Counter(_Metric):
    """A monotonically increasing count per label set."""

    kind = "counter"

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add `amount` to the cell for `labels`."""
        key = self._key(labels)
        with self._lock:
            self._cells[key] = self._cells.get(key, 0.0) + amount

    def value(self, *labels: str) -> float:
        """The current count for `labels` (0 when never incremented)."""
        with self._lock:
            return float(self._cells.get(self._key(labels), 0.0))

    def _samples(self, key, cell) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, key)} {_number(cell)}"]


class Histogram(_Metric):
    """Observations counted into cumulative buckets, with their sum and count, per label set."""

    kind = "histogram"

    def __init__(self, name: str, help_text: str, labels: Sequence[str] = (), buckets: Sequence[float] = ()):
        super().__init__(name, help_text, labels)
        self.bounds = sorted(float(b) for b in buckets)

    def observe(self, value: float, *labels: str) -> None:
        """Record one observation."""
        key = self._key(labels)
        with self._lock:
            counts, total = self._cells.get(key, ([0] * (len(self.bounds) + 1), 0.0))
            index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
            counts[index] += 1
            self._cells[key] = (counts, total + value)

    def _samples(self, key, cell) -> list[str]:
        counts, total = cell
        lines, running = [], 0
        for bound, count in zip([*self.bounds, math.inf], counts):
            running += count
            le = 'le="' + _number(bound) + '"'
            lines.append(f"{self.name}_bucket{_labels(self.label_names, key, le)} {running}")
        lines.append(f"{self.name}_sum{_labels(self.label_names, key)} {_number(total)}")
        lines.append(f"{self.name}_count{_labels(self.label_names, key)} {running}")
        return lines


class Gauge(_Metric):
    """A value that goes up and down per label set."""

    kind = "gauge"

    def set(self, value: float, *labels: str) -> None:
        """Set the cell for `labels`."""
        key = self._key(labels)
        with self._lock:
            self._cells[key] = float(value)

    def remove(self, *labels: str) -> None:
        """Forget the cell for `labels`."""
        with self._lock:
            self._cells.pop(self._key(labels), None)

    def _samples(self, key, cell) -> list[str]:
        return [f"{self.name}{_labels(self.label_names, key)} {_number(cell)}"]


LATENCY_BUCKETS = exponential_buckets(10, 1.8, 33)  # microseconds, TF Serving's request_latency buckets
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class ServingMetrics:
    """Every metric the server exports."""

    def __init__(self) -> None:
        self.request_count = Counter(
            ":tensorflow:serving:request_count", "The total number of requests.",
            ("model_name", "signature_name", "API", "entrypoint", "status"))
        self.request_latency = Histogram(
            ":tensorflow:serving:request_latency",
            "Distribution of wall time (in microseconds) for Tensorflow Serving request.",
            ("model_name", "API", "entrypoint"), LATENCY_BUCKETS)
        self.runtime_latency = Histogram(
            ":tensorflow:serving:runtime_latency",
            "Distribution of wall time (in microseconds) for Tensorflow runtime.",
            ("model_name", "API", "runtime"), LATENCY_BUCKETS)
        self.input_batch_size = Histogram(
            ":tensorflow:serving:batching_session:input_batch_size",
            "Rows per model call formed by the batcher, before padding.",
            ("model_name", "signature_name"), BATCH_BUCKETS)
        self.processed_batch_size = Histogram(
            ":tensorflow:serving:batching_session:processed_batch_size",
            "Rows per model call formed by the batcher, after padding to an allowed batch size.",
            ("model_name", "signature_name"), BATCH_BUCKETS)
        self.padding_size = Histogram(
            ":tensorflow:serving:batching_session:padding_size",
            "Padding rows added to reach an allowed batch size.", ("model_name", "signature_name"), BATCH_BUCKETS)
        self.tasks_per_batch = Histogram(
            ":tensorflow:serving:batching_session:tasks_per_batch",
            "Requests merged into one model call.", ("model_name", "signature_name"), BATCH_BUCKETS)
        self.queuing_latency = Histogram(
            ":tensorflow:serving:batching_session:queuing_latency",
            "Microseconds a request waited in the batching queue.", ("model_name", "signature_name"), LATENCY_BUCKETS)
        self.batch_split_reruns = Counter(
            ":tensorflow:serving:batching_session:split_reruns",
            "Merged batches that failed with INVALID_ARGUMENT and were re-run request by request.",
            ("model_name", "signature_name"))
        self.load_attempts = Counter(
            ":tensorflow:serving:load_attempt_count", "Model version loads by outcome.",
            ("model_name", "status"))
        self.version_available = Gauge(
            ":tensorflow:serving:model_version_available", "1 for each model version being served.",
            ("model_name", "version"))

    def all(self) -> list[_Metric]:
        """Every metric, in exposition order."""
        return [m for m in vars(self).values() if isinstance(m, _Metric)]

    def render(self) -> str:
        """The whole page in the Prometheus text format (version 0.0.4)."""
        lines: list[str] = []
        for metric in self.all():
            lines.extend(metric.render())
        return "\n".join(lines) + "\n"
