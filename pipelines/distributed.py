"""tf.distribute for `pipelines/train.py --distribute`: the strategy, who is chief, and the multi-worker loop.

`mirrored` (this machine's GPUs) trains with Keras' own `fit()`. `multi-worker` (a cluster described by
`TF_CONFIG`) cannot: Keras 3's `fit()` fails under `MultiWorkerMirroredStrategy` (keras-team/keras#20585,
"Attempt to convert a value (PerReplica...) to a Tensor"). `fit_custom` is its replacement: the model's own
`train_step`/`test_step` (so the compiled loss, metrics and optimizer) under `strategy.run`, driving the
very callbacks `fit()` would (checkpoints, CSV log, early stopping, time budget). Every worker runs every
callback, as collective ops require; only the chief's write to the run directory, the others' to scratch.
BatchNormalization's moving statistics, which Keras 3 updates per replica, are averaged every epoch, so
all workers end with identical weights.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import subprocess
from collections.abc import Callable

import keras
import numpy as np
import tensorflow as tf

DISTRIBUTE = ("none", "mirrored", "multi-worker")

DatasetFn = Callable[[tf.distribute.InputContext], tf.data.Dataset]


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """The strategy for `--distribute`; create it before any other TensorFlow op (multi-worker requires it)."""
    if kind == "none":
        return tf.distribute.get_strategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "multi-worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"Unknown --distribute {kind!r}; choose one of {DISTRIBUTE}.")


def task() -> tuple[str, int]:
    """This process's (task type, index) from `TF_CONFIG`; ('chief', 0) when there is none."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    current = config.get("task") or {}
    if not current.get("type"):
        return "chief", 0
    if current["type"] == "worker" and "chief" not in config.get("cluster", {}) and current.get("index", 0) == 0:
        return "chief", 0  # without a chief task, worker 0 is the chief
    return current["type"], int(current.get("index", 0))


def is_chief() -> bool:
    """True for the one process that writes checkpoints, plots and reports."""
    return task()[0] == "chief"


