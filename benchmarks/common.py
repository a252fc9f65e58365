"""What every benchmark shares: thread limits, timing, the machine it ran on, a table and a JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def limit_threads(threads: int = 2) -> None:
    """Give TensorFlow (and PyTorch, when installed) `threads` intra-op and inter-op threads; call before any op."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError:  # TensorFlow already started: the limit only applies to a fresh process
        print(f"warning: TensorFlow was initialised before limit_threads({threads})")
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


def median_seconds(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """(median, all times) in seconds of `fn()` over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times), times


def machine() -> dict:
    """The machine and software a figure came from, and its 1-minute load average (this run included)."""
    import tensorflow as tf

    fields = {}
    try:  # the first processor's entries; a VM's "model name" alone ("AMD EPYC") hides its generation
        for line in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    info = {"cpu": fields.get("model name", platform.processor()), "cores": os.cpu_count(),
            "cpu_family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "vector_isa": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags],
            "load_average_1m": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "tensorflow": tf.__version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    try:
        import keras

        info["keras"] = keras.__version__
    except ImportError:
        pass
    return info


def print_table(headers: list[str], rows: list[list]) -> None:
    """A markdown table on stdout."""
    def cell(value) -> str:
        if not isinstance(value, float):
            return str(value)
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"

    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(cell(v) for v in row) + " |")


def write_json(name: str, payload: dict, out: str | Path | None = None) -> Path:
    """Write the figures (with the machine they came from) to `out` or benchmarks/results/NAME.json."""
    path = Path(out) if out else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": name, "machine": machine(), **payload}, indent=2, default=float))
    print(f"\nwrote {path}")
    return path
