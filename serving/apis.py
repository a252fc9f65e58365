"""The TensorFlow Serving protos and gRPC stubs, imported without starting TensorFlow.

`tensorflow_serving.apis.*_pb2` import `tensorflow.core.framework.tensor_pb2` and friends, and
importing any `tensorflow.*` module runs `tensorflow/__init__.py`: seconds of start-up and the
whole runtime in memory, for a client that only needs protobuf classes. When TensorFlow is not
imported yet, this module loads those generated `_pb2` files under their real names behind a
temporary empty `tensorflow` package, then takes the placeholder away again, so a later
`import tensorflow` runs normally and shares the very same message classes (so
`tf.make_tensor_proto` output still fits a `PredictRequest`; TensorFlow's own __init__ deletes
its `core` and `compiler` attributes anyway). If TensorFlow is already imported, this is a plain
import.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def _import_without_tensorflow(names: list[str]) -> list[types.ModuleType]:
    """Import `names` with a placeholder `tensorflow` package so its __init__ never runs."""
    spec = importlib.util.find_spec("tensorflow")
    if spec is None or not spec.submodule_search_locations:
        return [importlib.import_module(n) for n in names]
    placeholder = types.ModuleType("tensorflow")
    placeholder.__path__ = list(spec.submodule_search_locations)
    sys.modules["tensorflow"] = placeholder
    try:
        modules = [importlib.import_module(n) for n in names]
    finally:
        if sys.modules.get("tensorflow") is placeholder:
            del sys.modules["tensorflow"]
    return modules


_MODULES = [
    "tensorflow_serving.apis.predict_pb2",
    "tensorflow_serving.apis.get_model_metadata_pb2",
    "tensorflow_serving.apis.get_model_status_pb2",
    "tensorflow_serving.apis.model_management_pb2",
    "tensorflow_serving.apis.model_pb2",
    "tensorflow_serving.apis.prediction_service_pb2_grpc",
    "tensorflow_serving.apis.model_service_pb2_grpc",
    "tensorflow_serving.config.model_server_config_pb2",
    "tensorflow_serving.apis.status_pb2",
    "tensorflow.core.framework.tensor_pb2",
    "tensorflow.core.framework.tensor_shape_pb2",
    "tensorflow.core.framework.types_pb2",
    "tensorflow.core.protobuf.meta_graph_pb2",
    "tensorflow.core.protobuf.saved_model_pb2",
    "tensorflow.core.protobuf.error_codes_pb2",
]

if "tensorflow" in sys.modules:
    _loaded = [importlib.import_module(n) for n in _MODULES]
else:
    _loaded = _import_without_tensorflow(_MODULES)

(
    predict_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_management_pb2,
    model_pb2,
    prediction_service_pb2_grpc,
    model_service_pb2_grpc,
    model_server_config_pb2,
    status_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
    meta_graph_pb2,
    saved_model_pb2,
    error_codes_pb2,
) = _loaded

__all__ = [
    "predict_pb2", "get_model_metadata_pb2", "get_model_status_pb2", "model_management_pb2", "model_pb2",
    "prediction_service_pb2_grpc", "model_service_pb2_grpc", "model_server_config_pb2", "status_pb2",
    "tensor_pb2", "tensor_shape_pb2", "types_pb2", "meta_graph_pb2", "saved_model_pb2", "error_codes_pb2",
]
