"""Train several captioners side by side on a CPU-only machine: one process per model, cores shared out.

One TensorFlow process keeps two CPU cores only partly busy on the small presets: a captioner step is a
chain of small ops (the GRU's 32 steps, a 2-layer transformer), and the second intra-op thread adds little
(measured on 2 cores: a process ran its training steps 1.15-1.3x faster with 2 threads than with 1). Two
processes with one thread each did 1.4-2.6x the work of one process with two (median 1.8x over six alternating
rounds of captioner and concept pretraining steps on a noisy VM). So `pipelines/train.py` trains its models
in parallel there, each in a spawned process with `cores // models` threads, and each model's preset time
budget then extends to the run's deadline instead of its share of it.

Each child prints with a `[model]` prefix, trains and evaluates its model with the same `train_one` and
`evaluate_one` as a sequential run, writes the same files, and exits if the parent dies.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import sys
import threading
import time
import types
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def should_train_in_parallel(requested: bool | None, models: int, distribute: str) -> bool:
    """`--parallel` as asked; by default when training several models, undistributed, with no GPU and a core each."""
    if models < 2 or distribute != "none":
        return False
    if requested is not None:
        return requested
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU") and usable_cpus() >= models


class PrefixedStream(io.TextIOBase):
    """A text stream that starts each line (ended by a newline or a carriage return) with `prefix`, once.

    Lines are written whole, so two processes sharing a terminal do not split each other's lines; a line that
    already starts with the prefix (`train_one`'s own "[model] ..." messages) keeps just the one.
    """

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.pending = stream, prefix, ""

    def write(self, text: str) -> int:
        self.pending += text
        while (ends := [i for i in (self.pending.find("\n"), self.pending.find("\r")) if i >= 0]):
            line, self.pending = self.pending[: min(ends) + 1], self.pending[min(ends) + 1:]
            self._emit(line)
        return len(text)

    def _emit(self, line: str) -> None:
        self.stream.write(line if not line.strip() or line.startswith(self.prefix) else self.prefix + line)
        self.stream.flush()

    def flush(self) -> None:
        """Write out a pending partial line too (the process is about to stop, or a prompt waits)."""
        if self.pending:
            line, self.pending = self.pending, ""
            self._emit(line)
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()


@dataclass
class ModelJob:
    """What a child process needs to train and evaluate one model (all of it picklable)."""

    name: str
    cfg: types.SimpleNamespace  # pipelines.train.TrainConfig's fields (its class may live in __main__)
    run_dir: Path
    splits: dict
    eval_records: list
    context: dict
    deadline_in: float | None  # seconds from submission until training must end; None: no deadline
    submitted: float  # time.time() at submission
    threads: int


def _exit_with_parent(parent: int) -> None:
    """Watch the parent process; end this one as soon as it is gone (a killed run leaves no orphan training)."""
    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def train_and_evaluate(job: ModelJob, parent: int) -> tuple[dict, list[str]]:
    """In a child process: train `job.name` with `job.threads` CPU threads, evaluate it; (info, captions)."""
    _exit_with_parent(parent)
    sys.stdout = PrefixedStream(sys.stdout, f"[{job.name}] ")
    sys.stderr = PrefixedStream(sys.stderr, f"[{job.name}] ")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(job.threads)
    tf.config.threading.set_inter_op_parallelism_threads(job.threads)
    from pipelines.training import evaluate_one, prepare_tokenizer, train_one

    tokenizer = prepare_tokenizer(job.cfg, job.run_dir, job.splits["train"])  # the parent wrote vocab.txt
    deadline = None
    if job.deadline_in is not None:  # this process's perf_counter clock
        deadline = time.perf_counter() + job.deadline_in - (time.time() - job.submitted)
    trained = train_one(job.name, job.cfg, tokenizer, job.splits, job.run_dir, deadline=deadline, whole_run=True)
    model = trained.pop("model")
    print(f"evaluating on {job.context['split']} ({len(job.eval_records)} images)", flush=True)
    trained["metrics"], captions = evaluate_one(job.name, model, job.eval_records, job.run_dir / job.name, job.context)
    sys.stdout.flush()
    sys.stderr.flush()
    return trained, captions


def train_in_parallel(names, cfg, run_dir: Path, splits: dict, eval_records, context: dict,
                      deadline: float | None) -> dict[str, tuple[dict, list[str]]]:
    """Train and evaluate each of `names` in its own process at once; {name: (info, captions)}.

    `deadline` is a `time.perf_counter()` value by which training must end (None: none). A model that
    fails raises here once the others have finished, so their work is kept for `--resume`.
    """
    threads = max(1, usable_cpus() // len(names))
    now = time.perf_counter()
    deadline_in = None if deadline is None else max(0.0, deadline - now)
    print(f"\nTraining {', '.join(names)} side by side, one process each with {threads} CPU thread(s) of "
          f"{usable_cpus()}" + (f"; each may train until {deadline_in / 60:.1f} min from now" if deadline_in else "")
          + " (--no-parallel trains them one after the other)", flush=True)
    cfg = types.SimpleNamespace(**vars(cfg))
    jobs = [ModelJob(name, cfg, run_dir, splits, eval_records, context, deadline_in, time.time(), threads)
            for name in names]
    context_spawn = multiprocessing.get_context("spawn")  # a fresh TensorFlow runtime per model
    with ProcessPoolExecutor(max_workers=len(jobs), mp_context=context_spawn) as pool:
        futures = {job.name: pool.submit(train_and_evaluate, job, os.getpid()) for job in jobs}
        results, failures = {}, {}
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except Exception as error:  # noqa: BLE001 - reported below, after the other models finish
                failures[name] = error
    if failures:
        name, error = next(iter(failures.items()))
        raise RuntimeError(f"Training {', '.join(failures)} failed in parallel; finished models are kept "
                           f"(--resume continues the run): {name}: {error}") from error
    return results
