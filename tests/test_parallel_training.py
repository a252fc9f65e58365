"""Training the captioners side by side (`pipelines/parallel_training.py`): when, how it prints, what a kill leaves."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines import parallel_training
from pipelines.parallel_training import PrefixedStream, should_train_in_parallel
from pipelines.train import parse_args
from pipelines.training import model_budget_minutes

REPO = Path(__file__).resolve().parent.parent
TINY_RUN = [sys.executable, "pipelines/train.py", "--dataset", "pipelines/examples", "--preset", "tiny",
            "--vocab-size", "200"]


def test_each_line_gets_the_prefix_once_also_progress_bar_updates():
    out = io.StringIO()
    stream = PrefixedStream(out, "[git] ")
    stream.write("Epoch 1/3\n250/250 - 56s")
    stream.write(" - loss: 1.0\n\n[git] already prefixed\n")
    stream.write("\rcaptioning: 50%")
    stream.flush()  # tqdm flushes after each update: the partial line goes out
    stream.write("\rcaptioning: 100%\n")
    stream.write("a line written")
    stream.flush()  # print(..., end="", flush=True): the rest of the line gets no second prefix
    stream.write(" in two parts\n")
    assert out.getvalue() == ("[git] Epoch 1/3\n[git] 250/250 - 56s - loss: 1.0\n\n[git] already prefixed\n"
                              "\r[git] captioning: 50%\r[git] captioning: 100%\n[git] a line written in two parts\n")


def _noisy_child(stdout_pipe, stderr_pipe) -> None:
    """A child that prints from Python and from 'C++' (straight to the file descriptor), then dies at once."""
    parallel_training.redirect_output(stdout_pipe, stderr_pipe)
    print("from python")
    os.write(2, b"I0000 00:00 cpu_feature_guard.cc] a native log line\npartial")  # as TensorFlow's C++ logs write
    os.kill(os.getpid(), signal.SIGKILL)  # nothing flushed, nothing cleaned up


def test_a_childs_output_comes_out_prefixed_native_logs_too_and_survives_its_crash(capfd):
    process, threads = parallel_training.start_prefixed(multiprocessing.get_context("spawn"), _noisy_child, (),
                                                         "[git] ", "noisy")
    process.join(120)
    for thread in threads:
        thread.join(10)
    out, err = capfd.readouterr()
    assert process.exitcode == -signal.SIGKILL
    assert out == "[git] from python\n"
    assert err.endswith("[git] I0000 00:00 cpu_feature_guard.cc] a native log line\n[git] partial"), err


def test_parallel_by_default_only_for_several_undistributed_models_with_a_core_each(monkeypatch):
    import tensorflow as tf

    gpus = []
    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    monkeypatch.setattr(parallel_training, "usable_cpus", lambda: 2)
    assert should_train_in_parallel(None, 2, "none")
    assert not should_train_in_parallel(None, 1, "none")
    assert not should_train_in_parallel(True, 1, "none")  # nothing to run beside
    assert not should_train_in_parallel(None, 2, "mirrored")
    assert not should_train_in_parallel(False, 2, "none")
    monkeypatch.setattr(parallel_training, "usable_cpus", lambda: 1)
    assert not should_train_in_parallel(None, 2, "none")
    assert should_train_in_parallel(True, 2, "none")
    monkeypatch.setattr(parallel_training, "usable_cpus", lambda: 8)
    gpus.append("GPU:0")  # a GPU trains them faster one after the other
    assert not should_train_in_parallel(None, 2, "none") and should_train_in_parallel(True, 2, "none")
    assert parse_args(["--no-parallel"])[0].parallel is False and parse_args([])[0].parallel is None


def test_side_by_side_a_preset_budget_extends_to_the_run_deadline_but_an_asked_one_holds():
    ten_minutes_on = time.perf_counter() + 600
    assert model_budget_minutes(None, 6.2) == 6.2  # one after the other: the preset's share
    assert 9.9 < model_budget_minutes(None, 6.2, ten_minutes_on) <= 10.0
    assert model_budget_minutes(None, 6.2, time.perf_counter() + 60) == 6.2  # never less than the preset's
    assert model_budget_minutes(3.0, 6.2, ten_minutes_on) == 3.0
    assert model_budget_minutes(0, 6.2, ten_minutes_on) == 0  # --time-budget 0: no limit
    assert model_budget_minutes(None, None, ten_minutes_on) is None  # presets without a budget stay unbudgeted


def test_both_models_train_side_by_side_and_report_together(tmp_path):
    done = subprocess.run(TINY_RUN + ["--epochs", "1", "--parallel", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "side by side, one process each with" in done.stdout
    for name in ("cnn_gru", "git"):  # each child's lines carry its model's name, once
        assert f"[{name}] evaluating on valid" in done.stdout
        assert f"[{name}] [{name}]" not in done.stdout
    (summary_path,) = tmp_path.glob("*/summary.json")
    summary = json.loads(summary_path.read_text())
    assert summary["parallel"] is True and set(summary["models"]) == {"cnn_gru", "git"}
    for name, model in summary["models"].items():
        assert model["epochs_run"] == 1 and "fields" in model["metrics"]
        assert (summary_path.parent / name / "model.keras").is_file()
    assert "the models trained side by side" in (summary_path.parent / "report.md").read_text()


def _training_processes(pid: int) -> list[int]:
    """The spawned children of `pid` (multiprocessing's own helper processes are not training)."""
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in found if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split()[2] == "Z")  # a zombie has stopped


