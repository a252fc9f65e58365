"""Server-side batching with the meaning of TF Serving's BatchingParameters.

Concurrent requests for the same model version and signature (and the same non-batch input
shapes) wait in one queue and are merged into a single model call: inputs concatenated along
axis 0, outputs split back. A batch runs when it is full (`max_batch_size` rows), when a newer
batch had to be opened behind it, or when its oldest request has waited `batch_timeout_micros`,
on one of `num_batch_threads` worker threads shared by all queues. Each queue holds at most
`max_enqueued_batches` batches; beyond that a request fails with UNAVAILABLE. With
`allowed_batch_sizes` a batch is padded up to the next allowed size by repeating its last row,
and the padded outputs are dropped. If a merged call fails with INVALID_ARGUMENT (one request's
image bytes are bad), the requests are re-run one by one so only the bad one fails.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import grpc
import numpy as np

from serving import errors
from serving.metrics import ServingMetrics

logger = logging.getLogger("serving.batching")

Arrays = dict[str, np.ndarray]
Runner = Callable[[Arrays], Arrays]


@dataclass(frozen=True)
class BatchingOptions:
    """BatchingParameters with TF Serving's defaults for unset fields."""

    max_batch_size: int = 1000
    batch_timeout_micros: int = 0
    max_enqueued_batches: int = 10
    num_batch_threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    allowed_batch_sizes: tuple[int, ...] = ()
    pad_variable_length_inputs: bool = False

    @classmethod
    def from_proto(cls, params) -> "BatchingOptions":
        """From a tensorflow.serving.BatchingParameters message; ValueError when inconsistent."""
        values = {}
        for name in ("max_batch_size", "batch_timeout_micros", "max_enqueued_batches", "num_batch_threads"):
            if params.HasField(name):
                values[name] = int(getattr(params, name).value)
        options = cls(**values, allowed_batch_sizes=tuple(int(s) for s in params.allowed_batch_sizes),
                      pad_variable_length_inputs=bool(params.pad_variable_length_inputs))
        options.validate()
        return options

    def validate(self) -> None:
        """Raise ValueError for settings TF Serving refuses."""
        if self.max_batch_size < 1 or self.max_enqueued_batches < 1 or self.num_batch_threads < 1:
            raise ValueError("max_batch_size, max_enqueued_batches and num_batch_threads must be >= 1.")
        if self.batch_timeout_micros < 0:
            raise ValueError("batch_timeout_micros must be >= 0.")
        sizes = self.allowed_batch_sizes
        if sizes:
            if any(b <= a for a, b in zip(sizes, sizes[1:])) or sizes[0] < 1:
                raise ValueError(f"allowed_batch_sizes entries must be positive and increasing: {list(sizes)}")
            if sizes[-1] != self.max_batch_size:
                raise ValueError(f"The final entry in allowed_batch_sizes ({sizes[-1]}) must equal max_batch_size "
                                 f"({self.max_batch_size}).")

    def padded_size(self, rows: int) -> int:
        """The smallest allowed batch size >= rows (rows itself without allowed sizes)."""
        return next((s for s in self.allowed_batch_sizes if s >= rows), rows)


@dataclass(eq=False)
class _Task:
    inputs: Arrays
    size: int
    enqueued: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Arrays | None = None
    error: errors.ServingError | None = None
    abandoned: bool = False  # the caller stopped waiting (deadline); skip it if not started

    def finish(self, result: Arrays | None = None, error: errors.ServingError | None = None) -> None:
        self.result, self.error = result, error
        self.done.set()


@dataclass(eq=False)
class _Queue:
    runner: Runner
    labels: tuple[str, str]
    batches: deque = field(default_factory=deque)  # of [tasks, rows]


