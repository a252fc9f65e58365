"""Every file in serving/config parses as the TF Serving message it claims to be, and the runtime-built
protos declare the same fields as TF Serving's .proto files (so text parsing behaves as the real server's)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor

from serving import protos
from serving.batcher import BatchingOptions
from serving.model_manager import validate_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "serving" / "config"
COMPOSE = CONFIG_DIR.parent / "deploy" / "docker-compose.yml"
MESSAGES = {
    "models.config": protos.ModelServerConfig,
    "batching.config": protos.BatchingParameters,
    "monitoring.config": protos.MonitoringConfig,
}
F = descriptor.FieldDescriptor

# name -> (number, type, repeated, message type) as in TF Serving's .proto files.
TF_SERVING_FIELDS = {
    protos.BatchingParameters: {
        "max_batch_size": (1, F.TYPE_MESSAGE, False, "google.protobuf.Int64Value"),
        "batch_timeout_micros": (2, F.TYPE_MESSAGE, False, "google.protobuf.Int64Value"),
        "max_enqueued_batches": (3, F.TYPE_MESSAGE, False, "google.protobuf.Int64Value"),
        "num_batch_threads": (4, F.TYPE_MESSAGE, False, "google.protobuf.Int64Value"),
        "thread_pool_name": (5, F.TYPE_MESSAGE, False, "google.protobuf.StringValue"),
        "allowed_batch_sizes": (6, F.TYPE_INT64, True, None),
        "pad_variable_length_inputs": (7, F.TYPE_BOOL, False, None),
    },
    protos.MonitoringConfig: {"prometheus_config": (1, F.TYPE_MESSAGE, False, "tensorflow.serving.PrometheusConfig")},
    protos.PrometheusConfig: {"enable": (1, F.TYPE_BOOL, False, None), "path": (2, F.TYPE_STRING, False, None)},
    protos.SSLConfig: {
        "server_key": (1, F.TYPE_STRING, False, None),
        "server_cert": (2, F.TYPE_STRING, False, None),
        "custom_ca": (3, F.TYPE_STRING, False, None),
        "client_verify": (4, F.TYPE_BOOL, False, None),
    },
}


def test_every_config_file_is_known():
    assert sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_file()) == sorted(MESSAGES)


@pytest.mark.parametrize("name", sorted(MESSAGES))
def test_config_file_parses(name):
    message = protos.parse_text_file(CONFIG_DIR / name, MESSAGES[name])
    assert message.ByteSize() > 0


def test_models_config():
    config = protos.parse_text_file(CONFIG_DIR / "models.config", protos.ModelServerConfig)
    validate_config(config)
    models = {m.name: m for m in config.model_config_list.config}
    assert sorted(models) == ["cnn_gru", "git"]
    for name, model in models.items():
        assert model.base_path == f"/models/{name}" and model.model_platform == "tensorflow"
        assert model.model_version_policy.WhichOneof("policy_choice") == "latest"


def test_batching_config_is_consistent():
    params = protos.parse_text_file(CONFIG_DIR / "batching.config", protos.BatchingParameters)
    options = BatchingOptions.from_proto(params)  # raises like TF Serving on inconsistent sizes
    assert options.allowed_batch_sizes[-1] == options.max_batch_size
    assert options.batch_timeout_micros > 0 and options.num_batch_threads >= 1


def test_monitoring_config_enables_prometheus():
    config = protos.parse_text_file(CONFIG_DIR / "monitoring.config", protos.MonitoringConfig)
    assert config.prometheus_config.enable and config.prometheus_config.path == protos.DEFAULT_PROMETHEUS_PATH


def test_compose_file_mounts_existing_configs():
    referenced = set(re.findall(r"/config/([\w.]+)", COMPOSE.read_text()))
    assert referenced and referenced <= set(MESSAGES)


@pytest.mark.parametrize("message", list(TF_SERVING_FIELDS), ids=lambda m: m.DESCRIPTOR.name)
def test_runtime_protos_match_tf_serving(message):
    assert message.DESCRIPTOR.full_name.startswith("tensorflow.serving.")
    actual = {f.name: (f.number, f.type, f.is_repeated, f.message_type.full_name if f.message_type else None)
              for f in message.DESCRIPTOR.fields}
    assert actual == TF_SERVING_FIELDS[message]


@pytest.mark.parametrize("message, text, where", [
    (protos.ModelServerConfig, 'model_config_list {\n  config { nme: "x" }\n}', "2:12"),
    (protos.BatchingParameters, "max_batch_size: 32", "1:17"),  # a wrapper needs { value: 32 }, as in TF Serving
    (protos.MonitoringConfig, "prometheus_config { enable: maybe }", "1:29"),
])
def test_bad_text_names_the_message_and_the_place(message, text, where):
    with pytest.raises(protos.ConfigError) as info:
        protos.parse_text(text, message, "x.config")
    assert f"Error parsing text-format {message.DESCRIPTOR.full_name} from x.config: {where}" in str(info.value)
