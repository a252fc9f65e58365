"""The API behind both front doors (gRPC and REST): Predict, GetModelMetadata, GetModelStatus, reload.

Requests are checked against the SignatureDef the way TF Serving checks them (input names,
dtypes, ranks, output_filter), so a bad request is INVALID_ARGUMENT and an unknown model,
version, label or signature is NOT_FOUND, with a message that says what was expected. The
model call goes through the batcher when batching is on. Every call is counted in the metrics.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from serving import errors, tensors
from serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    predict_pb2,
    status_pb2,
)
from serving.batcher import BatchScheduler
from serving.metrics import ServingMetrics
from serving.model_manager import DEFAULT_SIGNATURE, ModelManager, Servable

logger = logging.getLogger("serving.core")

SIGNATURE_DEF_FIELD = "signature_def"


def spec_choice(spec: model_pb2.ModelSpec) -> tuple[int | None, str | None]:
    """(version, label) requested by a ModelSpec; both None for the latest version."""
    which = spec.WhichOneof("version_choice")
    if which == "version":
        return int(spec.version.value), None
    if which == "version_label":
        return None, spec.version_label
    return None, None


def _shape_text(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _expected_shape(info) -> list[int] | None:
    """A TensorInfo's shape as a list (-1 unknown), None for unknown rank."""
    if info.tensor_shape.unknown_rank:
        return None
    return [int(d.size) for d in info.tensor_shape.dim]


def check_inputs(signature, request_inputs) -> dict[str, np.ndarray]:
    """TensorProtos -> numpy arrays, checked against the signature; INVALID_ARGUMENT on any mismatch."""
    expected, sent = set(signature.inputs), set(request_inputs)
    if expected != sent:
        extra, missing = sorted(sent - expected), sorted(expected - sent)
        if extra:
            raise errors.invalid(f"input tensor alias not found in signature: {', '.join(extra)}. Inputs expected "
                                 f"to be in the set {{{','.join(sorted(expected))}}}.")
        raise errors.invalid(f"input size does not match signature: {len(sent)}!={len(expected)} "
                             f"len({{{','.join(sorted(sent))}}}) != len({{{','.join(sorted(expected))}}}). "
                             f"Missing but required: {{{','.join(missing)}}}.")
    arrays = {}
    for alias in sorted(expected):
        info, proto = signature.inputs[alias], request_inputs[alias]
        if proto.dtype != info.dtype:
            raise errors.invalid(f"Expects input '{alias}' to be {tensors.dtype_name(info.dtype)} but "
                                 f"{tensors.dtype_name(proto.dtype)} is provided.")
        try:
            array = tensors.make_ndarray(proto)
        except ValueError as e:
            raise errors.invalid(f"Input '{alias}' is not a valid tensor: {e}") from None
        want = _expected_shape(info)
        if want is not None and (len(want) != array.ndim
                                 or any(w not in (-1, g) for w, g in zip(want, array.shape))):
            raise errors.invalid(f"Input '{alias}' has shape {_shape_text(array.shape)} but the signature expects "
                                 f"{_shape_text(want)} (rank {len(want)}).")
        if want and want[0] == -1 and array.shape[0] == 0:
            raise errors.invalid(f"Empty batch: input '{alias}' has no rows; send at least one.")
        arrays[alias] = array
    return arrays


def check_output_filter(signature, output_filter) -> list[str]:
    """The output aliases to return: output_filter (checked) or all the signature's outputs."""
    seen = []
    for alias in output_filter:
        if alias not in signature.outputs:
            raise errors.invalid(f"output tensor alias not found in signature: {alias} Outputs expected to be in "
                                 f"the set {{{','.join(sorted(signature.outputs))}}}.")
        if alias in seen:
            raise errors.invalid(f"duplicate output tensor alias: {alias}")
        seen.append(alias)
    return seen or sorted(signature.outputs)


def batch_rows(signature, arrays: dict[str, np.ndarray]) -> int | None:
    """The common batch size when every input is batch-major (first dim -1), else None (not batchable)."""
    rows = set()
    for alias, array in arrays.items():
        want = _expected_shape(signature.inputs[alias])
        if not want or want[0] != -1 or array.ndim == 0:
            return None
        rows.add(array.shape[0])
    if len(rows) != 1:
        return None
    return rows.pop()