def local_cluster(workers: int) -> list[str]:
    """The `TF_CONFIG` of each worker of a cluster on free localhost ports (worker 0 is the chief)."""
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("localhost", 0))
    hosts = [f"localhost:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    return [json.dumps({"cluster": {"worker": hosts}, "task": {"type": "worker", "index": i}}) for i in range(workers)]


def run_local_cluster(command: list[str], workers: int, timeout: float, envs: list[dict] | None = None,
                      cwd: str | None = None) -> list[tuple[int, str]]:
    """Run `command` as every worker of a localhost cluster on CPU; (exit code, output) per worker."""
    procs = []
    for index, tf_config in enumerate(local_cluster(workers)):
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2", TF_CONFIG=tf_config,
                   **(envs[index] if envs else {}))
        procs.append(subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [(p.returncode, out) for p, out in zip(procs, outputs)]


def needs_custom_loop(strategy: tf.distribute.Strategy) -> bool:
    """True where Keras' `fit()` cannot run: under `MultiWorkerMirroredStrategy`."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)


class ResumeFromChief(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` for a non-chief worker: restore from the chief's backup, write its own to scratch."""

    def __init__(self, chief_backup_dir: str, backup_dir: str, **kwargs):
        super().__init__(backup_dir, **kwargs)
        self.chief_backup_dir = chief_backup_dir

    def on_train_begin(self, logs=None):
        if tf.io.gfile.isdir(self.chief_backup_dir):  # the chief saves only after the first epoch's collectives
            tf.io.gfile.makedirs(self.backup_dir)
            for name in tf.io.gfile.listdir(self.chief_backup_dir):
                source = os.path.join(self.chief_backup_dir, name)
                if not tf.io.gfile.isdir(source):
                    tf.io.gfile.copy(source, os.path.join(self.backup_dir, name), overwrite=True)
        super().on_train_begin(logs)


def weights_digest(model: keras.Model) -> str:
    """SHA-256 of all the model's weights: the same on every worker after synchronous training."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()


@functools.cache
def _summer(strategy: tf.distribute.Strategy) -> Callable[[tf.Tensor], tf.Tensor]:
    """A compiled all-reduce (eager collectives are slow and warn) for `strategy`."""
    return tf.function(lambda values: strategy.reduce("SUM", strategy.run(tf.identity, args=(values,)), axis=None))


def _sum(strategy: tf.distribute.Strategy, values: list[float]) -> list[float]:
    """Element-wise sum of `values` over every replica of every worker."""
    return _summer(strategy)(tf.constant(values, tf.float64)).numpy().tolist()


def any_worker(strategy: tf.distribute.Strategy, flag: bool) -> bool:
    """True on every worker when it is True on any (so all leave a loop together)."""
    return _sum(strategy, [float(flag)])[0] > 0


def same_everywhere(strategy: tf.distribute.Strategy, value: int) -> bool:
    """True when every replica holds the same integer `value` (n * sum of squares == square of sum)."""
    n, total, squares = _sum(strategy, [1.0, float(value), float(value) ** 2])
    return n * squares == total * total


def wait_for_all(strategy: tf.distribute.Strategy) -> None:
    """Block until every worker gets here: one leaving early makes the others' collectives abort."""
    _sum(strategy, [0.0])


def local_state_averager(strategy: tf.distribute.Strategy, model: keras.Model) -> Callable[[], None]:
    """A compiled function setting the float state replicas update alone (BatchNorm statistics) to its mean."""
    state = [v for v in model.non_trainable_variables if "float" in str(v.dtype)]

    @tf.function
    def average() -> None:
        local = strategy.run(lambda: [tf.identity(v.value) for v in state])
        for variable, value in zip(state, local):
            variable.assign(strategy.reduce("MEAN", value, axis=None))

    return average if state and strategy.num_replicas_in_sync > 1 else lambda: None


def _metrics(model: keras.Model) -> dict[str, float]:
    """The model's metric results, summed over all replicas (its variables are sync-on-read)."""
    return {k: float(v) for k, v in model.get_metrics_result().items()}


def fit_custom(
    model: keras.Model,
    strategy: tf.distribute.Strategy,
    train_data: DatasetFn,
    valid_data: DatasetFn,
    epochs: int,
    steps_per_epoch: int,
    callbacks: list[keras.callbacks.Callback],
    verbose: int = 2,
) -> keras.callbacks.History:
    """`model.fit(train, validation_data=valid)` under any strategy; `train_data` must repeat forever.

    Each `*_data(input_context)` returns this worker's batches of `{"images", "captions"}` at the
    per-replica batch size; the model's preprocessor is mapped over them as keras-hub's `fit()` does.
    Stopping (early stopping, time budget) is agreed by all workers at the end of an epoch.
    """
    def distribute(data: DatasetFn) -> tf.distribute.DistributedDataset:
        def batches(ctx: tf.distribute.InputContext) -> tf.data.Dataset:
            ds = data(ctx).map(model.preprocess_samples, num_parallel_calls=tf.data.AUTOTUNE)
            return ds.prefetch(tf.data.AUTOTUNE)

        return strategy.distribute_datasets_from_function(batches)

    train, valid = None, distribute(valid_data)
    average_local_state = local_state_averager(strategy, model)
    with strategy.scope():
        model.optimizer.build(model.trainable_variables)

    @tf.function
    def train_step(iterator) -> dict:
        outputs = strategy.run(model.train_step, args=(next(iterator),))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in outputs.items()}

    @tf.function
    def evaluate(dataset) -> None:
        for batch in dataset:
            strategy.run(model.test_step, args=(batch,))

    callbacks = keras.callbacks.CallbackList(callbacks, add_history=True, add_progbar=verbose != 0, verbose=verbose,
                                             epochs=epochs, steps=steps_per_epoch, model=model)
    model.stop_training = False
    callbacks.on_train_begin()
    first = getattr(model, "_initial_epoch", None) or 0  # where BackupAndRestore says to continue
    if not same_everywhere(strategy, first):
        raise RuntimeError("Workers restored different epochs: every worker must read the chief's backup, "
                           "so put the run directory on storage all of them share.")
    logs: dict = {}
    for epoch in range(first, epochs):
        model.reset_metrics()
        callbacks.on_epoch_begin(epoch)
        if train is None:  # started only now, so that its stream begins at the epoch a resumed run restored
            train = iter(distribute(train_data))
        for step in range(steps_per_epoch):
            callbacks.on_train_batch_begin(step)
            callbacks.on_train_batch_end(step, {k: float(v) for k, v in train_step(train).items()})
        average_local_state()
        logs = _metrics(model)
        model.reset_metrics()
        evaluate(valid)
        logs.update({f"val_{k}": v for k, v in _metrics(model).items()})
        callbacks.on_epoch_end(epoch, logs)
        if any_worker(strategy, model.stop_training):
            model.stop_training = True
            break
    model.optimizer.finalize_variable_values(model.trainable_weights)
    callbacks.on_train_end(logs)
    return model.history
