"""TF Serving's REST API (and the Prometheus page) on the REST port.

    GET  /v1/models/NAME[/versions/N | /labels/L]            model status
    GET  /v1/models/NAME[/versions/N | /labels/L]/metadata   SignatureDefs
    POST /v1/models/NAME[/versions/N | /labels/L]:predict    {"instances": [...]} or {"inputs": ...}
    GET  <prometheus path>                                   metrics, when monitoring is enabled

Row format (`instances`) answers `predictions`, columnar format (`inputs`) answers `outputs`.
Binary strings travel as {"b64": "..."}; string outputs are returned as text unless their name
ends in `_bytes` or they are not valid UTF-8. Errors are {"error": "..."} with the HTTP status TF
Serving uses for the gRPC code (400 INVALID_ARGUMENT, 404 NOT_FOUND, 503 UNAVAILABLE, ...).
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

import grpc
import numpy as np
from google.protobuf import json_format

from serving import errors, tensors
from serving.apis import get_model_metadata_pb2, get_model_status_pb2, model_pb2, predict_pb2
from serving.core import SIGNATURE_DEF_FIELD, ServingCore
from serving.model_manager import DEFAULT_SIGNATURE

logger = logging.getLogger("serving.rest")

_SPEC = r"/v1/models/([^/:]+)(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?"
PREDICT_PATH = re.compile(_SPEC + r":(classify|regress|predict)", re.IGNORECASE)
STATUS_PATH = re.compile(r"/v1/models(?:/([^/:]+))?(?:(?:/versions/(\d+))|(?:/labels/([^/:]+)))?(?:/(metadata))?",
                         re.IGNORECASE)
B64 = "b64"


# --- JSON <-> numpy -----------------------------------------------------------------------------


def _is_b64(value) -> bool:
    return isinstance(value, dict) and set(value) == {B64}


def _leaf(value, dtype: int, alias: str):
    """One JSON scalar as a tensor element of `dtype`."""
    if dtype == tensors.DT.DT_STRING:
        if _is_b64(value):
            try:
                return base64.b64decode(value[B64], validate=True)
            except (binascii.Error, TypeError, ValueError):
                raise errors.invalid(f"Input '{alias}': the 'b64' value is not valid base64.") from None
        if isinstance(value, str):
            return value.encode("utf-8")
        raise errors.invalid(f"Input '{alias}' is a string tensor: expected a string or {{\"b64\": ...}}, got "
                             f"{type(value).__name__}.")
    if (isinstance(value, bool) and dtype != tensors.DT.DT_BOOL) or not isinstance(value, (int, float, bool)):
        raise errors.invalid(f"Input '{alias}' expects {tensors.dtype_name(dtype)} values, got {json.dumps(value)}.")
    return value


def _flatten(value, dtype: int, alias: str) -> tuple[tuple[int, ...], list]:
    """A nested JSON list -> (shape, flat elements); INVALID_ARGUMENT when ragged."""
    if not isinstance(value, list):
        return (), [_leaf(value, dtype, alias)]
    if not value:
        return (0,), []
    parts = [_flatten(v, dtype, alias) for v in value]
    shapes = {p[0] for p in parts}
    if len(shapes) != 1:
        raise errors.invalid(f"Input '{alias}' is ragged: its lists have different lengths or depths.")
    return (len(value), *parts[0][0]), [x for p in parts for x in p[1]]


def json_to_tensor(value, dtype: int, alias: str):
    """A JSON value (nested lists) -> TensorProto of the signature's dtype."""
    shape, flat = _flatten(value, dtype, alias)
    if dtype == tensors.DT.DT_STRING:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
    else:
        try:
            array = np.asarray(flat, dtype=tensors.numpy_dtype(dtype))
        except (ValueError, OverflowError) as e:
            raise errors.invalid(f"Input '{alias}': {e}") from None
    return tensors.make_tensor_proto(array.reshape(shape), dtype)


