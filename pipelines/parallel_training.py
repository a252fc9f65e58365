"""Train several captioners side by side on a CPU-only machine: one process per model, cores shared out.

One TensorFlow process keeps two CPU cores only partly busy on the small presets: a captioner step is a
chain of small ops (the GRU's 32 steps, a 2-layer transformer), and the second intra-op thread adds little
(measured on 2 cores: a process ran its training steps 1.15-1.3x faster with 2 threads than with 1). Two
processes with one thread each did 1.4-2.6x the work of one process with two (median 1.8x over six alternating
rounds of captioner and concept pretraining steps on a noisy VM). So `pipelines/train.py` trains its models
in parallel there, each in a spawned process with `cores // models` threads, and each model's preset time
budget then extends to the run's deadline instead of its share of it.

Each child trains and evaluates its model with the same `train_one` and `evaluate_one` as a sequential run,
writes the same files, and exits if the parent dies. Its file descriptors 1 and 2 are pipes that the parent
copies to its own stdout and stderr with a `[model]` prefix on each line: Python's prints and TensorFlow's C++
logs alike, and all of it even when a child crashes.
"""

from __future__ import annotations

import codecs
import io
import multiprocessing
import os
import sys
import threading
import time
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

# A child still running after the run's deadline that has printed nothing for this long (its evaluation prints a
# progress bar batch by batch) is taken for hung and stopped, so that the run ends and reports it. A child whose
# model trains without a time budget is not bound by the deadline, and the parent waits as long as it takes.
SILENT_SECONDS = 600.0


def usable_cpus() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def should_train_in_parallel(requested: bool | None, models: int, distribute: str) -> bool:
    """`--parallel` as asked; by default when training several models, undistributed, with no GPU and a core each.

    `models` counts the models still to train (a resumed run may have finished some).
    """
    if models < 2 or distribute != "none":
        if requested:
            print("--parallel: " + ("not with --distribute" if distribute != "none" else "one model to train")
                  + "; training one model after the other")
        return False
    if requested is not None:
        return requested
    import tensorflow as tf

    return not tf.config.list_physical_devices("GPU") and usable_cpus() >= models


class PrefixedStream(io.TextIOBase):
    """A text stream that starts each line (after a newline or a carriage return) with `prefix`, once.

    Complete lines go out in one write, so two processes sharing a terminal rarely split each other's lines;
    a line that already starts with the prefix (`train_one`'s own "[model] ..." messages) keeps just the one.
    """

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.pending, self.at_line_start = stream, prefix, "", True

    def write(self, text: str) -> int:
        self.pending += text
        while (ends := [i for i in (self.pending.find("\n"), self.pending.find("\r")) if i >= 0]):
            line, self.pending = self.pending[: min(ends) + 1], self.pending[min(ends) + 1:]
            self._emit(line)
        return len(text)

    def _emit(self, text: str) -> None:
        starts_line = self.at_line_start and text.strip() and not text.startswith(self.prefix)
        self.stream.write(self.prefix + text if starts_line else text)
        self.stream.flush()
        self.at_line_start = text.endswith(("\n", "\r"))

    def flush(self) -> None:
        """Write out a pending partial line too (a progress bar's update, or the process is about to stop)."""
        if self.pending:
            text, self.pending = self.pending, ""
            self._emit(text)
        self.stream.flush()

    def writable(self) -> bool:
        return True


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


class LastOutput:
    """When a child last printed (`time.perf_counter()`), stamped by its output copiers; starts at creation."""

    def __init__(self):
        self.at = time.perf_counter()

    def stamp(self) -> None:
        self.at = time.perf_counter()

    def get(self) -> float:
        return self.at


def _bound_by_deadline(name: str, cfg, deadline: float | None) -> bool:
    """Whether model `name`'s training stops by the run's deadline (it has a time budget; see `train_one`)."""
    from keras_models.registry import MODELS, presets
    from pipelines.training import model_budget_minutes

    preset = presets(name).get(cfg.preset, {}) if name in MODELS else {}
    return deadline is not None and bool(model_budget_minutes(
        cfg.time_budget_minutes, preset.get("train", {}).get("time_budget_minutes"), deadline))


