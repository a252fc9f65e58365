"""Tests for the CNN + attention-GRU captioner (`keras_models/cnn_gru`), on the tiny preset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_models.captioner import get_sampler
from keras_models.cnn_gru import PRESETS, CNNGRUBackbone, CNNGRUCaptioner, build_cnn_gru_captioner
from keras_models.cnn_gru.encoders import ImageEncoder, compact_cnn
from pipelines.text import build_vocabulary, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
# Left and right differ only by where the finding is: the model must keep position.
CAPTIONS = [
    "ct chest axial left lung small nodule",
    "ct chest axial right lung small nodule",
    "mri brain sagittal left large mass",
    "xray knee frontal right normal study",
]


def make_images(size: int = 32) -> np.ndarray:
    """Four normalised greyscale images, each with a bright square in a different place."""
    rng = np.random.RandomState(0)
    images = rng.uniform(0.0, 0.1, (4, size, size, 1)).astype("float32")
    q = size // 4
    for image, (row, col) in zip(images, [(1, 0), (1, 2), (0, 0), (2, 2)]):
        image[row * q : row * q + q, col * q : col * q + q] = 1.0
    return (images - 0.5) / 0.5


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(build_vocabulary(CAPTIONS * 50, 200))


@pytest.fixture(scope="module")
def images():
    return make_images()


@pytest.fixture(scope="module")
def model(tokenizer):
    """An untrained tiny captioner with dropout, so inference paths must switch it off."""
    keras.utils.set_random_seed(1)
    return build_cnn_gru_captioner("tiny", tokenizer, dropout=0.2)


@pytest.fixture(scope="module")
def batch(model, images):
    """Teacher-forcing inputs for the four captions (right-padded)."""
    x, _, _ = model.preprocessor({"images": images, "captions": CAPTIONS})
    return {k: ops.convert_to_numpy(v) for k, v in x.items()}


@pytest.fixture(scope="module")
def trained(tokenizer, images):
    """The tiny captioner after memorising four images -> four captions."""
    keras.utils.set_random_seed(0)
    model = build_cnn_gru_captioner("tiny", tokenizer)
    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    data = tf.data.Dataset.from_tensor_slices({"images": images, "captions": CAPTIONS}).repeat().batch(4)
    model.fit(data, steps_per_epoch=300, epochs=1, verbose=0)
    return model


def test_shapes_and_attention_maps(model, batch):
    logits = model(batch)
    b, t = batch["token_ids"].shape
    assert tuple(logits.shape) == (b, t, model.preprocessor.tokenizer.vocabulary_size())
    assert model.backbone.feature_grid == (8, 8)
    maps = ops.convert_to_numpy(model.attention_maps(batch["images"], batch["token_ids"]))
    assert maps.shape == (b, t, 64)
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)


def test_padding_tokens_do_not_update_the_state(model, batch):
    backbone = model.backbone
    features = backbone.image_encoder(batch["images"])
    mask = batch["padding_mask"]
    states = ops.convert_to_numpy(backbone.decoder(backbone.token_embedding(batch["token_ids"]), features, mask)[1])
    other_ids = np.where(mask, batch["token_ids"], 7)  # different tokens where padded
    other = ops.convert_to_numpy(backbone.decoder(backbone.token_embedding(other_ids), features, mask)[1])
    np.testing.assert_allclose(states, other, atol=1e-6)
    for row, length in zip(states, mask.sum(-1)):
        assert length < len(row)
        np.testing.assert_allclose(row[length:], np.broadcast_to(row[length - 1], row[length:].shape), atol=1e-6)
    unmasked = ops.convert_to_numpy(backbone.decoder(backbone.token_embedding(other_ids), features, None)[1])
    assert not np.allclose(unmasked, states, atol=1e-4)


def test_cached_steps_match_teacher_forcing(model, batch):
    expected = ops.convert_to_numpy(model(batch))
    ids, mask = batch["token_ids"], batch["padding_mask"]
    prompt = model.preprocessor.generate_preprocess({"images": batch["images"]}, sequence_length=ids.shape[1])
    _, cache = model._build_cache(batch["images"], prompt["token_ids"], prompt["padding_mask"])
    for t in range(ids.shape[1]):
        logits, hidden, cache = model.call_with_cache(ids[:, t : t + 1], cache, t)
        assert tuple(hidden.shape) == (len(ids), 1, model.backbone.hidden_dim)
        np.testing.assert_allclose(ops.convert_to_numpy(logits)[mask[:, t], 0], expected[mask[:, t], t], atol=1e-5)
    # A longer prompt: the cache holds its states, and feeding its last token again is consistent.
    prompt_mask = np.arange(ids.shape[1])[None, :] < 3
    _, cache = model._build_cache(batch["images"], np.where(prompt_mask, ids, 0), prompt_mask)
    logits, _, _ = model.call_with_cache(ids[:, 2:3], cache, 2)
    np.testing.assert_allclose(ops.convert_to_numpy(logits)[:, 0], expected[:, 2], atol=1e-5)


def test_generate_greedy_and_beam(model, images):
    greedy = model.generate(images, sampler="greedy", return_details=True)
    assert len(greedy["captions"]) == 4 and all(isinstance(c, str) for c in greedy["captions"])
    assert greedy["scores"].shape == (4,)
    assert model.generate(images, sampler="beam", num_beams=1) == greedy["captions"]
    assert len(model.generate(images, sampler="beam", num_beams=3)) == 4


@pytest.mark.parametrize("sampler", ["greedy", "beam"])
def test_the_cnn_runs_once_per_image_batch(model, images, monkeypatch, sampler):
    encoder = model.backbone.image_encoder
    calls = []
    original = encoder.call

    def counting_call(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(encoder, "call", counting_call)
    model.sampler = get_sampler(sampler, num_beams=2)
    inputs = model.preprocessor.generate_preprocess({"images": ops.convert_to_tensor(images)}, sequence_length=8)
    outputs = model.generate_step(inputs, stop_token_ids=(model.preprocessor.tokenizer.end_token_id,))
    assert tuple(outputs["token_ids"].shape) == (4, 8)
    assert len(calls) == 1


def test_memorises_four_images_and_generates_them(trained, images):
    assert trained.generate(images) == CAPTIONS
    assert trained.generate(images, sampler="beam", num_beams=2) == CAPTIONS


def test_config_round_trip_and_keras_file(trained, images, tmp_path):
    x, _, _ = trained.preprocessor({"images": images, "captions": CAPTIONS})
    expected = ops.convert_to_numpy(trained(x))

    backbone = CNNGRUBackbone.from_config(trained.backbone.get_config())
    backbone.set_weights(trained.backbone.get_weights())
    clone = CNNGRUCaptioner.from_config({**trained.get_config(), "backbone": backbone})
    np.testing.assert_allclose(ops.convert_to_numpy(clone(x)), expected, atol=1e-6)

    path = tmp_path / "cnn_gru.keras"
    trained.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, CNNGRUCaptioner)
    np.testing.assert_array_equal(ops.convert_to_numpy(loaded(x)), expected)
    for sampler in ("greedy", "beam"):
        assert loaded.generate(images, sampler=sampler, num_beams=2) == trained.generate(
            images, sampler=sampler, num_beams=2
        )


def test_trains_under_xla(tokenizer, images):
    """Keras compiles TensorFlow training with XLA on GPUs; the decoder loop must allow it."""
    model = build_cnn_gru_captioner("tiny", tokenizer)
    model.compile(optimizer="adam", jit_compile=True)
    loss = model.train_on_batch({"images": images, "captions": CAPTIONS})
    assert np.isfinite(np.asarray(loss)).all()


@pytest.mark.parametrize("encoder", ["densenet121", "efficientnetb0"])
def test_application_encoders_build_without_downloads(encoder):
    layer = ImageEncoder(encoder, image_size=64, channels=1, feature_dim=8, train_encoder=False)
    features = layer(np.zeros((2, 64, 64, 1), "float32"))
    assert tuple(features.shape) == (2, 4, 8)  # 64 px / 32 -> 2x2 map
    assert len(layer.trainable_weights) == 5  # projection and position mixer (kernel + bias), position embedding


def test_encoder_weights_come_from_a_local_file_or_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="encoder_weights"):
        CNNGRUBackbone(vocabulary_size=10, image_size=32, encoder="densenet121", encoder_weights="missing.h5")
    with pytest.raises(ValueError, match="download"):
        ImageEncoder("efficientnetb0", image_size=32, encoder_weights="imagenet")
    path = str(tmp_path / "compact.weights.h5")
    source = compact_cnn(32, 1, (8, 16))
    source.save_weights(path)
    loaded = ImageEncoder("compact", image_size=32, filters=(8, 16), encoder_weights=path)
    for a, b in zip(source.get_weights(), loaded.cnn.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert loaded.get_config()["encoder_weights"] is None  # the saved model carries the weights


def test_presets_build(tokenizer):
    for name, preset in PRESETS.items():
        assert {"backbone", "image_config", "sequence_length", "train"} <= set(preset), name
        assert {"epochs", "batch_size", "learning_rate"} <= set(preset["train"]), name
    small = build_cnn_gru_captioner("small", tokenizer)
    size = PRESETS["small"]["image_config"]["image_size"]
    assert small.image_config["image_size"] == size and small.backbone.image_size == size
    with pytest.raises(ValueError, match="preset"):
        build_cnn_gru_captioner("huge", tokenizer)


TORCH_SCRIPT = """
import json, os
import numpy as np, keras
from keras import ops
from keras_models.cnn_gru import build_cnn_gru_captioner
from pipelines.text import build_vocabulary, make_tokenizer
from tests.test_cnn_gru import CAPTIONS, make_images