def _start_side_by_side(run_dir: Path, **popen) -> tuple[subprocess.Popen, list[int], list[str]]:
    """A tiny side-by-side run, once both models are training: (its process, the training processes, command)."""
    command = TINY_RUN + ["--epochs", "6", "--parallel", "--run-dir", str(run_dir)]
    parent = subprocess.Popen(command, cwd=REPO, **{"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, **popen})
    deadline = time.monotonic() + 300
    while not all((run_dir / name / "history.csv").is_file() for name in ("cnn_gru", "git")):
        if parent.poll() is not None or time.monotonic() > deadline:
            parent.kill()
            pytest.fail("both models should be training by now")
        time.sleep(0.5)
    workers = _training_processes(parent.pid)
    assert len(workers) == 2
    return parent, workers, command


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses pgrep")
def test_an_interrupted_parallel_run_stops_its_children_and_keeps_their_last_output(tmp_path):
    with open(tmp_path / "out", "wb") as stdout, open(tmp_path / "err", "wb") as stderr:  # files: a pipe could fill
        parent, workers, _ = _start_side_by_side(tmp_path / "run", stdout=stdout, stderr=stderr)
        try:
            parent.send_signal(signal.SIGINT)  # Ctrl-C, to the parent alone: it must stop the children itself
            parent.wait(timeout=60)
        finally:
            parent.kill()
    out, err = (tmp_path / "out").read_bytes(), (tmp_path / "err").read_bytes()
    assert parent.returncode != 0 and not any(_alive(pid) for pid in workers)
    assert b"[cnn_gru] " in out and b"[git] " in out and b"KeyboardInterrupt" in err
    assert b"Fatal Python error" not in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and uses pgrep")
def test_a_killed_parallel_run_leaves_no_training_behind_and_resumes(tmp_path):
    run_dir = tmp_path / "run"
    parent, workers, command = _start_side_by_side(run_dir)
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        give_up = time.monotonic() + 30
        while any(_alive(pid) for pid in workers) and time.monotonic() < give_up:
            time.sleep(0.5)
        assert not any(_alive(pid) for pid in workers), "training processes outlived the killed run"
    finally:
        parent.kill()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["resumed"] and set(summary["models"]) == {"cnn_gru", "git"}


def test_a_model_that_fails_side_by_side_leaves_the_other_to_finish(tmp_path):
    from pipelines.parallel_training import train_in_parallel
    from pipelines.training import prepare_data, prepare_tokenizer

    cfg, _ = parse_args(["--dataset", "pipelines/examples", "--preset", "tiny", "--epochs", "1", "--vocab-size", "200",
                         "--run-dir", str(tmp_path)])
    _, splits, _ = prepare_data(cfg, tmp_path)
    prepare_tokenizer(cfg, tmp_path, splits["train"])  # writes the vocab.txt that the children read
    context = {"dataset": "pipelines/examples", "split": "valid", "images": len(splits["valid"]), "skipped_rows": 0}
    with pytest.raises(RuntimeError, match=r"failed for no_such_model: ValueError") as failed:
        train_in_parallel(["cnn_gru", "no_such_model"], cfg, tmp_path, splits, splits["valid"], context, None)
    assert "--resume continues the run" in str(failed.value)
    assert (tmp_path / "cnn_gru" / "DONE.json").is_file() and (tmp_path / "cnn_gru" / "metrics.json").is_file()


def _silent_child(seconds: float) -> None:
    time.sleep(seconds)


def _answering_child(seconds: float, send) -> None:
    time.sleep(seconds)
    send.send(("ok", {"epochs": 1}))


def test_a_child_silent_past_the_deadline_is_stopped_and_reported_hung(monkeypatch):
    monkeypatch.setattr(parallel_training, "SILENT_SECONDS", 2.0)
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_silent_child, args=(120,))
    process.start()
    started = time.perf_counter()
    status, message = parallel_training.child_result(process, receive, started, lambda: started)
    assert status == "error" and "taken for hung" in message
    assert not process.is_alive() and time.perf_counter() - started < 30
    send.close()


def test_a_child_that_prints_answers_or_dies_is_not_taken_for_hung(monkeypatch):
    monkeypatch.setattr(parallel_training, "SILENT_SECONDS", 1.0)
    spawn = multiprocessing.get_context("spawn")
    receive, send = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_answering_child, args=(4, send))
    process.start()
    started = time.perf_counter()  # past the deadline at once, but still printing: waited for
    assert parallel_training.child_result(process, receive, started, time.perf_counter) == ("ok", {"epochs": 1})
    assert time.perf_counter() - started > 3
    receive, send = spawn.Pipe(duplex=False)
    process = spawn.Process(target=_silent_child, args=(0,))
    process.start()
    send.close()  # the child's end closed with nothing sent, as when it dies
    status, message = parallel_training.child_result(process, receive, None, time.perf_counter)
    assert status == "error" and "exit code 0 and no result" in message


def test_only_a_model_with_a_time_budget_is_bound_by_the_run_deadline():
    bound = parallel_training._bound_by_deadline
    assert bound("git", parse_args([])[0], 100.0)  # the small preset's budget extends to the deadline
    assert not bound("git", parse_args(["--time-budget", "0"])[0], 100.0)
    assert not bound("git", parse_args(["--preset", "tiny"])[0], 100.0)  # tiny has no budget
    assert not bound("git", parse_args([])[0], None)