def _json_value(value, alias: str):
    """A numpy element or nested list of them -> JSON-ready Python values (strings as text or b64)."""
    if isinstance(value, list):
        return [_json_value(v, alias) for v in value]
    if isinstance(value, bytes):
        if not alias.endswith("_bytes"):
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                pass
        return {B64: base64.b64encode(value).decode("ascii")}
    return value


def tensor_to_json(proto, alias: str):
    """A TensorProto -> nested Python lists / scalars for JSON."""
    array = tensors.make_ndarray(proto)
    return _json_value(array.tolist(), alias)


def parse_predict_body(body: bytes, signature_inputs) -> tuple[dict, bool, str]:
    """A :predict body -> ({alias: JSON value}, row_format, signature_name); INVALID_ARGUMENT if malformed."""
    try:
        doc = json.loads(body or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise errors.invalid(f"JSON Parse error: {e}") from None
    if not isinstance(doc, dict):
        raise errors.invalid("The request body must be a JSON object with 'instances' or 'inputs'.")
    if ("instances" in doc) == ("inputs" in doc):
        raise errors.invalid("Missing 'inputs' or 'instances' key" if "inputs" not in doc else
                             "Not allowed to specify both 'inputs' and 'instances' keys")
    aliases = sorted(signature_inputs(doc.get("signature_name") or DEFAULT_SIGNATURE))
    columns: dict = {}
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise errors.invalid("'instances' must be a list.")
        if not instances:
            raise errors.invalid("Empty batch: 'instances' is an empty list; send at least one.")
        named = all(isinstance(i, dict) and not _is_b64(i) for i in instances)
        if len(aliases) == 1 and not named:
            columns = {aliases[0]: instances}
        elif named:
            for index, instance in enumerate(instances):
                if set(instance) != set(aliases):
                    raise errors.invalid(f"instances[{index}] has keys {sorted(instance)}, expected {aliases}.")
            columns = {a: [i[a] for i in instances] for a in aliases}
        else:
            raise errors.invalid(f"The signature has several inputs ({', '.join(aliases)}): each instance must be an "
                                 "object naming them.")
    else:
        inputs = doc["inputs"]
        if isinstance(inputs, dict) and not _is_b64(inputs):
            columns = inputs
        elif len(aliases) == 1:
            columns = {aliases[0]: inputs}
        else:
            raise errors.invalid(f"'inputs' must be an object naming the inputs {aliases}.")
    return columns, "instances" in doc, doc.get("signature_name") or ""


def predict_response_json(response: predict_pb2.PredictResponse, row_format: bool) -> dict:
    """{"predictions": [...]} (row format) or {"outputs": ...} (columnar), like TF Serving."""
    outputs = {alias: tensor_to_json(proto, alias) for alias, proto in sorted(response.outputs.items())}
    if not row_format:
        return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}
    sizes = {len(v) if isinstance(v, list) else -1 for v in outputs.values()}
    if len(sizes) != 1 or -1 in sizes:
        raise errors.invalid("Row format needs every output to have the same batch size; use the columnar "
                             "format ('inputs') for this signature.")
    if len(outputs) == 1:
        return {"predictions": next(iter(outputs.values()))}
    rows = sizes.pop()
    return {"predictions": [{alias: values[i] for alias, values in outputs.items()} for i in range(rows)]}


# --- HTTP ---------------------------------------------------------------------------------------