keras.utils.set_random_seed(0)
model = build_cnn_gru_captioner("tiny", make_tokenizer(build_vocabulary(CAPTIONS * 50, 200)))
images = make_images()
before = model.evaluate({"images": images, "captions": CAPTIONS}, verbose=0, return_dict=True)["loss"]
for _ in range(5):
    model.train_on_batch({"images": images, "captions": CAPTIONS})
after = model.evaluate({"images": images, "captions": CAPTIONS}, verbose=0, return_dict=True)["loss"]
x, _, _ = model.preprocessor({"images": images, "captions": CAPTIONS})
x = {k: ops.convert_to_numpy(v) for k, v in x.items()}
expected = ops.convert_to_numpy(model(x))
prompt = model.preprocessor.generate_preprocess({"images": images}, sequence_length=x["token_ids"].shape[1])
_, cache = model._build_cache(ops.convert_to_tensor(images), prompt["token_ids"], prompt["padding_mask"])
step_error = 0.0
for t in range(4):
    logits, _, cache = model.call_with_cache(ops.convert_to_tensor(x["token_ids"][:, t : t + 1]), cache, t)
    step_error = max(step_error, float(np.abs(ops.convert_to_numpy(logits)[:, 0] - expected[:, t]).max()))
print(json.dumps({
    "backend": keras.config.backend(), "loss_before": before, "loss_after": after, "step_error": step_error,
    "greedy": model.generate(images), "beam": model.generate(images, sampler="beam", num_beams=2),
}))
"""


def test_trains_and_generates_on_torch():
    # One OpenMP thread: torch's spinning worker threads crawl on a shared 2-core machine.
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-c", TORCH_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == "torch"
    assert result["loss_after"] < result["loss_before"]
    assert result["step_error"] < 1e-5
    assert len(result["greedy"]) == len(result["beam"]) == 4
