"""Which model versions are served: config, version directories, background loading, status.

What TF Serving's ServerCore + FileSystemStoragePathSource + AvailabilityPreservingPolicy do,
for SavedModels in the local file system:

- each configured model's base path is scanned every `poll_wait_seconds`; only directories
  named by an integer are versions (`.tmp-*` export directories and anything else are ignored),
  and a version directory counts once its `saved_model.pb` exists;
- the version policy (`latest {num_versions}` (default 1), `all`, `specific {versions}`) picks
  the aspired versions; new ones load in a background thread with `tf.saved_model.load`;
- a version that is no longer aspired is unloaded only once an aspired version is AVAILABLE
  (or none is left on disk), so a version that fails to load never replaces a good one; the
  failure is kept as the version's status (END + the load error), and retried only when its
  `saved_model.pb` changes;
- `reload_config` swaps the model list live; removed models are unloaded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from serving import errors
from serving.apis import get_model_metadata_pb2, get_model_status_pb2, meta_graph_pb2, model_server_config_pb2
from serving.metrics import ServingMetrics

logger = logging.getLogger("serving.models")

State = get_model_status_pb2.ModelVersionStatus.State
STATE_NAMES = {v: k for k, v in State.items()}
SERVE_TAG = "serve"
DEFAULT_SIGNATURE = "serving_default"
INIT_OP_SIGNATURE = "__saved_model_init_op"
PLATFORM = "tensorflow"


class Servable:
    """One loaded SavedModel version: its SignatureDefs (as TF Serving reports them) and their functions."""

    def __init__(self, name: str, version: int, path: Path, loaded, signature_defs: dict):
        self.name, self.version, self.path = name, version, path
        self._loaded = loaded
        self._functions = dict(loaded.signatures)
        self.signature_defs: dict[str, meta_graph_pb2.SignatureDef] = signature_defs

    @classmethod
    def load(cls, name: str, version: int, path: Path) -> "Servable":
        """Load a SavedModel directory (tag 'serve'); raises whatever TensorFlow raises."""
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  (registers the WordPiece ops of exported captioners)

        try:
            signature_defs = read_signature_defs(path)
        except DecodeError:
            raise errors.ServingError(grpc.StatusCode.DATA_LOSS,
                                      f"Can't parse {path / 'saved_model.pb'} as binary proto") from None
        loaded = tf.saved_model.load(str(path), tags=[SERVE_TAG])
        return cls(name, version, path, loaded, signature_defs)

    @property
    def signature_names(self) -> list[str]:
        """The callable signatures, sorted."""
        return sorted(self._functions)

    def signature(self, signature_name: str) -> meta_graph_pb2.SignatureDef:
        """The SignatureDef of a callable signature, else NOT_FOUND."""
        if signature_name not in self._functions or signature_name not in self.signature_defs:
            raise errors.not_found(
                f'Serving signature key "{signature_name}" not found. Model {self.name} version {self.version} '
                f"has: {', '.join(self.signature_names)}."
            )
        return self.signature_defs[signature_name]

    def signature_def_map(self) -> get_model_metadata_pb2.SignatureDefMap:
        """Every SignatureDef of the SavedModel's 'serve' graph, as GetModelMetadata returns them."""
        result = get_model_metadata_pb2.SignatureDefMap()
        for key, value in self.signature_defs.items():
            result.signature_def[key].CopyFrom(value)
        return result

    def run(self, signature_name: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Call a signature on numpy inputs; numpy outputs (strings as object arrays of bytes)."""
        import tensorflow as tf

        signature = self.signature(signature_name)
        feeds = {}
        for alias, array in inputs.items():
            dtype = tf.dtypes.as_dtype(signature.inputs[alias].dtype)
            feeds[alias] = tf.constant(array, dtype=dtype)
        outputs = self._functions[signature_name](**feeds)
        return {alias: tensor.numpy() for alias, tensor in outputs.items()}


def _load_error(error: Exception) -> errors.ServingError:
    """A load failure as a status: TensorFlow's code when it has one, else UNKNOWN."""
    if isinstance(error, errors.ServingError) or hasattr(error, "error_code"):
        return errors.from_exception(error)
    return errors.ServingError(grpc.StatusCode.UNKNOWN, f"{type(error).__name__}: {error}")


def read_signature_defs(path: Path) -> dict[str, meta_graph_pb2.SignatureDef]:
    """The SignatureDefs of the 'serve' MetaGraph in `path`/saved_model.pb (or .pbtxt)."""
    from google.protobuf import text_format

    from serving.apis import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    if binary.is_file():
        saved_model.ParseFromString(binary.read_bytes())
    else:
        text_format.Parse(text.read_text(), saved_model)
    for meta_graph in saved_model.meta_graphs:
        if SERVE_TAG in meta_graph.meta_info_def.tags:
            return dict(meta_graph.signature_def)
    raise ValueError(f"SavedModel at {path} has no MetaGraph tagged '{SERVE_TAG}'.")


@dataclass
class VersionState:
    """The manager's view of one version: state, status, and the servable once AVAILABLE."""

    version: int
    path: Path
    state: int = State.START
    code: grpc.StatusCode = grpc.StatusCode.OK
    message: str = ""
    servable: Servable | None = None
    fingerprint: tuple | None = None  # saved_model.pb (size, mtime) of the last load attempt


@dataclass
class _Model:
    config: model_server_config_pb2.ModelConfig
    base_path: Path
    versions: dict[int, VersionState] = field(default_factory=dict)
    configured: bool = True
    on_disk: dict[int, Path] = field(default_factory=dict)  # the last scan of base_path
    warned: str = ""  # the last warning logged about its base path, not to repeat it every poll


def _fingerprint(version_dir: Path) -> tuple | None:
    """(size, mtime_ns) of the version's saved_model.pb, None while it has none."""
    for name in ("saved_model.pb", "saved_model.pbtxt"):
        try:
            stat = (version_dir / name).stat()
        except OSError:
            continue
        return stat.st_size, stat.st_mtime_ns
    return None


def scan_versions(base_path: Path) -> dict[int, Path]:
    """Integer-named subdirectories of `base_path` holding a saved_model.pb: {version: path}."""
    found = {}
    for child in base_path.iterdir():
        if child.name.isdigit() and child.is_dir() and _fingerprint(child) is not None:
            found[int(child.name)] = child
    return found


def aspired_versions(policy, on_disk: list[int]) -> set[int]:
    """The versions a ServableVersionPolicy wants served among those on disk (latest 1 when unset)."""
    which = policy.WhichOneof("policy_choice")
    if which == "all":
        return set(on_disk)
    if which == "specific":
        return set(on_disk) & set(policy.specific.versions)
    count = max(1, policy.latest.num_versions) if which == "latest" else 1
    return set(sorted(on_disk)[-count:])


def validate_config(config: model_server_config_pb2.ModelServerConfig) -> None:
    """INVALID_ARGUMENT for configs TF Serving refuses: no model list, duplicate names, other platforms."""
    if config.WhichOneof("config") != "model_config_list":
        raise errors.invalid("The model server config must hold a model_config_list (custom_model_config is "
                             "not supported).")
    seen = set()
    for model in config.model_config_list.config:
        if not model.name:
            raise errors.invalid("A model config has no name.")
        if model.name in seen:
            raise errors.invalid(f"Illegal to list model {model.name} multiple times in config list.")
        seen.add(model.name)
        if not model.base_path:
            raise errors.invalid(f"Model {model.name} has no base_path.")
        if model.model_platform not in ("", PLATFORM):
            raise errors.invalid(f"Model {model.name} requested model_platform {model.model_platform!r}; only "
                                 f"'{PLATFORM}' is supported.")


class ModelManager:
    """Serves the configured models' versions; thread-safe; `start()` returns once the first loads finish."""

    def __init__(self, config: model_server_config_pb2.ModelServerConfig, poll_wait_seconds: float = 1.0,
                 base_path_root: str | Path | None = None, metrics: ServingMetrics | None = None):
        validate_config(config)
        self.poll_wait_seconds = poll_wait_seconds
        self.base_path_root = Path(base_path_root) if base_path_root else None
        self.metrics = metrics or ServingMetrics()
        self._lock = threading.RLock()
        self._idle = threading.Condition(self._lock)  # notified when a load finishes
        self._models: dict[str, _Model] = {}
        self._loads: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._config = model_server_config_pb2.ModelServerConfig()
        self._apply_config(config)

    # --- configuration --------------------------------------------------------------------------

    def base_path(self, configured: str) -> Path:
        """A config base_path as a local path (`/models/...` mapped under base_path_root when set)."""
        path = Path(configured)
        if self.base_path_root is not None and path.parts[:2] == ("/", "models"):
            return self.base_path_root.joinpath(*path.parts[2:])
        return path

    def _apply_config(self, config: model_server_config_pb2.ModelServerConfig) -> list[str]:
        """Install a new model list; returns the configured model names."""
        wanted = {c.name: c for c in config.model_config_list.config}
        with self._lock:
            for name, model in self._models.items():
                if model.configured and name not in wanted:
                    model.configured = False
                    self._unload_all(model, "it was removed from the config")
            for name, model_config in wanted.items():
                model = self._models.get(name)
                base = self.base_path(model_config.base_path)
                if model is not None and model.configured and model.base_path != base:
                    model.configured = False
                    self._unload_all(model, "its base_path changed")
                if model is None or not model.configured:
                    self._models[name] = model = _Model(model_config, base)
                    logger.info("Adding model %s from base path %s", name, base)
                model.config = model_config
            self._config = config
        return list(wanted)

    @property
    def config(self) -> model_server_config_pb2.ModelServerConfig:
        """The model config being served."""
        with self._lock:
            return self._config

    def reload_config(self, config: model_server_config_pb2.ModelServerConfig, timeout: float = 300.0) -> None:
        """Swap the model list live and wait (up to `timeout`) for the new aspired versions to settle."""
        validate_config(config)
        names = self._apply_config(config)
        self.poll(names)
        self.wait_until_settled(timeout)
        logger.info("Reloaded the model config: serving %s", self.describe() or "nothing")

    # --- file system polling and loading --------------------------------------------------------

    def start(self) -> None:
        """Scan every base path, load what the policies aspire (waiting for it), then keep polling."""
        loader = threading.Thread(target=self._load_loop, name="model-loader", daemon=True)
        loader.start()
        self._threads.append(loader)
        self.poll()
        self.wait_until_settled()
        if self.poll_wait_seconds > 0:
            poller = threading.Thread(target=self._poll_loop, name="model-poller", daemon=True)
            poller.start()
            self._threads.append(poller)

    def stop(self) -> None:
        """Stop polling and loading, and drop every servable."""
        self._stop.set()
        self._loads.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        with self._lock:
            for model in self._models.values():
                for state in model.versions.values():
                    state.servable = None

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_wait_seconds):
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the poller must survive anything and try again
                logger.exception("Polling the model base paths failed")

    def poll(self, names: list[str] | None = None) -> None:
        """Scan base paths now (all configured models, or `names`) and reconcile their versions."""
        with self._lock:
            models = [(n, m.base_path) for n, m in self._models.items() if m.configured and (not names or n in names)]
        for name, base in models:
            try:
                on_disk, warning = scan_versions(base), ""
            except FileNotFoundError:
                on_disk, warning = {}, f"base path {base} does not exist (yet)"
            except OSError as e:
                on_disk, warning = {}, f"base path {base} cannot be read ({e.__class__.__name__}: {e.strerror or e})"
            if not on_disk and not warning:
                warning = f"no versions found under base path {base}"
            with self._lock:
                model = self._models.get(name)
                if model is None or not model.configured or model.base_path != base:
                    continue
                if warning and warning != model.warned:
                    logger.warning("Model %s: %s", name, warning)
                model.warned, model.on_disk = warning, on_disk
                self._reconcile(model)

    def _reconcile(self, model: _Model) -> None:
        """Start loads of new aspired versions; unload versions no longer aspired (availability preserving)."""
        on_disk = model.on_disk
        aspired = aspired_versions(model.config.model_version_policy, list(on_disk))
        for version in sorted(aspired):
            state = model.versions.get(version)
            fingerprint = _fingerprint(on_disk[version])
            retry_failed = (state is not None and state.state == State.END and state.code != grpc.StatusCode.OK
                            and state.fingerprint != fingerprint)
            unloaded = state is not None and state.state == State.END and state.code == grpc.StatusCode.OK
            if state is None or retry_failed or unloaded:
                model.versions[version] = VersionState(version, on_disk[version], fingerprint=fingerprint)
                self._loads.put((model.config.name, version))
        any_available = any(model.versions[v].state == State.AVAILABLE for v in aspired if v in model.versions)
        for version, state in model.versions.items():
            if version in aspired or state.state != State.AVAILABLE:
                continue
            if any_available or not aspired:
                reason = "an aspired version is available" if aspired else "no aspired version is on disk"
                self._unload(model, state, reason)

    def _load_loop(self) -> None:
        while not self._stop.is_set():
            item = self._loads.get()
            if item is None:
                break
            name, version = item
            with self._lock:
                model = self._models.get(name)
                state = model.versions.get(version) if model else None
                if state is None or state.state != State.START:
                    self._idle.notify_all()
                    continue
                if not model.configured:
                    state.state = State.END
                    self._idle.notify_all()
                    continue
                state.state, path = State.LOADING, state.path
            logger.info("Loading model %s version %d from %s", name, version, path)
            started = time.monotonic()
            try:
                servable, error = Servable.load(name, version, path), None
            except Exception as e:  # noqa: BLE001 - any load failure becomes this version's status
                servable, error = None, _load_error(e)
            with self._lock:
                if error is None and model.configured:
                    state.state, state.servable = State.AVAILABLE, servable
                    self.metrics.load_attempts.inc(name, "OK")
                    self.metrics.version_available.set(1, name, str(version))
                    logger.info("Serving model %s version %d (signatures: %s) from %s, loaded in %.1f s", name,
                                version, ", ".join(servable.signature_names), path, time.monotonic() - started)
                elif error is None:
                    state.state = State.END
                else:
                    state.state, state.code, state.message = State.END, error.code, error.message
                    self.metrics.load_attempts.inc(name, error.code.name)
                    logger.error("Failed to load model %s version %d from %s: %s: %s (the versions already "
                                 "served stay served)", name, version, path, error.code.name, error.message)
                if model.configured:
                    self._reconcile(model)
                self._idle.notify_all()

    def _unload(self, model: _Model, state: VersionState, reason: str) -> None:
        state.state = State.UNLOADING
        state.servable = None  # requests already holding it finish; the memory goes with the last one
        state.state = State.END
        self.metrics.version_available.remove(model.config.name, str(state.version))
        logger.info("Unloaded model %s version %d (%s)", model.config.name, state.version, reason)

    def _unload_all(self, model: _Model, reason: str) -> None:
        for state in model.versions.values():
            if state.state == State.AVAILABLE:
                self._unload(model, state, reason)
            elif state.state in (State.START, State.LOADING):
                state.state = State.END

    def wait_until_settled(self, timeout: float | None = None) -> bool:
        """Block until no version is waiting to load or loading; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while any(s.state in (State.START, State.LOADING) for m in self._models.values()
                      for s in m.versions.values()):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(timeout=0.5 if remaining is None else min(0.5, remaining))
        return True

    # --- queries --------------------------------------------------------------------------------

    def resolve(self, name: str, version: int | None = None, label: str | None = None) -> Servable:
        """The servable for a request: a version, a label's version, or the latest AVAILABLE; else NOT_FOUND."""
        with self._lock:
            model = self._models.get(name)
            if model is None or not model.configured:
                raise errors.not_found(f"Servable not found for request: Latest({name})")
            if label:
                labels = dict(model.config.version_labels)
                if label not in labels:
                    raise errors.not_found(f"Unrecognized servable version label: {label} (model {name} has "
                                           f"labels: {', '.join(sorted(labels)) or 'none'})")
                version = labels[label]
            if version is not None:
                state = model.versions.get(version)
                if state is None or state.servable is None:
                    raise errors.not_found(f"Servable not found for request: Specific({name}, {version})")
                return state.servable
            available = [s for s in model.versions.values() if s.servable is not None]
            if not available:
                raise errors.not_found(f"Servable not found for request: Latest({name})")
            return max(available, key=lambda s: s.version).servable

    def version_states(self, name: str, version: int | None = None,
                       label: str | None = None) -> list[VersionState]:
        """Snapshots of a model's version states (NOT_FOUND like GetModelStatus when there are none)."""
        with self._lock:
            model = self._models.get(name)
            if label and model is not None:
                labels = dict(model.config.version_labels)
                if label not in labels:
                    raise errors.not_found(f"Unrecognized servable version label: {label}")
                version = labels[label]
            states = dict(model.versions) if model is not None else {}
            if version is not None:
                if version not in states:
                    raise errors.not_found(f"Could not find version {version} of model {name}")
                states = {version: states[version]}
            if not states:
                raise errors.not_found(f"Could not find any versions of model {name}")
            return [VersionState(s.version, s.path, s.state, s.code, s.message) for _, s in sorted(states.items())]

    def served(self) -> list[tuple[str, int, list[str]]]:
        """(model, version, signatures) for every AVAILABLE version."""
        with self._lock:
            return [(name, s.version, s.servable.signature_names)
                    for name, m in sorted(self._models.items()) for s in sorted(m.versions.values(),
                                                                                  key=lambda s: s.version)
                    if s.servable is not None]

    def describe(self) -> str:
        """'git v2, cnn_gru v1' for the log."""
        return ", ".join(f"{name} v{version}" for name, version, _ in self.served())