class RestApi:
    """Routes REST requests to a ServingCore; returns (HTTP status, content type, body bytes)."""

    def __init__(self, core: ServingCore, prometheus_path: str | None = None, timeout: float = 30.0):
        self.core, self.prometheus_path, self.timeout = core, prometheus_path, timeout

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, str, bytes]:
        """Answer one request; errors become {"error": ...} with TF Serving's HTTP status."""
        path = path.split("?", 1)[0]
        if method == "GET" and self.prometheus_path and path == self.prometheus_path:
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.core.metrics.render().encode()
        try:
            if not path.lower().startswith("/v1/"):
                raise errors.not_found(f"Not found: {path} (the REST API is under /v1/models/)")
            result = self._route(method, path, body)
            return 200, "application/json", json.dumps(result, indent=1).encode()
        except errors.ServingError as e:
            return e.http_status, "application/json", json.dumps({"error": e.message}).encode()

    def _route(self, method: str, path: str, body: bytes) -> dict:
        if method == "POST" and (match := PREDICT_PATH.fullmatch(path)):
            spec = self._spec(*match.groups()[:3])
            if match.group(4).lower() != "predict":
                raise errors.ServingError(grpc.StatusCode.UNIMPLEMENTED,
                                          f"The {match.group(4)} API is not implemented by this server; use :predict.")
            return self.predict(spec, body)
        if method == "GET" and (match := STATUS_PATH.fullmatch(path)):
            if not match.group(1):
                raise errors.invalid("Missing model name in request.")
            spec = self._spec(*match.groups()[:3])
            if match.group(4):
                return self.metadata(spec)
            request = get_model_status_pb2.GetModelStatusRequest(model_spec=spec)
            return json_format.MessageToDict(self.core.get_model_status(request), preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        raise errors.invalid(f"Malformed request: {method} {path}")

    @staticmethod
    def _spec(name: str, version: str | None, label: str | None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=unquote(name))
        if version:
            spec.version.value = int(version)
        elif label:
            spec.version_label = unquote(label)
        return spec

    def predict(self, spec: model_pb2.ModelSpec, body: bytes) -> dict:
        """:predict in row or columnar format."""
        servable = self.core.resolve(spec)

        def signature_inputs(signature_name: str):
            return servable.signature(signature_name).inputs

        columns, row_format, signature_name = parse_predict_body(body, signature_inputs)
        signature = servable.signature(signature_name or DEFAULT_SIGNATURE)
        request = predict_pb2.PredictRequest()
        request.model_spec.CopyFrom(spec)
        request.model_spec.version.value = servable.version  # the version just resolved, even for a label
        request.model_spec.signature_name = signature_name
        for alias, value in columns.items():
            if alias not in signature.inputs:
                raise errors.invalid(f"input tensor alias not found in signature: {alias}. Inputs expected to be in "
                                     f"the set {{{','.join(sorted(signature.inputs))}}}.")
            request.inputs[alias].CopyFrom(json_to_tensor(value, signature.inputs[alias].dtype, alias))
        response = self.core.predict(request, entrypoint="REST", timeout=self.timeout)
        return predict_response_json(response, row_format)

    def metadata(self, spec: model_pb2.ModelSpec) -> dict:
        """{"model_spec": ..., "metadata": {"signature_def": ...}} as TF Serving writes it."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(model_spec=spec, metadata_field=[SIGNATURE_DEF_FIELD])
        response = self.core.get_model_metadata(request, entrypoint="REST")
        signature_defs = get_model_metadata_pb2.SignatureDefMap()
        response.metadata[SIGNATURE_DEF_FIELD].Unpack(signature_defs)
        options = dict(preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
        return {"model_spec": json_format.MessageToDict(response.model_spec, **options),
                "metadata": {SIGNATURE_DEF_FIELD: json_format.MessageToDict(signature_defs, **options)}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "medcap-serving"
    api: RestApi
    max_body: int

    def _answer(self, method: str) -> None:
        started = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.max_body:
            status, kind = 413, "application/json"
            payload = json.dumps({"error": f"Request body of {length} bytes is over the {self.max_body}-byte "
                                           "limit."}).encode()
            self.close_connection = True
        else:
            body = self.rfile.read(length) if length else b""
            status, kind, payload = self.api.handle(method, self.path, body)
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        logger.debug("%s %s -> %d in %.1f ms", method, self.path, status, (time.monotonic() - started) * 1e3)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._answer("POST")

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: requests are logged at debug
        pass


class RestServer:
    """The REST API on host:port in background threads."""

    def __init__(self, api: RestApi, host: str, port: int, max_body_bytes: int):
        handler = type("Handler", (_Handler,), {"api": api, "max_body": max_body_bytes})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="rest", daemon=True)

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting requests and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()
