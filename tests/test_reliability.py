"""Reliability: the server under malformed requests and load, and what a SIGKILL leaves behind.

A real tiny GIT captioner is exported once and served by `serving.server` (batching on, as deployed):
model "git" takes the fuzzing and the load, model "swap" the version faults. Hypothesis generates
the malformed requests (derandomized, so a run is repeatable); each must be answered with an error
status, the server must stay up and keep answering good requests, and its resident memory must stay
flat. The long soak (5,000 requests from 32 clients) is `python -m benchmarks.reliability_load`.
"""

from __future__ import annotations

import collections
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from serving.apis import get_model_status_pb2, model_service_pb2_grpc, predict_pb2, prediction_service_pb2_grpc
from serving.loadtest import throughput
from serving.tensors import make_ndarray, make_tensor_proto
from serving.testing import REPO, ServerProcess, copy_version, png_bomb, png_bytes

AVAILABLE = get_model_status_pb2.ModelVersionStatus.AVAILABLE
END = get_model_status_pb2.ModelVersionStatus.END
GOOD = png_bytes(128, (32, 32))
MAX_BATCH = 8
PREDICT = "/tensorflow.serving.PredictionService/Predict"
ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED}
SEEN: collections.Counter = collections.Counter()  # (kind, outcome) -> count, printed at the end