class ServingCore:
    """Predict / metadata / status / reload over a ModelManager, optionally batching model calls."""

    def __init__(self, manager: ModelManager, batcher: BatchScheduler | None = None,
                 metrics: ServingMetrics | None = None):
        self.manager, self.batcher = manager, batcher
        self.metrics = metrics or manager.metrics

    # --- Predict --------------------------------------------------------------------------------

    def predict(self, request: predict_pb2.PredictRequest, entrypoint: str = "GRPC",
                timeout: float | None = None) -> predict_pb2.PredictResponse:
        """Run a signature on the request's inputs; outputs as TensorProtos (TF Serving's AsProtoField)."""
        started = time.monotonic()
        spec = request.model_spec
        signature_name = spec.signature_name or DEFAULT_SIGNATURE
        status = "OK"
        try:
            servable = self.resolve(spec)
            signature = servable.signature(signature_name)
            arrays = check_inputs(signature, request.inputs)
            aliases = check_output_filter(signature, request.output_filter)
            outputs = self._run(servable, signature_name, signature, arrays, timeout)
            response = predict_pb2.PredictResponse()
            response.model_spec.name = spec.name
            response.model_spec.version.value = servable.version
            response.model_spec.signature_name = signature_name
            for alias in aliases:
                dtype = signature.outputs[alias].dtype
                response.outputs[alias].CopyFrom(tensors.make_tensor_proto(outputs[alias], dtype))
            return response
        except errors.ServingError as e:
            status = e.code.name
            raise
        finally:
            self.metrics.request_count.inc(spec.name, signature_name, "predict", entrypoint, status)
            self.metrics.request_latency.observe((time.monotonic() - started) * 1e6, spec.name, "predict",
                                                 entrypoint)

    def resolve(self, spec: model_pb2.ModelSpec) -> Servable:
        """The servable a ModelSpec asks for (NOT_FOUND otherwise)."""
        if not spec.name:
            raise errors.invalid("Missing model name in request (model_spec.name).")
        version, label = spec_choice(spec)
        return self.manager.resolve(spec.name, version, label)

    def _run(self, servable: Servable, signature_name: str, signature, arrays: dict[str, np.ndarray],
             timeout: float | None) -> dict[str, np.ndarray]:
        """One model call, through the batcher when possible."""
        labels = (servable.name, signature_name)

        def runner(inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            started = time.monotonic()
            try:
                return servable.run(signature_name, inputs)
            except errors.ServingError:
                raise
            except Exception as e:  # noqa: BLE001 - TensorFlow errors keep their code
                raise errors.from_exception(e) from None
            finally:
                self.metrics.runtime_latency.observe((time.monotonic() - started) * 1e6, servable.name, "predict",
                                                     "TF2")

        rows = batch_rows(signature, arrays) if self.batcher is not None else None
        if rows is None:
            return runner(arrays)
        inner = tuple((alias, a.dtype.str, a.shape[1:]) for alias, a in sorted(arrays.items()))
        key = (servable.name, servable.version, id(servable), signature_name, inner)
        return self.batcher.submit(key, runner, arrays, labels, timeout)

    # --- metadata and status --------------------------------------------------------------------

    def get_model_metadata(self, request: get_model_metadata_pb2.GetModelMetadataRequest,
                           entrypoint: str = "GRPC") -> get_model_metadata_pb2.GetModelMetadataResponse:
        """The SignatureDefMap of the requested version, packed in metadata['signature_def']."""
        started, status = time.monotonic(), "OK"
        name = request.model_spec.name
        try:
            if not request.metadata_field:
                raise errors.invalid("GetModelMetadataRequest must specify at least one metadata_field")
            for field in request.metadata_field:
                if field != SIGNATURE_DEF_FIELD:
                    raise errors.invalid(f"Metadata field {field} is not supported")
            servable = self.resolve(request.model_spec)
            response = get_model_metadata_pb2.GetModelMetadataResponse()
            response.model_spec.name = name
            response.model_spec.version.value = servable.version
            response.metadata[SIGNATURE_DEF_FIELD].Pack(servable.signature_def_map())
            return response
        except errors.ServingError as e:
            status = e.code.name
            raise
        finally:
            self.metrics.request_count.inc(name, "", "metadata", entrypoint, status)
            self.metrics.request_latency.observe((time.monotonic() - started) * 1e6, name, "metadata", entrypoint)

    def get_model_status(self, request: get_model_status_pb2.GetModelStatusRequest
                         ) -> get_model_status_pb2.GetModelStatusResponse:
        """Every version's state and status (or the requested version's / label's)."""
        if not request.HasField("model_spec"):
            raise errors.invalid("Missing ModelSpec")
        version, label = spec_choice(request.model_spec)
        states = self.manager.version_states(request.model_spec.name, version, label)
        response = get_model_status_pb2.GetModelStatusResponse()
        for state in states:
            entry = response.model_version_status.add(version=state.version, state=state.state)
            entry.status.CopyFrom(status_pb2.StatusProto(error_code=state.code.value[0],
                                                         error_message=state.message))
        return response

    def reload_config(self, request: model_management_pb2.ReloadConfigRequest
                      ) -> model_management_pb2.ReloadConfigResponse:
        """Swap in request.config's model list (waiting for its new versions); ServingError if refused."""
        try:
            self.manager.reload_config(request.config)
        except errors.ServingError as e:
            logger.error("Config reload refused: %s", e.message)
            raise
        return model_management_pb2.ReloadConfigResponse(status=status_pb2.StatusProto(error_code=0))
