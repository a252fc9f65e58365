"""serving.server: what TF Serving's own server tests check, against small fake captioner SavedModels.

One server subprocess (batching + monitoring on) serves models "m" (label stable -> 1), "swap"
(versions appear while serving), "batch" (batching counts); extra ones start for config
failures. The batcher and the version policy are also tested in-process, without TensorFlow.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from base64 import b64encode
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from serving import errors
from serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_server_config_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)
from serving.batcher import BatchingOptions, BatchScheduler
from serving.model_manager import aspired_versions, scan_versions
from serving.protos import parse_text
from serving.tensors import make_ndarray, make_tensor_proto
from serving.testing import (
    REPO,
    ServerProcess,
    copy_version,
    jpeg_bytes,
    png_bomb,
    png_bytes,
    write_broken_version,
    write_fake_captioner,
)

PNG = png_bytes(128)
AVAILABLE, END = get_model_status_pb2.ModelVersionStatus.AVAILABLE, get_model_status_pb2.ModelVersionStatus.END

MODEL = """
  config {{
    name: "{name}"
    base_path: "/models/{name}"
    model_platform: "tensorflow"
    model_version_policy {{ latest {{ num_versions: 1 }} }}
    {extra}
  }}"""


def model_config(*names: str, labels: dict | None = None) -> str:
    """Text ModelServerConfig for `names` under /models (mapped with --model_base_path_root)."""
    labels = labels or {}
    blocks = []
    for name in names:
        extra = " ".join(f'version_labels {{ key: "{k}" value: {v} }}' for k, v in labels.get(name, {}).items())
        blocks.append(MODEL.format(name=name, extra=extra))
    return "model_config_list {" + "".join(blocks) + "\n}\n"


@dataclass
class Deployment:
    root: Path
    models: Path
    server: ServerProcess
    predict: prediction_service_pb2_grpc.PredictionServiceStub
    model_service: model_service_pb2_grpc.ModelServiceStub

    def rest(self, method: str, path: str, body=None) -> tuple[int, dict | str]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        request = urllib.request.Request(self.server.rest_url + path, data=data, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, text, kind = r.status, r.read().decode(), r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            status, text, kind = e.code, e.read().decode(), e.headers.get("Content-Type", "")
        return status, json.loads(text) if kind.startswith("application/json") else text

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        status, text = self.rest("GET", "/monitoring/prometheus/metrics")
        assert status == 200
        return parse_metrics(text)


def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(name, frozenset of label pairs): value}."""
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"([^\s{]+)(?:\{(.*)\})? (\S+)", line)
        if line.startswith("#") or not match:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def metric(samples: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


@pytest.fixture(scope="module")
def deployment(tmp_path_factory) -> Deployment:
    root = tmp_path_factory.mktemp("serving")
    models = root / "models"
    v1 = write_fake_captioner(models, "m", 1)
    for name in ("swap", "batch", "extra"):
        copy_version(v1, models, name, 1)
    (models / "m" / ".tmp-7-0d15ea5e").mkdir()  # an export in progress: never a version
    (models / "m" / "notes").mkdir()
    (root / "models.config").write_text(model_config("m", "swap", "batch", labels={"m": {"stable": 1}}))
    (root / "batching.config").write_text(
        "max_batch_size { value: 8 }\nbatch_timeout_micros { value: 150000 }\nmax_enqueued_batches { value: 16 }\n"
        "num_batch_threads { value: 1 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 4\nallowed_batch_sizes: 8\n")
    server = ServerProcess([
        "--model_config_file", str(root / "models.config"), "--model_base_path_root", str(models),
        "--file_system_poll_wait_seconds", "0.3", "--model_config_file_poll_wait_seconds", "1", "--enable_batching",
        "--batching_parameters_file", str(root / "batching.config"),
        "--monitoring_config_file", str(REPO / "serving/config/monitoring.config"),
    ], root / "server.log").start().wait_ready()
    channel = grpc.insecure_channel(server.grpc_address)
    yield Deployment(root, models, server, prediction_service_pb2_grpc.PredictionServiceStub(channel),
                     model_service_pb2_grpc.ModelServiceStub(channel))
    channel.close()
    assert server.stop() == 0, server.log()
    assert "Server stopped" in server.log()


def predict_request(images, model: str = "m", version: int | None = None, label: str | None = None,
                    signature: str | None = None) -> predict_pb2.PredictRequest:
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    if version is not None:
        request.model_spec.version.value = version
    if label is not None:
        request.model_spec.version_label = label
    if signature is not None:
        request.model_spec.signature_name = signature
    if images is not None:
        request.inputs["images"].CopyFrom(make_tensor_proto(np.array(images, dtype=object), 7))
    return request


def captions(response) -> list[str]:
    return [c.decode() for c in make_ndarray(response.outputs["captions"])]


def status(d: Deployment, model: str) -> dict[int, tuple[int, int, str]]:
    """{version: (state, error code, error message)}; {} when the server knows no version of the model."""
    request = get_model_status_pb2.GetModelStatusRequest()
    request.model_spec.name = model
    try:
        response = d.model_service.GetModelStatus(request, timeout=10)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return {}
        raise
    return {s.version: (s.state, s.status.error_code, s.status.error_message) for s in response.model_version_status}


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def rpc_error(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


# --- status, metadata, predict ------------------------------------------------------------------


def test_status_is_available_over_grpc_and_rest(deployment):
    assert status(deployment, "m") == {1: (AVAILABLE, 0, "")}
    code, body = deployment.rest("GET", "/v1/models/m")
    assert code == 200
    assert body == {"model_version_status": [
        {"version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    assert deployment.rest("GET", "/v1/models/m/versions/1")[0] == 200
    assert deployment.rest("GET", "/v1/models/m/labels/stable")[1]["model_version_status"][0]["version"] == "1"
    log = deployment.server.log()
    assert "Serving model m version 1" in log and "Running gRPC ModelServer at 127.0.0.1:" in log
    assert "Exporting HTTP/REST API at http://127.0.0.1:" in log


def test_metadata_is_a_packed_signature_def_map(deployment):
    request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
    request.model_spec.name = "m"
    response = deployment.predict.GetModelMetadata(request, timeout=10)
    assert response.model_spec.name == "m" and response.model_spec.version.value == 1
    assert response.metadata["signature_def"].type_url == "type.googleapis.com/tensorflow.serving.SignatureDefMap"
    signature_defs = get_model_metadata_pb2.SignatureDefMap()
    assert response.metadata["signature_def"].Unpack(signature_defs)
    default = signature_defs.signature_def["serving_default"]
    assert set(default.inputs) == {"images"} and set(default.outputs) == {"captions", "scores"}
    assert default.inputs["images"].dtype == 7 and [d.size for d in default.inputs["images"].tensor_shape.dim] == [-1]
    assert "beam_search" in signature_defs.signature_def

    code, body = deployment.rest("GET", "/v1/models/m/metadata")
    assert code == 200 and body["model_spec"]["name"] == "m" and body["model_spec"]["version"] == "1"
    rest_default = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
    assert rest_default["inputs"]["images"]["dtype"] == "DT_STRING"


def test_predict_grpc(deployment):
    response = deployment.predict.Predict(predict_request([PNG, png_bytes(0), jpeg_bytes(255)]), timeout=30)
    assert response.model_spec.name == "m" and response.model_spec.version.value == 1
    assert response.model_spec.signature_name == "serving_default"
    assert captions(response) == [f"v1 mean=0.5020 bytes={len(PNG)}", f"v1 mean=0.0000 bytes={len(png_bytes(0))}",
                                  f"v1 mean=1.0000 bytes={len(jpeg_bytes(255))}"]
    scores = make_ndarray(response.outputs["scores"])
    assert scores.dtype == np.float32 and np.allclose(scores, [128 / 255, 0.0, 1.0], atol=1e-3)
    assert list(response.outputs["scores"].float_val), "outputs are written as TF Serving does (AsProtoField)"

    request = predict_request([PNG], signature="beam_search", label="stable")
    request.output_filter.append("captions")
    response = deployment.predict.Predict(request, timeout=30)
    assert set(response.outputs) == {"captions"} and captions(response)[0].startswith("v1 beam ")
    assert response.model_spec.version.value == 1 and response.model_spec.signature_name == "beam_search"


def test_predict_rest_row_and_columnar_with_b64(deployment):
    b64 = {"b64": b64encode(PNG).decode()}
    code, body = deployment.rest("POST", "/v1/models/m:predict", {"instances": [b64, b64]})
    assert code == 200, body
    assert body["predictions"] == [{"captions": f"v1 mean=0.5020 bytes={len(PNG)}",
                                    "scores": pytest.approx(128 / 255, abs=1e-3)}] * 2
    code, body = deployment.rest("POST", "/v1/models/m/versions/1:predict",
                                 {"signature_name": "beam_search", "inputs": {"images": [b64]}})
    assert code == 200 and body["outputs"]["captions"] == [f"v1 beam mean=0.5020 bytes={len(PNG)}"]
    code, body = deployment.rest("POST", "/v1/models/m/labels/stable:predict", {"instances": [{"images": b64}]})
    assert code == 200 and len(body["predictions"]) == 1
    code, body = deployment.rest("POST", "/v1/models/m:predict", {"inputs": [b64]})
    assert code == 200 and body["outputs"]["scores"] == [pytest.approx(128 / 255, abs=1e-3)]


# --- bad requests: each is refused with the right code, and the next good one succeeds ----------

GOOD = [PNG]


def _request_with(inputs: dict, **kwargs) -> predict_pb2.PredictRequest:
    request = predict_request(None, **kwargs)
    for name, proto in inputs.items():
        request.inputs[name].CopyFrom(proto)
    return request


def _with_output_filter(request: predict_pb2.PredictRequest, *aliases: str) -> predict_pb2.PredictRequest:
    request.output_filter.extend(aliases)
    return request


BAD_GRPC = {
    "unknown model": (lambda: predict_request(GOOD, model="nope"), "NOT_FOUND", "Latest(nope)"),
    "unknown version": (lambda: predict_request(GOOD, version=99), "NOT_FOUND", "Specific(m, 99)"),
    "unknown label": (lambda: predict_request(GOOD, label="canary"), "NOT_FOUND", "label: canary"),
    "unknown signature": (lambda: predict_request(GOOD, signature="classify"), "NOT_FOUND", '"classify" not found'),
    "wrong input name": (lambda: _request_with({"image": make_tensor_proto([PNG])}), "INVALID_ARGUMENT",
                         "alias not found in signature: image"),
    "extra input": (lambda: _request_with({"images": make_tensor_proto([PNG]), "x": make_tensor_proto([1.0])}),
                    "INVALID_ARGUMENT", "x"),
    "wrong dtype": (lambda: _request_with({"images": make_tensor_proto(np.array([1.0], np.float32))}),
                    "INVALID_ARGUMENT", "to be string but float"),
    "wrong rank": (lambda: _request_with({"images": make_tensor_proto(np.array([[PNG]], dtype=object))}),
                   "INVALID_ARGUMENT", "rank 1"),
    "not an image": (lambda: predict_request([b"hello, not an image"]), "INVALID_ARGUMENT", "Not a PNG or JPEG"),
    "empty bytes": (lambda: predict_request([b""]), "INVALID_ARGUMENT", "Empty image"),
    "decompression bomb": (lambda: predict_request([png_bomb()]), "INVALID_ARGUMENT", "too large"),
    "truncated png": (lambda: predict_request([PNG[:45]]), "INVALID_ARGUMENT", ""),
    "empty batch": (lambda: predict_request([]), "INVALID_ARGUMENT", "Empty batch"),
    "unknown output": (lambda: _with_output_filter(predict_request(GOOD), "x"), "INVALID_ARGUMENT",
                       "output tensor alias not found"),
}


@pytest.mark.parametrize("case", list(BAD_GRPC))
def test_bad_grpc_request_then_good_one(deployment, case):
    make, code, text = BAD_GRPC[case]
    error = rpc_error(lambda: deployment.predict.Predict(make(), timeout=30))
    assert error.code().name == code and text in error.details(), error.details()
    assert "node" not in error.details() and "Traceback" not in error.details()
    assert captions(deployment.predict.Predict(predict_request(GOOD), timeout=30))[0].startswith("v1 ")


def test_bad_rest_requests_then_good_one(deployment):
    b64 = {"b64": b64encode(PNG).decode()}
    bad = [
        ("POST", "/v1/models/nope:predict", {"instances": [b64]}, 404),
        ("POST", "/v1/models/m/versions/99:predict", {"instances": [b64]}, 404),
        ("GET", "/v1/models/nope", None, 404),
        ("GET", "/v1/models/m/versions/99", None, 404),
        ("POST", "/v1/models/m:predict", b"{not json", 400),
        ("POST", "/v1/models/m:predict", {"instances": [{"b64": "***"}]}, 400),
        ("POST", "/v1/models/m:predict", {"instances": ["plain text is no image"]}, 400),
        ("POST", "/v1/models/m:predict", {"instances": [b64], "inputs": [b64]}, 400),
        ("POST", "/v1/models/m:predict", {"instances": []}, 400),
        ("POST", "/v1/models/m:predict", {"instances": [{"b64": b64encode(png_bomb()).decode()}]}, 400),
        ("POST", "/v1/models/m:classify", {"examples": []}, 501),
        ("GET", "/v1/nothing/here", None, 400),
    ]
    for method, path, body, want in bad:
        code, answer = deployment.rest(method, path, body)
        assert code == want and set(answer) == {"error"}, (path, body, code, answer)
        good, answer = deployment.rest("POST", "/v1/models/m:predict", {"instances": [b64]})
        assert good == 200, answer


def test_other_apis_are_unimplemented(deployment):
    from tensorflow_serving.apis import classification_pb2, regression_pb2

    for call, request in [(deployment.predict.Classify, classification_pb2.ClassificationRequest()),
                          (deployment.predict.Regress, regression_pb2.RegressionRequest())]:
        assert rpc_error(lambda: call(request, timeout=10)).code() == grpc.StatusCode.UNIMPLEMENTED
    assert captions(deployment.predict.Predict(predict_request(GOOD), timeout=30))[0].startswith("v1 ")


# --- versions while serving ---------------------------------------------------------------------


def test_new_version_replaces_old_broken_one_does_not_and_tmp_dirs_are_ignored(deployment):
    d = deployment
    assert captions(d.predict.Predict(predict_request(GOOD, model="swap"), timeout=30))[0].startswith("v1 ")
    write_fake_captioner(d.models, "swap", 2, tag="v2")  # atomic: temp dir, then rename
    wait_for(lambda: status(d, "swap").get(2, (0,))[0] == AVAILABLE, what="swap v2 AVAILABLE")
    wait_for(lambda: status(d, "swap").get(1, (0,))[0] == END, what="swap v1 unloaded")
    assert captions(d.predict.Predict(predict_request(GOOD, model="swap"), timeout=30))[0].startswith("v2 ")
    assert "Serving model swap version 2" in d.server.log()

    write_broken_version(d.models, "swap", 3)
    (d.models / "swap" / ".tmp-4-half-written").mkdir()
    (d.models / "swap" / ".tmp-4-half-written" / "saved_model.pb").write_bytes(b"partial")
    state = wait_for(lambda: status(d, "swap").get(3, (0,))[0] == END and status(d, "swap")[3],
                     what="v3 load to fail")
    assert state[1] != 0 and "saved_model.pb" in state[2]  # END with the load error
    time.sleep(1.0)  # a few more polls: the broken version must not take over, the temp dir stays ignored
    versions = status(d, "swap")
    assert versions[2][0] == AVAILABLE and 4 not in versions and 7 not in status(d, "m")
    assert captions(d.predict.Predict(predict_request(GOOD, model="swap"), timeout=30))[0].startswith("v2 ")
    code, body = d.rest("GET", "/v1/models/swap/versions/3")
    assert code == 200 and body["model_version_status"][0]["state"] == "END"
    assert body["model_version_status"][0]["status"]["error_code"] != "OK"
    assert "Failed to load model swap version 3" in d.server.log()


def test_reload_config_adds_and_removes_models(deployment):
    d = deployment
    base = d.root / "models.config"
    wanted = parse_text(model_config("m", "swap", "batch", "extra", labels={"m": {"stable": 1}}),
                        model_server_config_pb2.ModelServerConfig)
    response = d.model_service.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=wanted),
                                                         timeout=60)
    assert response.status.error_code == 0
    assert status(d, "extra") == {1: (AVAILABLE, 0, "")}
    assert captions(d.predict.Predict(predict_request(GOOD, model="extra"), timeout=30))[0].startswith("v1 ")

    duplicate = parse_text(model_config("m", "m"), model_server_config_pb2.ModelServerConfig)
    error = rpc_error(lambda: d.model_service.HandleReloadConfigRequest(
        model_management_pb2.ReloadConfigRequest(config=duplicate), timeout=30))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "multiple times" in error.details()
    assert captions(d.predict.Predict(predict_request(GOOD, model="extra"), timeout=30))[0].startswith("v1 ")

    original = parse_text(base.read_text(), model_server_config_pb2.ModelServerConfig)
    d.model_service.HandleReloadConfigRequest(model_management_pb2.ReloadConfigRequest(config=original), timeout=60)
    error = rpc_error(lambda: d.predict.Predict(predict_request(GOOD, model="extra"), timeout=30))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    assert status(d, "extra")[1][0] == END
    assert captions(d.predict.Predict(predict_request(GOOD), timeout=30))[0].startswith("v1 ")


def test_edits_of_the_config_file_are_applied(deployment):
    d = deployment
    path = d.root / "models.config"
    original = path.read_text()
    try:
        path.write_text(model_config("m", "swap", "batch", "extra", labels={"m": {"stable": 1}}))
        wait_for(lambda: status(d, "extra").get(1, (0,))[0] == AVAILABLE, what="extra added from the file")
    finally:
        path.write_text(original)
    wait_for(lambda: status(d, "extra").get(1, (0,))[0] == END, what="extra removed again")
    assert captions(d.predict.Predict(predict_request(GOOD), timeout=30))[0].startswith("v1 ")


# --- batching -----------------------------------------------------------------------------------


def test_batching_merges_concurrent_requests_and_isolates_a_bad_one(deployment):
    d = deployment
    labels = dict(model_name="batch", signature_name="serving_default")
    before = d.metrics()
    images = [png_bytes(i * 10) for i in range(16)]
    barrier = threading.Barrier(16)

    def one(image: bytes):
        barrier.wait()
        return d.predict.Predict(predict_request([image], model="batch"), timeout=60)

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, images))
    for image, response in zip(images, responses):  # each request got its own row back
        assert captions(response) == [f"v1 mean={image_mean(image):.4f} bytes={len(image)}"]
    after = d.metrics()
    calls = metric(after, ":tensorflow:serving:batching_session:tasks_per_batch_count", **labels) - \
        metric(before, ":tensorflow:serving:batching_session:tasks_per_batch_count", **labels)
    merged = metric(after, ":tensorflow:serving:batching_session:tasks_per_batch_sum", **labels) - \
        metric(before, ":tensorflow:serving:batching_session:tasks_per_batch_sum", **labels)
    assert merged == 16 and 1 <= calls < 16, (calls, merged)

    barrier = threading.Barrier(6)
    batch = [PNG] * 5 + [b"junk bytes"]

    def call(image: bytes):
        barrier.wait()
        try:
            return captions(d.predict.Predict(predict_request([image], model="batch"), timeout=60))[0]
        except grpc.RpcError as e:
            return e.code()

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, batch))
    assert results[-1] == grpc.StatusCode.INVALID_ARGUMENT
    assert all(isinstance(r, str) and r.startswith("v1 ") for r in results[:-1]), results


