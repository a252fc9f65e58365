"""TF Serving's batching, monitoring and SSL config messages, built at runtime, and text-proto parsing.

The tensorflow-serving-api wheel ships `model_server_config_pb2` but not
`session_bundle_config.proto` (BatchingParameters), `monitoring_config.proto` or
`ssl_config.proto`. Here they are declared field for field as in TF Serving (package
`tensorflow.serving`, same names, numbers, types and google.protobuf wrappers), in a private
descriptor pool, so a text-format file parses here exactly as the real server parses it:
an unknown field or a wrong type is an error on the same line.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, text_format, wrappers_pb2

from serving.apis import model_server_config_pb2

_F = descriptor_pb2.FieldDescriptorProto
PACKAGE = "tensorflow.serving"


class ConfigError(ValueError):
    """A config file that is missing or does not parse; the message names the file and the problem."""


def _field(name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> _F:
    """One field declaration (optional unless repeated)."""
    label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
    field = _F(name=name, number=number, type=kind, label=label)
    if type_name:
        field.type_name = type_name
    return field


def _message(name: str, *fields: _F) -> descriptor_pb2.DescriptorProto:
    """One message declaration."""
    return descriptor_pb2.DescriptorProto(name=name, field=list(fields))


def _file(name: str, messages: list[descriptor_pb2.DescriptorProto], deps=()) -> descriptor_pb2.FileDescriptorProto:
    """A proto3 file in package tensorflow.serving."""
    return descriptor_pb2.FileDescriptorProto(
        name=name, package=PACKAGE, syntax="proto3", dependency=list(deps), message_type=messages
    )


_INT64 = ".google.protobuf.Int64Value"
_STRING = ".google.protobuf.StringValue"
_MSG, _I64, _STR, _BOOL = _F.TYPE_MESSAGE, _F.TYPE_INT64, _F.TYPE_STRING, _F.TYPE_BOOL

_FILES = [
    # tensorflow_serving/servables/tensorflow/session_bundle_config.proto (BatchingParameters only:
    # SessionBundleConfig needs TensorFlow's ConfigProto and is not a file the model server reads).
    _file(
        "tensorflow_serving/servables/tensorflow/session_bundle_config.proto",
        [
            _message(
                "BatchingParameters",
                _field("max_batch_size", 1, _MSG, _INT64),
                _field("batch_timeout_micros", 2, _MSG, _INT64),
                _field("max_enqueued_batches", 3, _MSG, _INT64),
                _field("num_batch_threads", 4, _MSG, _INT64),
                _field("thread_pool_name", 5, _MSG, _STRING),
                _field("allowed_batch_sizes", 6, _I64, repeated=True),
                _field("pad_variable_length_inputs", 7, _BOOL),
            )
        ],
        deps=["google/protobuf/wrappers.proto"],
    ),
    # tensorflow_serving/config/monitoring_config.proto
    _file(
        "tensorflow_serving/config/monitoring_config.proto",
        [
            _message("PrometheusConfig", _field("enable", 1, _BOOL), _field("path", 2, _STR)),
            _message("MonitoringConfig", _field("prometheus_config", 1, _MSG, f".{PACKAGE}.PrometheusConfig")),
        ],
    ),
    # tensorflow_serving/config/ssl_config.proto
    _file(
        "tensorflow_serving/config/ssl_config.proto",
        [
            _message(
                "SSLConfig",
                _field("server_key", 1, _STR),
                _field("server_cert", 2, _STR),
                _field("custom_ca", 3, _STR),
                _field("client_verify", 4, _BOOL),
            )
        ],
    ),
]

POOL = descriptor_pool.DescriptorPool()
POOL.Add(descriptor_pb2.FileDescriptorProto.FromString(wrappers_pb2.DESCRIPTOR.serialized_pb))
for _proto in _FILES:
    POOL.Add(_proto)

BatchingParameters = message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.BatchingParameters"))
PrometheusConfig = message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.PrometheusConfig"))
MonitoringConfig = message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.MonitoringConfig"))
SSLConfig = message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"{PACKAGE}.SSLConfig"))
ModelServerConfig = model_server_config_pb2.ModelServerConfig

DEFAULT_PROMETHEUS_PATH = "/monitoring/prometheus/metrics"  # PrometheusExporter::kPrometheusPath


def parse_text(text: str, message_class, source: str = "<string>"):
    """Parse a text-format proto; ConfigError('Error parsing text-format tensorflow.serving.X ...')."""
    message = message_class()
    try:
        text_format.Parse(text, message)
    except text_format.ParseError as e:
        raise ConfigError(f"Error parsing text-format {message.DESCRIPTOR.full_name} from {source}: {e}") from None
    return message


def parse_text_file(path: str | Path, message_class):
    """Read and parse a text-format proto file; ConfigError when it is missing or malformed."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        name = message_class.DESCRIPTOR.full_name
        raise ConfigError(f"Cannot read {name} file {path}: {e.__class__.__name__}: {e}") from None
    return parse_text(text, message_class, str(path))