class BatchScheduler:
    """Queues per key and a pool of batch threads shared by all of them."""

    def __init__(self, options: BatchingOptions, metrics: ServingMetrics | None = None):
        options.validate()
        self.options = options
        self.metrics = metrics or ServingMetrics()
        self._cond = threading.Condition()
        self._queues: dict[Hashable, _Queue] = {}
        self._stopped = False
        self._threads = [threading.Thread(target=self._work, name=f"batch-{i}", daemon=True)
                         for i in range(options.num_batch_threads)]
        for thread in self._threads:
            thread.start()

    def submit(self, key: Hashable, runner: Runner, inputs: Arrays, labels: tuple[str, str] = ("", ""),
               timeout: float | None = None) -> Arrays:
        """Queue one request's inputs (all with the same rows on axis 0); block for its own outputs."""
        size = int(next(iter(inputs.values())).shape[0])
        if size > self.options.max_batch_size:
            raise errors.invalid(f"Task size {size} is larger than maximum input batch size "
                                 f"{self.options.max_batch_size}; split the request.")
        task = _Task(inputs, size, time.monotonic())
        with self._cond:
            if self._stopped:
                raise errors.ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down.")
            q = self._queues.setdefault(key, _Queue(runner, labels))
            if q.batches and q.batches[-1][1] + size <= self.options.max_batch_size:
                q.batches[-1][0].append(task)
                q.batches[-1][1] += size
            elif len(q.batches) >= self.options.max_enqueued_batches:
                raise errors.ServingError(grpc.StatusCode.UNAVAILABLE,
                                          "The batch scheduling queue to which this task was submitted is full "
                                          f"({self.options.max_enqueued_batches} batches); try again later.")
            else:
                q.batches.append([[task], size])
            self._cond.notify()
        if not task.done.wait(timeout):
            self._withdraw(key, task)
            raise errors.ServingError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                      "Deadline exceeded while the request waited for its batch.")
        if task.error is not None:
            raise task.error
        return task.result

    def _withdraw(self, key: Hashable, task: _Task) -> None:
        """Take a task whose caller gave up out of its queue (or mark it, if a batch thread has it)."""
        with self._cond:
            task.abandoned = True
            q = self._queues.get(key)
            for batch in q.batches if q else ():
                if task in batch[0]:
                    batch[0].remove(task)
                    batch[1] -= task.size
                    if not batch[0]:
                        q.batches.remove(batch)
                    break

    def stop(self) -> None:
        """Fail queued requests with UNAVAILABLE and stop the threads after their current batch."""
        with self._cond:
            self._stopped = True
            pending = [t for q in self._queues.values() for b in q.batches for t in b[0]]
            self._queues.clear()
            self._cond.notify_all()
        for task in pending:
            task.finish(error=errors.ServingError(grpc.StatusCode.UNAVAILABLE, "The server is shutting down."))
        for thread in self._threads:
            thread.join(timeout=10)

    # --- batch threads --------------------------------------------------------------------------

    def _next_batch(self) -> tuple[_Queue | None, list[_Task] | None, float | None]:
        """The ready batch whose oldest task waited longest, else how long to sleep (None: until notified)."""
        now, timeout = time.monotonic(), self.options.batch_timeout_micros / 1e6
        best, oldest, wait = None, None, None
        for key, q in list(self._queues.items()):
            if not q.batches:
                del self._queues[key]
                continue
            tasks, rows = q.batches[0]
            due = tasks[0].enqueued + timeout
            if rows >= self.options.max_batch_size or len(q.batches) > 1 or due <= now:
                if best is None or tasks[0].enqueued < oldest:
                    best, oldest = q, tasks[0].enqueued
            else:
                wait = due - now if wait is None else min(wait, due - now)
        if best is None:
            return None, None, wait
        return best, best.batches.popleft()[0], None

    def _work(self) -> None:
        while True:
            with self._cond:
                while True:
                    if self._stopped:
                        return
                    q, tasks, wait = self._next_batch()
                    if q is not None:
                        break
                    self._cond.wait(wait)
            tasks = [t for t in tasks if not t.abandoned]
            if tasks:
                self._run(q, tasks)

    def _run(self, q: _Queue, tasks: list[_Task]) -> None:
        """One model call for `tasks`; on INVALID_ARGUMENT with several tasks, one call each."""
        try:
            results = self._call(q, tasks)
        except Exception as e:  # noqa: BLE001 - every failure is reported to the waiting requests
            error = errors.from_exception(e)
            if error.code == grpc.StatusCode.INVALID_ARGUMENT and len(tasks) > 1:
                self.metrics.batch_split_reruns.inc(*q.labels)
                logger.info("A batch of %d requests failed (%s); re-running them one by one", len(tasks),
                            error.message)
                for task in tasks:
                    self._run(q, [task])
                return
            for task in tasks:
                task.finish(error=error)
            return
        for task, result in zip(tasks, results):
            task.finish(result=result)

    def _call(self, q: _Queue, tasks: list[_Task]) -> list[Arrays]:
        """Concatenate, pad, run, check and split."""
        rows = sum(t.size for t in tasks)
        target = self.options.padded_size(rows)
        now = time.monotonic()
        for task in tasks:
            self.metrics.queuing_latency.observe((now - task.enqueued) * 1e6, *q.labels)
        self.metrics.input_batch_size.observe(rows, *q.labels)
        self.metrics.processed_batch_size.observe(target, *q.labels)
        self.metrics.padding_size.observe(target - rows, *q.labels)
        self.metrics.tasks_per_batch.observe(len(tasks), *q.labels)
        merged = {}
        for name in tasks[0].inputs:
            parts = [t.inputs[name] for t in tasks]
            if target > rows:
                parts.append(np.repeat(parts[-1][-1:], target - rows, axis=0))
            merged[name] = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        outputs = q.runner(merged)
        for name, value in outputs.items():
            if np.ndim(value) == 0 or np.shape(value)[0] != target:
                raise errors.ServingError(
                    grpc.StatusCode.INTERNAL,
                    f"Batched output tensor '{name}' has shape {list(np.shape(value))}; its first dimension must be "
                    f"the batch size {target} for the signature to be batched (start the server without "
                    "--enable_batching for such models).")
        results, offset = [], 0
        for task in tasks:
            results.append({name: value[offset:offset + task.size] for name, value in outputs.items()})
            offset += task.size
        return results