def copy_prefixed(source, target, prefix: str, heard: LastOutput | None = None) -> None:
    """Copy a child's raw output from the pipe `source` to the text stream `target` until the child closes it.

    Each line starts with `prefix`; a partial line (a progress bar's update) goes out as it comes. If `target`
    fails (a closed terminal), the rest is read and dropped, so the child never blocks on a full pipe.
    `heard` is stamped at each chunk.
    """
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    stream, failed = PrefixedStream(target, prefix), False
    with source:
        while True:
            chunk = os.read(source.fileno(), 1 << 16)
            if heard is not None:
                heard.stamp()
            text = decoder.decode(chunk, final=not chunk)
            if text and not failed:
                try:
                    stream.write(text)
                    stream.flush()
                except Exception:  # noqa: BLE001 - whatever it is, keep draining: a stopped copier blocks the child
                    failed = True
            if not chunk:
                return


def start_prefixed(context, target, args: tuple, prefix: str, name: str, heard: LastOutput | None = None):
    """Start `target(*args, stdout_pipe, stderr_pipe)` in a process of `context` whose output this process prints.

    The child must hand the two pipes to `redirect_output` first; its output stamps `heard`. Returns (process,
    copying threads).
    """
    ends = [context.Pipe(duplex=False) for _ in range(2)]
    process = context.Process(target=target, args=(*args, *(send for _, send in ends)), name=name)
    process.start()
    threads = []
    for (receive, send), stream in zip(ends, (sys.stdout, sys.stderr)):
        send.close()  # the child holds the write ends: when it ends, the copying thread reads the end of file
        thread = threading.Thread(target=copy_prefixed, args=(receive, stream, prefix, heard), daemon=True,
                                  name=f"{name}-output")
        thread.start()
        threads.append(thread)
    return process, threads


def redirect_output(stdout_pipe, stderr_pipe) -> None:
    """In a child of `start_prefixed`: point file descriptors 1 and 2 (prints and C++ logs alike) at the pipes."""
    for fd, pipe in ((1, stdout_pipe), (2, stderr_pipe)):
        os.dup2(pipe.fileno(), fd)
        pipe.close()
    for stream in (sys.stdout, sys.stderr):
        stream.reconfigure(line_buffering=True)  # a pipe is block-buffered by default: show each line as it ends


