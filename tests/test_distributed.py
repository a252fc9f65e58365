"""tf.distribute training: two localhost workers agree, the custom step is fit()'s step, workers resume from the chief.

Run as a module (`python -m tests.test_distributed DATA RUN_DIR OUT`) it is one worker of the test cluster.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER_TIMEOUT_S = 300  # generous: the CI machine is shared; an idle 2-core one needs about 30 s


def worker_main(data: str, run_dir: str, out: str) -> None:
    """One worker: train the tiny CNN-GRU with the multi-worker step, as `run_training` does, and report."""
    from pipelines.distributed import make_strategy, task, wait_for_all

    strategy = make_strategy("multi-worker")  # before any other TensorFlow op
    from pipelines.train import TrainConfig
    from pipelines.training import prepare_data, prepare_tokenizer, train_one

    cfg = TrainConfig(dataset=data, model="cnn_gru", preset="tiny", epochs=3, batch_size=8, vocabulary_size=200,
                      distribute="multi-worker")
    _, splits, _ = prepare_data(cfg, Path(run_dir))
    tokenizer = prepare_tokenizer(cfg, Path(run_dir), splits["train"])
    trained = train_one("cnn_gru", cfg, tokenizer, splits, Path(run_dir), strategy)
    model = trained.pop("model")
    report = {"task": list(task()), "weights_sha256": trained["weights_sha256"], "replicas": trained["replicas"],
              "loss": model.history.history["loss"]}
    Path(out.format(task()[1])).write_text(json.dumps(report))
    wait_for_all(strategy)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from pipelines.synthetic import generate_dataset

    return generate_dataset(tmp_path_factory.mktemp("mw") / "data", n_train=16, n_valid=8, n_test=2, image_size=48,
                            seed=0, workers=1)


def test_two_workers_on_localhost_agree_and_learn(data, tmp_path):
    from pipelines.distributed import run_local_cluster

    run_dir = tmp_path / "run"
    scratch = [tmp_path / "tmp0", tmp_path / "tmp1"]
    for folder in scratch:
        folder.mkdir()
    command = [sys.executable, "-m", "tests.test_distributed", str(data), str(run_dir), str(tmp_path / "w{}.json")]
    results = run_local_cluster(command, 2, WORKER_TIMEOUT_S, envs=[{"TMPDIR": str(f)} for f in scratch], cwd=str(REPO))
    for code, log in results:
        assert code == 0, log[-3000:]
    chief, worker = (json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2))
    assert (chief["task"], worker["task"], chief["replicas"]) == (["chief", 0], ["worker", 1], 2)
    assert chief["weights_sha256"] == worker["weights_sha256"]  # every weight, BatchNorm statistics included
    assert chief["loss"] == worker["loss"] and chief["loss"][-1] < chief["loss"][0]
    with open(run_dir / "cnn_gru" / "history.csv") as f:
        assert [round(float(r["loss"]), 4) for r in csv.DictReader(f)] == [round(v, 4) for v in chief["loss"]]
    assert {p.name for p in (run_dir / "cnn_gru").iterdir()} >= {"model.keras", "best.keras", "DONE.json", "curves.png"}
    assert not list((tmp_path / "tmp1").iterdir())  # the other worker wrote to scratch and cleaned it up


def _tiny_setup(data: Path):
    """A tokenizer and the records of the synthetic set."""
    from pipelines.rocov2 import read_split
    from pipelines.text import build_vocabulary, make_tokenizer

    train, _ = read_split(data, "train", progress=False)
    valid, _ = read_split(data, "valid", progress=False)
    return make_tokenizer(build_vocabulary([r.caption for r in train], 200)), train, valid


def _tiny_model(tokenizer):
    import keras

    from keras_models.registry import build_captioner

    keras.utils.set_random_seed(0)
    model = build_captioner("cnn_gru", "tiny", tokenizer)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    return model


def test_custom_step_is_fits_step(data, tmp_path):
    import keras
    import tensorflow as tf

    from pipelines.dataset import make_dataset
    from pipelines.distributed import fit_custom

    tokenizer, train, valid = _tiny_setup(data)
    reference = _tiny_model(tokenizer)
    ds = lambda records, **kw: make_dataset(records, reference.image_config, 8, deterministic=True, **kw)
    fitted = reference.fit(ds(train), validation_data=ds(valid), epochs=2, verbose=0)
    model = _tiny_model(tokenizer)
    log = tmp_path / "history.csv"
    custom = fit_custom(model, tf.distribute.get_strategy(), lambda ctx: ds(train, repeat=True),
                        lambda ctx: ds(valid), epochs=2, steps_per_epoch=2, callbacks=[keras.callbacks.CSVLogger(str(log))])
    for a, b in zip(reference.get_weights(), model.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert set(custom.history) == set(fitted.history) == {"loss", "token_accuracy", "caption_loss", "val_loss", "val_token_accuracy", "val_caption_loss"}
    for key, values in fitted.history.items():
        np.testing.assert_allclose(custom.history[key], values, rtol=1e-5)
    assert len(log.read_text().splitlines()) == 3  # the same callbacks ran: a header and two epochs


def test_workers_resume_from_the_chiefs_backup(tmp_path):
    import keras

    from pipelines.distributed import ResumeFromChief

    def model() -> keras.Model:
        m = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        m.compile(optimizer="sgd", loss="mse")
        return m

    x, y = np.ones((4, 3), "float32"), np.zeros((4, 2), "float32")
    chief = model()
    chief.fit(x, y, epochs=2, verbose=0, callbacks=[keras.callbacks.BackupAndRestore(str(tmp_path / "chief"),
                                                                                      delete_checkpoint=False)])
    worker = model()
    scratch = tmp_path / "scratch"
    history = worker.fit(x, y, epochs=2, verbose=0, callbacks=[ResumeFromChief(str(tmp_path / "chief"), str(scratch))])
    assert history.epoch == []  # both epochs were done by the chief
    for a, b in zip(chief.get_weights(), worker.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not scratch.exists() and (tmp_path / "chief" / "latest.weights.h5").is_file()  # the chief's stays


@pytest.mark.parametrize("config, expected", [
    (None, ("chief", 0)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 0}}, ("chief", 0)),
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}}, ("worker", 1)),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "worker", "index": 0}}, ("worker", 0)),
    ({"cluster": {"chief": ["a:1"], "worker": ["b:2"]}, "task": {"type": "chief", "index": 0}}, ("chief", 0)),
])
def test_the_chief_comes_from_tf_config(monkeypatch, config, expected):
    from pipelines.distributed import is_chief, task

    monkeypatch.setenv("TF_CONFIG", json.dumps(config) if config else "")
    assert task() == expected and is_chief() == (expected[0] == "chief")


def test_multi_worker_command_line(tmp_path):
    from pipelines.train import parse_args, resolve_run_dir

    with pytest.raises(SystemExit):
        parse_args(["--distribute", "multi-worker", "--dataset", "d"])  # no shared --run-dir
    cfg, resume = parse_args(["--distribute", "multi-worker", "--dataset", "d", "--run-dir", str(tmp_path / "run")])
    assert resume is None and resolve_run_dir(cfg, resume)[1] == tmp_path / "run"
    (tmp_path / "run" / "config.json").write_text(json.dumps({**cfg.__dict__, "epochs": 7}))
    cfg, resume = parse_args(["--distribute", "multi-worker", "--dataset", "d", "--run-dir", str(tmp_path / "run")])
    assert resume == str(tmp_path / "run") and resolve_run_dir(cfg, resume)[0].epochs == 7  # a relaunch continues


if __name__ == "__main__":
    worker_main(*sys.argv[1:4])
