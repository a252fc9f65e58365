"""A TensorFlow-Serving-compatible model server for medcap's SavedModels, in Python.

    python -m serving.server --model_config_file serving/config/models.config \\
        --model_base_path_root artifacts/serving --port 8500 --rest_api_port 8501 \\
        --enable_batching --batching_parameters_file serving/config/batching.config \\
        --monitoring_config_file serving/config/monitoring.config

Flags are `tensorflow_model_server`'s where it has them (`--flag=value` or `--flag value`), and
so are the gRPC services (PredictionService, ModelService), the REST API, the config files and
the version directories: a client written for one works with the other. Ours on top:
`--model_base_path_root` (maps a base_path's leading /models to a local folder, so the Docker
config works as is), `--host` (127.0.0.1 by default, where TF Serving listens on all
interfaces) and `--grpc_max_message_bytes`. Where real TF Serving is available (Docker,
Kubernetes: serving/deploy), use it; this server is for development, tests and machines
without it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from serving import errors, protos
from serving.apis import model_server_config_pb2, model_service_pb2_grpc, prediction_service_pb2_grpc
from serving.batcher import BatchingOptions, BatchScheduler
from serving.core import ServingCore
from serving.metrics import ServingMetrics
from serving.model_manager import ModelManager, validate_config
from serving.rest import RestApi, RestServer

logger = logging.getLogger("serving.server")

VERSION = "medcap-serving 0.1 (TensorFlow Serving API 2.21 compatible)"
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def _flag_bool(text: str) -> bool:
    """'true'/'false' (and 1/0, yes/no) as TF Serving's bool flags accept them."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    """The command line, with tensorflow_model_server's flag names and defaults where they exist."""
    p = argparse.ArgumentParser(prog="python -m serving.server", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b = dict(type=_flag_bool, nargs="?", const=True, default=False)
    p.add_argument("--port", type=int, default=8500, help="gRPC port")
    p.add_argument("--rest_api_port", type=int, default=0, help="REST port (0: no REST API)")
    p.add_argument("--rest_api_timeout_in_ms", type=int, default=30000, help="deadline of a REST predict")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all, as TF Serving)")
    p.add_argument("--model_config_file", default="", help="text proto tensorflow.serving.ModelServerConfig")
    p.add_argument("--model_config_file_poll_wait_seconds", type=int, default=0,
                   help="re-read --model_config_file this often and apply changes (0: never)")
    p.add_argument("--model_name", default="default", help="single-model mode: the model's name")
    p.add_argument("--model_base_path", default="", help="single-model mode: folder of version directories")
    p.add_argument("--model_base_path_root", default="",
                   help="local folder standing for a base_path's leading /models (e.g. artifacts/serving)")
    p.add_argument("--file_system_poll_wait_seconds", type=float, default=1,
                   help="seconds between scans for new versions (0: scan once at start)")
    p.add_argument("--enable_batching", **b, help="merge concurrent requests into one model call")
    p.add_argument("--batching_parameters_file", default="", help="text proto tensorflow.serving.BatchingParameters")
    p.add_argument("--monitoring_config_file", default="", help="text proto tensorflow.serving.MonitoringConfig")
    p.add_argument("--ssl_config_file", default="", help="text proto tensorflow.serving.SSLConfig (gRPC TLS)")
    p.add_argument("--grpc_max_threads", type=int, default=64, help="gRPC worker threads")
    p.add_argument("--grpc_max_message_bytes", type=int, default=DEFAULT_MAX_MESSAGE_BYTES,
                   help="largest gRPC request/response (TF Serving allows INT_MAX)")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    return p


# --- config files -------------------------------------------------------------------------------


def load_model_config(args: argparse.Namespace) -> model_server_config_pb2.ModelServerConfig:
    """The ModelServerConfig from --model_config_file, or built from --model_name/--model_base_path."""
    if args.model_config_file and args.model_base_path:
        raise protos.ConfigError("Use either --model_config_file or --model_base_path, not both.")
    if args.model_config_file:
        config = protos.parse_text_file(args.model_config_file, protos.ModelServerConfig)
    elif args.model_base_path:
        config = protos.ModelServerConfig()
        config.model_config_list.config.add(name=args.model_name, base_path=str(Path(args.model_base_path).resolve()),
                                            model_platform="tensorflow")
    else:
        raise protos.ConfigError("Both --model_base_path and --model_config_file are empty: nothing to serve.")
    try:
        validate_config(config)
    except errors.ServingError as e:
        raise protos.ConfigError(f"Invalid model config {args.model_config_file}: {e.message}") from None
    return config


def load_batching(args: argparse.Namespace) -> BatchingOptions | None:
    """BatchingOptions when --enable_batching (TF Serving's defaults without a parameters file)."""
    if not args.enable_batching:
        if args.batching_parameters_file:
            logger.warning("--batching_parameters_file is ignored without --enable_batching")
        return None
    if not args.batching_parameters_file:
        return BatchingOptions()
    params = protos.parse_text_file(args.batching_parameters_file, protos.BatchingParameters)
    try:
        return BatchingOptions.from_proto(params)
    except ValueError as e:
        raise protos.ConfigError(f"Invalid batching parameters in {args.batching_parameters_file}: {e}") from None


def load_prometheus_path(args: argparse.Namespace) -> str | None:
    """The Prometheus page's path when monitoring is enabled, else None."""
    if not args.monitoring_config_file:
        return None
    config = protos.parse_text_file(args.monitoring_config_file, protos.MonitoringConfig)
    if not config.prometheus_config.enable:
        return None
    path = config.prometheus_config.path or protos.DEFAULT_PROMETHEUS_PATH
    return path if path.startswith("/") else "/" + path


def load_credentials(args: argparse.Namespace) -> grpc.ServerCredentials | None:
    """TLS credentials from --ssl_config_file (PEM strings inline, as TF Serving's SSLConfig), else None."""
    if not args.ssl_config_file:
        return None
    config = protos.parse_text_file(args.ssl_config_file, protos.SSLConfig)
    if not config.server_key or not config.server_cert:
        raise protos.ConfigError(f"{args.ssl_config_file}: server_key and server_cert (PEM text) are required.")
    if config.client_verify and not config.custom_ca:
        raise protos.ConfigError(f"{args.ssl_config_file}: client_verify needs custom_ca to check client certs.")
    return grpc.ssl_server_credentials([(config.server_key.encode(), config.server_cert.encode())],
                                       root_certificates=config.custom_ca.encode() or None,
                                       require_client_auth=config.client_verify)


# --- gRPC services ------------------------------------------------------------------------------


def _abort(context: grpc.ServicerContext, error: errors.ServingError):
    """End the RPC with the error's code and message."""
    context.abort(error.code, error.message)


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """tensorflow.serving.PredictionService: Predict and GetModelMetadata."""

    def __init__(self, core: ServingCore):
        self.core = core

    def Predict(self, request, context):  # noqa: N802 - gRPC method names
        try:
            return self.core.predict(request, "GRPC", context.time_remaining())
        except errors.ServingError as e:
            _abort(context, e)

    def GetModelMetadata(self, request, context):  # noqa: N802
        try:
            return self.core.get_model_metadata(request, "GRPC")
        except errors.ServingError as e:
            _abort(context, e)

    def _unimplemented(self, context, name: str):
        context.abort(grpc.StatusCode.UNIMPLEMENTED,
                      f"{name} is not implemented by this server (medcap's models have Predict signatures).")

    def Classify(self, request, context):  # noqa: N802
        self._unimplemented(context, "Classify")

    def Regress(self, request, context):  # noqa: N802
        self._unimplemented(context, "Regress")

    def MultiInference(self, request, context):  # noqa: N802
        self._unimplemented(context, "MultiInference")


class ModelService(model_service_pb2_grpc.ModelServiceServicer):
    """tensorflow.serving.ModelService: GetModelStatus and HandleReloadConfigRequest."""

    def __init__(self, core: ServingCore):
        self.core = core

    def GetModelStatus(self, request, context):  # noqa: N802
        try:
            return self.core.get_model_status(request)
        except errors.ServingError as e:
            _abort(context, e)

    def HandleReloadConfigRequest(self, request, context):  # noqa: N802
        try:
            return self.core.reload_config(request)
        except errors.ServingError as e:
            _abort(context, e)


# --- the server ---------------------------------------------------------------------------------


class ModelServer:
    """Model manager + batcher + gRPC + REST, started and stopped together."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.config = load_model_config(args)
        self.batching = load_batching(args)
        self.prometheus_path = load_prometheus_path(args)
        self.credentials = load_credentials(args)
        self.metrics = ServingMetrics()
        self.manager = ModelManager(self.config, args.file_system_poll_wait_seconds, args.model_base_path_root or None,
                                    self.metrics)
        self.batcher = BatchScheduler(self.batching, self.metrics) if self.batching else None
        self.core = ServingCore(self.manager, self.batcher, self.metrics)
        self.grpc_server: grpc.Server | None = None
        self.rest_server: RestServer | None = None
        self.grpc_port = self.rest_port = 0
        self._config_watch = threading.Event()

    def start(self) -> None:
        """Load the models, then open the gRPC and REST ports and log where they are."""
        if self.batching:
            logger.info("Batching: %s", self.batching)
        self.manager.start()
        logger.info("Models ready: %s", self.manager.describe() or "none yet (waiting for versions to appear)")
        options = [("grpc.max_send_message_length", self.args.grpc_max_message_bytes),
                   ("grpc.max_receive_message_length", self.args.grpc_max_message_bytes),
                   ("grpc.so_reuseport", 0)]
        server = grpc.server(futures.ThreadPoolExecutor(self.args.grpc_max_threads, thread_name_prefix="grpc"),
                             options=options)
        prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(PredictionService(self.core), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(self.core), server)
        address = f"{self.args.host}:{self.args.port}"
        try:
            if self.credentials:
                self.grpc_port = server.add_secure_port(address, self.credentials)
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as e:
            raise OSError(f"Cannot listen for gRPC on {address}: {e}") from None
        server.start()
        self.grpc_server = server
        logger.info("Running gRPC ModelServer at %s:%d%s ...", self.args.host, self.grpc_port,
                    " (TLS)" if self.credentials else "")
        if self.args.rest_api_port:
            if self.args.rest_api_port == self.args.port:
                logger.error("--rest_api_port cannot be same as --port; skipped exporting the HTTP/REST API.")
            else:
                api = RestApi(self.core, self.prometheus_path, self.args.rest_api_timeout_in_ms / 1000)
                max_body = self.args.grpc_max_message_bytes * 4 // 3 + (1 << 20)  # base64 grows data by a third
                self.rest_server = RestServer(api, self.args.host, self.args.rest_api_port, max_body)
                self.rest_server.start()
                self.rest_port = self.rest_server.port
                logger.info("Exporting HTTP/REST API at http://%s:%d ...", self.args.host, self.rest_port)
                if self.prometheus_path:
                    logger.info("Prometheus metrics at http://%s:%d%s", self.args.host, self.rest_port,
                                self.prometheus_path)
        if self.args.model_config_file and self.args.model_config_file_poll_wait_seconds > 0:
            threading.Thread(target=self._watch_config, name="config-watch", daemon=True).start()

    def _watch_config(self) -> None:
        """Apply edits of --model_config_file (TF Serving's --model_config_file_poll_wait_seconds)."""
        path, last = self.args.model_config_file, self.manager.config
        while not self._config_watch.wait(self.args.model_config_file_poll_wait_seconds):
            try:
                config = protos.parse_text_file(path, protos.ModelServerConfig)
                if config != last:
                    self.manager.reload_config(config)
                    last = config
            except (protos.ConfigError, errors.ServingError) as e:
                logger.error("Not applying the edited %s: %s", path, getattr(e, "message", e))

    def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, let running ones finish (up to `grace` seconds), unload everything."""
        self._config_watch.set()
        if self.rest_server:
            self.rest_server.stop()
        if self.grpc_server:
            self.grpc_server.stop(grace).wait()
        if self.batcher:
            self.batcher.stop()
        self.manager.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the server until SIGTERM or SIGINT; 1 when a config is invalid or a port cannot be opened."""
    args = build_parser().parse_args(argv)
    if args.version:
        print(VERSION)
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s] %(message)s",
                        stream=sys.stderr)
    stop = threading.Event()
    started = threading.Event()

    def on_signal(signum, frame):
        logger.info("Received %s: shutting down", signal.Signals(signum).name)
        stop.set()
        if not started.is_set():
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server = None
    try:
        server = ModelServer(args)
        server.start()
        started.set()
        while not stop.wait(1.0):
            pass
    except protos.ConfigError as e:
        logger.error("%s", e)
        return 1
    except OSError as e:
        logger.error("%s", e)
        if server:
            server.stop(0)
        return 1
    except KeyboardInterrupt:
        pass
    t0 = time.monotonic()
    if server:
        server.stop()
    logger.info("Server stopped in %.1f s", time.monotonic() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