def noise_png(seed: int = 0, size=(40, 48)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


JPEG = sorted((REPO / "pipelines" / "examples" / "valid").glob("*.jpg"))[0].read_bytes()  # a real ROCO figure
PNG = noise_png()


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """A tiny GIT exported as models/git/1 and models/swap/1, served with batching; yields a namespace."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    from export.saved_model import export_model
    from keras_models.registry import build_captioner
    from pipelines.text import build_vocabulary, make_tokenizer

    root = tmp_path_factory.mktemp("reliability")
    keras.utils.set_random_seed(0)
    tokenizer = make_tokenizer(build_vocabulary(["chest x-ray with a small nodule", "axial ct of the head"] * 4, 60))
    model = build_captioner("git", "tiny", tokenizer, sequence_length=12)
    model.save(root / "tiny.keras")
    version = export_model(model, root / "models", "git")
    copy_version(version, root / "models", "swap", 1)
    (root / "models.config").write_text("model_config_list {\n" + "".join(
        f'  config {{ name: "{n}" base_path: "/models/{n}" model_platform: "tensorflow" }}\n' for n in ("git", "swap"))
        + "}\n")
    (root / "batching.config").write_text(
        f"max_batch_size {{ value: {MAX_BATCH} }}\nbatch_timeout_micros {{ value: 2000 }}\n"
        "max_enqueued_batches { value: 64 }\nnum_batch_threads { value: 1 }\n")
    server = ServerProcess(["--model_config_file", str(root / "models.config"), "--model_base_path_root",
                            str(root / "models"), "--file_system_poll_wait_seconds", "0.3", "--enable_batching",
                            "--batching_parameters_file", str(root / "batching.config")],
                           root / "server.log").start().wait_ready(180)
    channel = grpc.insecure_channel(server.grpc_address, options=[("grpc.max_send_message_length", 128 << 20)])
    yield type("Deployment", (), dict(
        root=root, server=server, channel=channel, process=psutil.Process(server.process.pid),
        predict=prediction_service_pb2_grpc.PredictionServiceStub(channel),
        models=model_service_pb2_grpc.ModelServiceStub(channel)))
    channel.close()
    assert server.stop() == 0, server.log()[-3000:]
    if SEEN:
        tried = ", ".join(f"{kind}/{code}: {n}" for (kind, code), n in sorted(SEEN.items()))
        print(f"\nmalformed inputs tried (kind, outcome): {tried}")


def request(images=None, model: str = "git", tensor=None, signature: str = "") -> predict_pb2.PredictRequest:
    message = predict_pb2.PredictRequest()
    message.model_spec.name = model
    message.model_spec.signature_name = signature
    if tensor is None:
        tensor = make_tensor_proto(np.array(images, dtype=object), 7)
    message.inputs["images"].CopyFrom(tensor)
    return message


def answer_good(d, model: str = "git") -> predict_pb2.PredictResponse:
    """A good request is answered with one caption per image."""
    response = d.predict.Predict(request([GOOD, PNG]), timeout=60) if model == "git" else \
        d.predict.Predict(request([GOOD], model=model), timeout=60)
    assert len(make_ndarray(response.outputs["captions"])) == (2 if model == "git" else 1)
    return response


def outcome(d, message, raw: bytes | None = None) -> grpc.StatusCode:
    """The status a request gets (OK when answered)."""
    try:
        if raw is not None:
            d.channel.unary_unary(PREDICT)(raw, timeout=60)
        else:
            d.predict.Predict(message, timeout=60)
        return grpc.StatusCode.OK
    except grpc.RpcError as e:
        assert "Traceback" not in (e.details() or "")
        return e.code()


# --- what hypothesis generates ------------------------------------------------------------------

def _truncated(data: bytes):
    return st.integers(0, len(data) - 1).map(lambda n: data[:n])


def _flipped(data: bytes):
    """The image with a few bytes past the header overwritten: may still decode, must never crash."""
    return st.lists(st.tuples(st.integers(16, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
        lambda edits: bytes(_apply(bytearray(data), edits)))


def _apply(data: bytearray, edits) -> bytearray:
    for index, value in edits:
        data[index] = value
    return data


BAD_IMAGES = {
    "random bytes": st.binary(max_size=4096),
    "png magic + garbage": st.binary(max_size=2048).map(lambda b: b"\x89PNG\r\n\x1a\n" + b),
    "jpeg magic + garbage": st.binary(max_size=2048).map(lambda b: b"\xff\xd8\xff" + b),
    "truncated png": _truncated(PNG),
    "truncated jpeg": _truncated(JPEG),
    "zero bytes": st.just(b""),
    "decompression bomb": st.tuples(st.integers(7_072, 1 << 20), st.integers(7_072, 1 << 20)).map(
        lambda wh: png_bomb(*wh)),
}
MAYBE_IMAGES = {"corrupted png": _flipped(PNG), "corrupted jpeg": _flipped(JPEG)}
DTYPES = {"float32": np.float32, "int32": np.int32, "int64": np.int64, "uint8": np.uint8, "bool": np.bool_}


@st.composite
def malformed(draw) -> tuple[str, object, bool]:
    """(kind, request or raw bytes, must it fail?)."""
    kind = draw(st.sampled_from([*BAD_IMAGES, *MAYBE_IMAGES, "wrong dtype", "wrong rank", "unknown model",
                                 "unknown signature", "huge batch", "garbage protobuf"]))
    if kind in BAD_IMAGES or kind in MAYBE_IMAGES:
        bad = draw((BAD_IMAGES | MAYBE_IMAGES)[kind])
        others = draw(st.lists(st.sampled_from([GOOD, PNG]), max_size=2))
        images = others[: draw(st.integers(0, len(others)))] + [bad] + others  # the bad one anywhere
        return kind, request(images), kind in BAD_IMAGES
    if kind == "wrong dtype":
        dtype = DTYPES[draw(st.sampled_from(sorted(DTYPES)))]
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        return kind, request(tensor=make_tensor_proto(np.zeros(shape, dtype))), True
    if kind == "wrong rank":
        shape = draw(st.sampled_from([(), (1, 1), (2, 1, 1), (0,)]))
        return kind, request(tensor=make_tensor_proto(np.full(shape, GOOD, dtype=object), 7)), True
    if kind == "unknown model":
        return kind, request([GOOD], model=draw(st.text(min_size=1, max_size=30).filter(
            lambda n: n not in ("git", "swap")))), True
    if kind == "unknown signature":
        return kind, request([GOOD], signature=draw(st.text(min_size=1, max_size=30).filter(
            lambda n: n not in ("serving_default", "beam_search")))), True
    if kind == "huge batch":
        return kind, request([GOOD] * draw(st.integers(MAX_BATCH + 1, 5_000))), True
    return kind, draw(st.binary(min_size=1, max_size=512)), False  # may even parse as a (useless) request


@settings(max_examples=400, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=malformed())
def fuzz_once(d, case):
    kind, message, must_fail = case
    raw = message if isinstance(message, bytes) else None
    code = outcome(d, None if raw is not None else message, raw)
    SEEN[(kind, code.name)] += 1
    allowed = ERRORS | ({grpc.StatusCode.INTERNAL} if raw is not None else set())  # undecodable proto
    if not must_fail:
        allowed |= {grpc.StatusCode.OK}
    assert code in allowed, (kind, code)
    assert d.server.process.poll() is None, "server died"
    answer_good(d)


def test_fuzzed_requests_get_errors_and_the_server_keeps_serving(deployment):
    d = deployment
    answer_good(d)
    for _ in range(20):  # warm up the good and the error paths before measuring memory
        outcome(d, request([GOOD, b"not an image"]))
        answer_good(d)
    rss_before = d.process.memory_info().rss
    fuzz_once(d)
    rss_after = d.process.memory_info().rss
    tried = sum(SEEN.values())
    print(f"\nfuzz: {tried} malformed requests, server RSS {rss_before / 2**20:.0f} -> {rss_after / 2**20:.0f} MiB")
    assert tried >= 400 and d.server.process.poll() is None
    assert rss_after - rss_before < 64 * 2**20, (rss_before, rss_after)


def test_oversized_message_is_refused_and_the_server_keeps_serving(deployment):
    d = deployment
    code = outcome(d, request([b"\x89PNG\r\n\x1a\n" + bytes(70 << 20)]))  # over the 64 MiB message limit
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    answer_good(d)


def test_quick_load_has_no_failures_and_flat_memory(deployment):
    d = deployment
    throughput(d.server.grpc_address, "git", JPEG, 16, requests=200)  # warm-up
    warm = d.process.memory_info().rss
    load = throughput(d.server.grpc_address, "git", JPEG, 16, requests=600)
    end = d.process.memory_info().rss
    print(f"\nquick load: {load.done} requests from 16 clients in {load.elapsed:.1f} s, "
          f"{len(load.failures)} failures, RSS {warm / 2**20:.0f} -> {end / 2**20:.0f} MiB")
    assert load.failures == [] and load.done == 600
    assert abs(end - warm) <= 0.10 * warm


# --- faults ---------------------------------------------------------------------------------------

def status(d, model: str) -> dict[int, tuple[int, int]]:
    message = get_model_status_pb2.GetModelStatusRequest()
    message.model_spec.name = model
    return {s.version: (s.state, s.status.error_code) for s in d.models.GetModelStatus(message, timeout=10)
            .model_version_status}


def wait_for(condition, timeout: float = 120.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def served_version(d, model: str = "swap") -> int:
    return answer_good(d, model).model_spec.version.value


def corrupt_copies(good: Path) -> dict[str, callable]:
    """Ways a version directory can be broken on disk, each applied to a fresh copy of a good one."""
    def truncate_variables(path: Path):
        data = next((path / "variables").glob("variables.data-*"))
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 3])

    def truncate_graph(path: Path):
        graph = path / "saved_model.pb"
        graph.write_bytes(graph.read_bytes()[: graph.stat().st_size // 2])

    def drop_variables(path: Path):
        shutil.rmtree(path / "variables")

    def garbage_graph(path: Path):
        (path / "saved_model.pb").write_bytes(b"\x08\x01not a SavedModel\xff" * 10)

    return {"truncated variables": truncate_variables, "truncated saved_model.pb": truncate_graph,
            "no variables": drop_variables, "garbage saved_model.pb": garbage_graph}


def test_corrupt_versions_never_replace_the_good_one(deployment):
    d = deployment
    good = d.root / "models" / "swap" / "1"
    assert served_version(d) == 1
    for version, (what, corrupt) in enumerate(corrupt_copies(good).items(), start=11):
        tmp = d.root / "models" / "swap" / f".tmp-{version}"
        shutil.copytree(good, tmp)
        corrupt(tmp)
        os.rename(tmp, tmp.with_name(str(version)))
        wait_for(lambda: status(d, "swap").get(version, (0, 0))[0] == END, what=f"{what} (v{version}) to fail")
        assert status(d, "swap")[version][1] != 0, what  # END with the load error
        assert status(d, "swap")[1][0] == AVAILABLE and served_version(d) == 1, what
        shutil.rmtree(tmp.with_name(str(version)))  # as an operator would, before the next try


def test_sigkill_during_export_leaves_no_version_behind(deployment):
    d = deployment
    model_dir = d.root / "models" / "swap"
    before = sorted(p.name for p in model_dir.iterdir() if p.name.isdigit())
    command = [sys.executable, "-m", "export", "--model", str(d.root / "tiny.keras"), "--base-dir",
               str(d.root / "models"), "--name", "swap", "--version", "2"]
    # SIGKILL at the worst moment, deterministically: everything written, the atomic rename not yet done
    # (a kill from outside races a tiny model's export, which can finish between two polls).
    kill_before_rename = ("import os, runpy, signal, sys; os.rename = lambda *a: os.kill(os.getpid(), signal.SIGKILL); "
                          "sys.argv[0] = 'export'; runpy.run_module('export', run_name='__main__')")
    with open(d.root / "export.log", "wb") as log:
        export = subprocess.run([sys.executable, "-c", kill_before_rename, *command[3:]], cwd=REPO, stdout=log,
                                stderr=subprocess.STDOUT, timeout=300)
    assert export.returncode == -signal.SIGKILL, (d.root / "export.log").read_text()[-3000:]
    assert any(model_dir.glob(".tmp-2-*"))  # the half-made version is there, under a name no server loads
    assert sorted(p.name for p in model_dir.iterdir() if p.name.isdigit()) == before
    time.sleep(1.0)  # several polls: the half-written temp directory is never a version
    assert 2 not in status(d, "swap") and served_version(d) == 1

    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)  # a clean retry
    assert done.returncode == 0, done.stderr[-2000:]
    wait_for(lambda: status(d, "swap").get(2, (0, 0))[0] == AVAILABLE, what="v2 to load")
    wait_for(lambda: served_version(d) == 2, what="v2 to serve")


def test_sigkill_during_training_then_resume_continues_from_the_last_epoch(tmp_path):
    out = tmp_path / "runs"
    command = [sys.executable, "pipelines/train.py", "--dataset", "pipelines/examples", "--model", "git",
               "--preset", "tiny", "--epochs", "3", "--time-budget", "0", "--vocab-size", "200", "--out", str(out)]
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: first.poll() is not None or any(
            len(h.read_text().splitlines()) >= 3 for h in out.glob("*/git/history.csv")), 600, "epoch 2 to end")
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    assert not (run / "git" / "model.keras").exists()
    killed_at = len((run / "git" / "history.csv").read_text().splitlines()) - 1  # finished epochs

    resumed = subprocess.run(command[:2] + ["--resume", str(run)], cwd=REPO, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"Epoch {killed_at + 1}/3" in resumed.stdout and "Epoch 1/3" not in resumed.stdout
    epochs = [int(line.split(",")[0]) for line in (run / "git" / "history.csv").read_text().splitlines()[1:]]
    assert epochs == [0, 1, 2], epochs  # each epoch once, none repeated or lost
    assert (run / "git" / "model.keras").is_file() and (run / "report.md").is_file()


TINY_IMAGES = {"image_size": 8, "channels": 1, "resize": "stretch", "mean": [0.0], "std": [1.0]}


def epoch_orders(dataset, epochs: int) -> list[list[bytes]]:
    return [[c for batch in dataset for c in batch["captions"].numpy()] for _ in range(epochs)]


def test_resumed_run_sees_the_data_order_of_the_epoch_it_resumes_at():
    from pipelines.dataset import make_dataset
    from pipelines.rocov2 import read_split

    records, _ = read_split(REPO / "pipelines" / "examples", "train")

    def dataset(epoch=0):
        return make_dataset(records, TINY_IMAGES, 4, training=True, seed=0, augment=False, epoch=epoch)

    uninterrupted = epoch_orders(dataset(), 3)
    assert uninterrupted[0] != uninterrupted[1] != uninterrupted[2]  # reshuffled every epoch
    assert sorted(uninterrupted[0]) == sorted(uninterrupted[2])  # each epoch is one full pass
    assert epoch_orders(dataset(epoch=2), 1)[0] == uninterrupted[2]  # a process resuming at epoch 3
    assert epoch_orders(dataset(), 1)[0] == uninterrupted[0]  # and the same in every process


def test_fit_resumed_at_an_epoch_reads_that_epochs_batches():
    """Through Keras `fit()` as `pipelines/train.py` drives it: the `EpochOrder` callback, `initial_epoch`."""
    import keras
    import tensorflow as tf

    from pipelines.dataset import EpochOrder, epoch_variable, make_dataset
    from pipelines.rocov2 import read_split

    records, _ = read_split(REPO / "pipelines" / "examples", "train")
    seen: list[bytes] = []

    def fit(initial_epoch: int) -> list[bytes]:
        seen.clear()
        counter = epoch_variable()
        ds = make_dataset(records, TINY_IMAGES, 4, training=True, seed=3, augment=False, epoch=counter)

        def labelled(batch):  # records the captions in the order the model is fed them
            record = tf.py_function(lambda c: seen.extend(c.numpy()) or 0.0, [batch["captions"]], tf.float32)
            return batch["images"], tf.zeros(tf.shape(batch["captions"])) + tf.ensure_shape(record, ())

        model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Flatten(), keras.layers.Dense(1)])
        model.compile("sgd", "mse")
        model.fit(ds.map(labelled), epochs=3, initial_epoch=initial_epoch, callbacks=[EpochOrder(counter)], verbose=0)
        return list(seen)

    whole, resumed = fit(0), fit(2)
    assert len(whole) == 3 * len(records) and len(resumed) == len(records)
    assert resumed == whole[2 * len(records):]


def test_metrics_keep_a_bounded_number_of_label_sets():
    from serving.metrics import MAX_SERIES, OVERFLOW, ServingMetrics

    metrics = ServingMetrics()
    for i in range(MAX_SERIES + 500):  # a client trying random model names
        metrics.request_count.inc(f"model-{i}", "serving_default", "predict", "GRPC", "NOT_FOUND")
        metrics.request_latency.observe(10.0, f"model-{i}", "predict", "GRPC")
    assert len(metrics.request_count._cells) == len(metrics.request_latency._cells) == MAX_SERIES + 1
    assert metrics.request_count.value(*[OVERFLOW] * 5) == 500
    assert metrics.request_count.value("model-0", "serving_default", "predict", "GRPC", "NOT_FOUND") == 1