def image_mean(png: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(png)), np.float32).mean() / 255)


def test_prometheus_page(deployment):
    deployment.predict.Predict(predict_request(GOOD), timeout=30)
    with pytest.raises(grpc.RpcError):
        deployment.predict.Predict(predict_request(GOOD, model="nope"), timeout=30)
    code, text = deployment.rest("GET", "/monitoring/prometheus/metrics")
    assert code == 200 and "# TYPE :tensorflow:serving:request_count counter" in text
    samples = parse_metrics(text)
    assert metric(samples, ":tensorflow:serving:request_count", model_name="m", signature_name="serving_default",
                  status="OK") >= 1
    assert metric(samples, ":tensorflow:serving:request_count", model_name="nope", status="NOT_FOUND") >= 1
    assert metric(samples, ":tensorflow:serving:request_latency_count", model_name="m", API="predict") >= 1
    assert metric(samples, ":tensorflow:serving:batching_session:processed_batch_size_count", model_name="m") >= 1
    assert metric(samples, ":tensorflow:serving:model_version_available", model_name="m", version="1") == 1


# --- start-up failures (no TensorFlow is loaded before the configs are checked: these are quick) --


def _run_server(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.server", "--port", "0", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def test_bad_config_files_exit_nonzero_with_the_parse_error(tmp_path):
    bad = tmp_path / "bad.config"
    bad.write_text('model_config_list {\n  config {\n    name: "m"\n    base_pth: "/models/m"\n  }\n}\n')
    result = _run_server(["--model_config_file", str(bad)])
    assert result.returncode == 1
    assert "Error parsing text-format tensorflow.serving.ModelServerConfig" in result.stderr
    assert "4:5" in result.stderr and "base_pth" in result.stderr

    good = tmp_path / "good.config"
    good.write_text(model_config("m"))
    batching = tmp_path / "batching.config"
    batching.write_text("max_batch_size { value: 8 }\nallowed_batch_sizes: 2\nallowed_batch_sizes: 4\n")
    result = _run_server(["--model_config_file", str(good), "--enable_batching",
                          "--batching_parameters_file", str(batching)])
    assert result.returncode == 1 and "must equal max_batch_size" in result.stderr

    result = _run_server(["--model_config_file", str(tmp_path / "missing.config")])
    assert result.returncode == 1 and "missing.config" in result.stderr
    result = _run_server([])
    assert result.returncode == 1 and "nothing to serve" in result.stderr


# --- in-process: version policy and the batcher ---------------------------------------------------


def test_version_directories_and_policies(tmp_path):
    for name in ("1", "2", "10", ".tmp-11-abc", "latest", "3"):
        (tmp_path / name).mkdir()
        if name != "3":  # 3 has no saved_model.pb yet
            (tmp_path / name / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "12").write_text("a file, not a directory")
    assert sorted(scan_versions(tmp_path)) == [1, 2, 10]
    Policy = type(model_server_config_pb2.ModelConfig().model_version_policy)
    assert aspired_versions(Policy(), [1, 2, 10]) == {10}
    assert aspired_versions(parse_text("latest { num_versions: 2 }", Policy), [1, 2, 10]) == {2, 10}
    assert aspired_versions(parse_text("all {}", Policy), [1, 2, 10]) == {1, 2, 10}
    assert aspired_versions(parse_text("specific { versions: 2 versions: 5 }", Policy), [1, 2, 10]) == {2}


def _echo(calls: list):
    """A runner that records its batch sizes, fails on b'bad' rows, and returns row -> row + b'!'."""

    def run(inputs):
        rows = inputs["x"]
        calls.append(len(rows))
        if any(r == b"bad" for r in rows):
            raise errors.invalid("bad row")
        return {"y": np.array([r + b"!" for r in rows], dtype=object)}

    return run


def _submit_all(scheduler, items, key="k", runner=None, timeout=10.0):
    barrier = threading.Barrier(len(items))

    def one(item):
        barrier.wait()
        try:
            return list(scheduler.submit(key, runner, {"x": np.array(item, dtype=object)}, timeout=timeout)["y"])
        except errors.ServingError as e:
            return e.code.name

    with ThreadPoolExecutor(len(items)) as pool:
        return list(pool.map(one, items))


def test_batcher_merges_pads_splits_and_isolates_bad_members():
    calls: list[int] = []
    scheduler = BatchScheduler(BatchingOptions(max_batch_size=8, batch_timeout_micros=300_000,
                                               max_enqueued_batches=4, num_batch_threads=1,
                                               allowed_batch_sizes=(2, 4, 8)))
    try:
        items = [[b"a"], [b"b", b"c"], [b"d"], [b"e"], [b"f"]]  # 6 rows -> one call padded to 8
        assert _submit_all(scheduler, items, runner=_echo(calls)) == [[x + b"!" for x in i] for i in items]
        assert calls == [8]

        calls.clear()
        results = _submit_all(scheduler, [[b"a"], [b"bad"], [b"c"]], runner=_echo(calls))
        assert results == [[b"a!"], "INVALID_ARGUMENT", [b"c!"]]
        assert calls[0] == 4 and sorted(calls[1:]) == [2, 2, 2]  # merged call failed, then one call each
        assert scheduler.metrics.batch_split_reruns.value("", "") == 1

        with pytest.raises(errors.ServingError, match="larger than maximum"):
            scheduler.submit("k", _echo(calls), {"x": np.array([b"a"] * 9, dtype=object)})
    finally:
        scheduler.stop()


def test_batcher_queue_full_and_deadline():
    release = threading.Event()
    started = threading.Event()

    def slow(inputs):
        started.set()
        release.wait(10)
        return {"y": inputs["x"]}

    scheduler = BatchScheduler(BatchingOptions(max_batch_size=1, batch_timeout_micros=0, max_enqueued_batches=1,
                                               num_batch_threads=1))
    try:
        first = threading.Thread(target=scheduler.submit, args=("k", slow, {"x": np.array([b"1"], dtype=object)}))
        first.start()
        assert started.wait(5)  # the only batch thread is busy with the first request
        with pytest.raises(errors.ServingError) as waited:  # the second waits in the queue until its deadline
            scheduler.submit("k", slow, {"x": np.array([b"2"], dtype=object)}, timeout=0.3)
        assert waited.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        second = threading.Thread(target=lambda: scheduler.submit("k", slow, {"x": np.array([b"3"], dtype=object)}))
        second.start()
        time.sleep(0.1)
        with pytest.raises(errors.ServingError) as full:  # queue: 1 batch, already there
            scheduler.submit("k", slow, {"x": np.array([b"4"], dtype=object)}, timeout=1)
        assert full.value.code == grpc.StatusCode.UNAVAILABLE and "full" in full.value.message
        release.set()
        first.join(5)
        second.join(5)
    finally:
        release.set()
        scheduler.stop()


def test_batching_options_are_checked_like_tf_serving():
    with pytest.raises(ValueError, match="increasing"):
        BatchingOptions(max_batch_size=8, allowed_batch_sizes=(4, 2, 8)).validate()
    with pytest.raises(ValueError, match="must equal max_batch_size"):
        BatchingOptions(max_batch_size=8, allowed_batch_sizes=(2, 4)).validate()
    assert BatchingOptions(max_batch_size=8, allowed_batch_sizes=(2, 4, 8)).padded_size(3) == 4
    assert BatchingOptions(max_batch_size=8).padded_size(3) == 3