def train_and_evaluate(job: ModelJob) -> tuple[dict, list[str]]:
    """In a child process: train `job.name` with `job.threads` CPU threads, evaluate it; (info, captions)."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(job.threads)
    tf.config.threading.set_inter_op_parallelism_threads(job.threads)
    for gpu in tf.config.list_physical_devices("GPU"):  # an explicit --parallel on a GPU machine: share it
        tf.config.experimental.set_memory_growth(gpu, True)
    from pipelines.training import evaluate_one, prepare_tokenizer, train_one

    tokenizer = prepare_tokenizer(job.cfg, job.run_dir, job.splits["train"])  # the parent wrote vocab.txt
    deadline = None
    if job.deadline_in is not None:  # this process's perf_counter clock
        deadline = time.perf_counter() + job.deadline_in - (time.time() - job.submitted)
    trained = train_one(job.name, job.cfg, tokenizer, job.splits, job.run_dir, deadline=deadline, whole_run=True)
    model = trained.pop("model")
    print(f"evaluating on {job.context['split']} ({len(job.eval_records)} images)", flush=True)
    trained["metrics"], captions = evaluate_one(job.name, model, job.eval_records, job.run_dir / job.name, job.context)
    return trained, captions


def _child(job: ModelJob, parent: int, results, stdout_pipe, stderr_pipe) -> None:
    """A child process's entry: send ("ok", (info, captions)) or ("error", message) back through `results`."""
    redirect_output(stdout_pipe, stderr_pipe)
    _exit_with_parent(parent)
    try:
        results.send(("ok", train_and_evaluate(job)))
    except BaseException as error:  # noqa: BLE001 - SystemExit and KeyboardInterrupt too: the parent reports it
        results.send(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def child_result(process, receive, deadline: float | None, last_output) -> tuple[str, object]:
    """A child's ("ok", result) or ("error", message) from its pipe, once it has ended.

    A child still running after `deadline` (a `time.perf_counter()` value; None: never) whose output has been
    silent for `SILENT_SECONDS` (`last_output()`: when it last printed, on the same clock) is stopped
    (SIGTERM, then SIGKILL) and reported as hung.
    """
    try:
        while not receive.poll(None if deadline is None else 5.0):  # True once the child has sent or died
            now = time.perf_counter()
            if now > deadline and now - max(deadline, last_output()) > SILENT_SECONDS:
                _stop(process)
                return "error", (f"no result and no output for {SILENT_SECONDS / 60:g} min after the run's "
                                 "deadline: taken for hung, its process was stopped")
        status, payload = receive.recv()
    except (EOFError, OSError):  # it died before answering, or while it answered
        _stop(process)
        return "error", f"its process ended with exit code {process.exitcode} and no result"
    _stop(process, grace=60.0)  # it has answered: it ends on its own, unless its shutdown hangs
    return status, payload


def _stop(process, grace: float = 10.0) -> None:
    """Wait up to `grace` seconds for `process` to end, then SIGTERM it, then SIGKILL it."""
    process.join(grace)
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
    process.join()


def train_in_parallel(names, cfg, run_dir: Path, splits: dict, eval_records, context: dict,
                      deadline: float | None) -> dict[str, tuple[dict, list[str]]]:
    """Train and evaluate each of `names` in its own process at once; {name: (info, captions)}.

    `deadline` is a `time.perf_counter()` value by which training must end (None: none). Each model has its
    own process, so one that fails or dies (out of memory, say) leaves the others to finish; it is reported
    here once they have, and `--resume` continues it. If the parent is interrupted, it stops every child.
    """
    threads = max(1, usable_cpus() // len(names))
    deadline_in = None if deadline is None else max(0.0, deadline - time.perf_counter())
    print(f"\nTraining {', '.join(names)} side by side, one process each with {threads} CPU thread(s) of "
          f"{usable_cpus()}" + (f"; each may train until {deadline_in / 60:.1f} min from now" if deadline_in else "")
          + " (--no-parallel trains them one after the other)", flush=True)
    cfg = types.SimpleNamespace(**vars(cfg))
    spawn = multiprocessing.get_context("spawn")  # a fresh TensorFlow runtime per model
    children, copiers, heard = {}, [], {}
    for name in names:
        receive, send = spawn.Pipe(duplex=False)
        job = ModelJob(name, cfg, run_dir, splits, eval_records, context, deadline_in, time.time(), threads)
        heard[name] = LastOutput()
        process, output_threads = start_prefixed(spawn, _child, (job, os.getpid(), send), f"[{name}] ",
                                                 f"medcap-{name}", heard[name])
        send.close()  # the child holds its end: a child that dies closes the pipe
        children[name] = (process, receive)
        copiers += output_threads
    results, failures = {}, {}
    try:
        for name, (process, receive) in children.items():
            bound = deadline if _bound_by_deadline(name, cfg, deadline) else None
            status, payload = child_result(process, receive, bound, heard[name].get)
            if status == "ok":
                results[name] = payload
            else:
                failures[name] = payload
    except BaseException:
        for process, _ in children.values():
            process.terminate()
        for process, _ in children.values():
            process.join(5)
        for thread in copiers:  # their last words (a traceback) before this process reports its own
            thread.join(5)
        raise
    for thread in copiers:  # the children have ended: print the last of their output before reporting
        thread.join(timeout=10)
    if failures:
        raise RuntimeError("Training side by side failed for " + "; ".join(f"{n}: {e}" for n, e in failures.items())
                           + "\nModels that finished are kept; --resume continues the run.")
    return results
