"""The concept head (`keras_models/concepts.py`) in both captioners, on tiny configs."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import ops

from keras_models.concepts import ConceptHead, ConceptTagger
from keras_models.registry import build_captioner
from pipelines.text import build_vocabulary, make_tokenizer

CAPTIONS = ["ct chest left lung small nodule", "mri brain right large mass", "xray knee normal study"]
# (model, extra backbone kwargs): the concept vector alone, and the small presets' head (gated word bias +
# quadrant pooling)
SMALL_HEAD = {"concept_word_bias": True, "concept_quadrants": True}
CONFIGS = [("cnn_gru", {}), ("cnn_gru", SMALL_HEAD), ("git", {}), ("git", SMALL_HEAD)]
IDS = ["cnn_gru", "cnn_gru-bias-quadrants", "git", "git-bias-quadrants"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(build_vocabulary(CAPTIONS * 30, 100))


def test_word_loss_targets_are_the_caption_words():
    head = ConceptHead(vocabulary_size=6, output_dim=4)
    token_ids = np.array([[2, 5, 5, 3, 0, 0]])
    mask = token_ids != 0
    confident = np.full((1, 6), -20.0, "float32")
    confident[0, [2, 3, 5]] = 20.0  # exactly the ids present, [PAD] (id 0) not a word
    assert float(head.word_loss(confident, token_ids, mask)) < 1e-6
    wrong = confident.copy()
    wrong[0, 0] = 20.0  # predicting [PAD] costs about 20 nats
    assert float(head.word_loss(wrong, token_ids, mask)) == pytest.approx(20.0, abs=1e-3)


def test_word_bias_is_the_gated_log_probability_of_each_word():
    head = ConceptHead(vocabulary_size=4, output_dim=2, gate_dim=3)
    head.build((None, 5, 6))
    head.gate.set_weights([np.zeros((3, 4), "float32"), np.array([30.0, 30.0, -30.0, -30.0], "float32")])
    logits = np.array([[5.0, -5.0, 5.0, -5.0]], "float32")
    bias = ops.convert_to_numpy(head.word_bias(np.zeros((1, 2, 3), "float32"), logits))
    assert bias.shape == (1, 2, 4)  # one row per decoder step
    expected = [np.log(1 / (1 + np.exp(-5.0))), np.log(1 / (1 + np.exp(5.0))), 0.0, 0.0]  # open, open, shut, shut
    np.testing.assert_allclose(bias[0], [expected, expected], atol=1e-5)


@pytest.mark.parametrize("name", ["cnn_gru", "git"])
@pytest.mark.parametrize("option", ["concept_word_bias", "concept_quadrants"])
def test_concept_options_without_a_concept_head_are_refused(name, option, tokenizer):
    with pytest.raises(ValueError, match="concept_loss_weight"):
        build_captioner(name, "tiny", tokenizer, **{option: True})


# (grid, hot cell (row, column), which quadrants see it: top-left, top-right, bottom-left, bottom-right)
@pytest.mark.parametrize("grid,cell,seen", [((4, 4), (0, 3), [0, 1, 0, 0]), ((4, 4), (3, 0), [0, 0, 1, 0]),
                                            ((3, 5), (1, 2), [1, 1, 1, 1]), ((3, 5), (2, 4), [0, 0, 0, 1])])
def test_quadrant_pooling_sees_where_a_feature_is(grid, cell, seen):
    h, w = grid
    head = ConceptHead(vocabulary_size=3, output_dim=2, grid=grid)
    head.build((None, 1 + h * w, 2))
    features = np.zeros((1, 1 + h * w, 2), "float32")
    features[0, 0] = 100.0  # row 0 is a class token: it joins only the global pooling
    features[0, 1 + cell[0] * w + cell[1], 1] = 7.0  # the map is row-major; odd sizes share the middle row/column
    quadrants = [ops.convert_to_numpy(q)[0] for q in head.quadrant_max(features)]
    np.testing.assert_allclose(quadrants, [[0.0, 7.0 * s] for s in seen])
    assert head.logits(features).shape == (1, 3)
    with pytest.raises(ValueError, match="2 x 2"):
        ConceptHead(vocabulary_size=3, output_dim=2, grid=(1, 4))


@pytest.mark.parametrize("name,extra", CONFIGS, ids=IDS)
def test_concept_loss_joins_the_training_loss_and_survives_saving(name, extra, tokenizer, tmp_path):
    keras.utils.set_random_seed(0)
    kwargs = {"concept_loss_weight": 1.0, **extra}
    model = build_captioner(name, "tiny", tokenizer, **kwargs)
    assert model.backbone.concept_head is not None
    size, channels = model.image_config["image_size"], model.image_config["channels"]
    images = np.random.RandomState(0).uniform(-1, 1, (3, size, size, channels)).astype("float32")
    x = model.preprocessor({"images": images, "captions": np.array(CAPTIONS)})[0]
    logits = model(x, training=True)
    assert len(model.losses) == 1 and float(model.losses[0]) > 1.0  # untrained: many nats
    model(x, training=False)
    assert len(model.losses) == 1  # evaluate() reports the same sum as fit()
    model(x)
    assert not model.losses  # scoring and captioning add none

    history = model.fit(x={"images": images, "captions": np.array(CAPTIONS)}, batch_size=3, epochs=3, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(ops.convert_to_numpy(reloaded(x)), ops.convert_to_numpy(model(x)), atol=1e-5)
    assert reloaded.generate(images, max_length=8) == model.generate(images, max_length=8)
    assert logits.shape[-1] == tokenizer.vocabulary_size()


@pytest.mark.parametrize("name,extra", CONFIGS, ids=IDS)
def test_concept_models_export_and_serve_the_same_captions(name, extra, tokenizer, tmp_path):
    import tensorflow as tf

    from export.saved_model import export_model
    from pipelines.images import preprocess_images
    from tests.test_export import png

    keras.utils.set_random_seed(1)
    model = build_captioner(name, "tiny", tokenizer, sequence_length=10, concept_loss_weight=1.0, **extra)
    path = export_model(model, tmp_path, name)
    images = tf.constant([png(1), png(2), png(3)])
    pixels = preprocess_images(images, model.image_config).numpy()
    served = tf.saved_model.load(str(path))
    assert [c.decode() for c in served.signatures["serving_default"](images=images)["captions"].numpy()] == \
        model.generate(pixels)
    assert [c.decode() for c in served.signatures["beam_search"](images=images)["captions"].numpy()] == \
        model.generate(pixels, sampler="beam")


TORCH_SCRIPT = """
import json, keras, numpy as np
from keras_models.registry import build_captioner
from pipelines.text import build_vocabulary, make_tokenizer
captions = np.array(%r)
tokenizer = make_tokenizer(build_vocabulary(list(captions) * 30, 100))
out = {"backend": keras.config.backend()}
for name, extra, key in %r:
    keras.utils.set_random_seed(0)
    model = build_captioner(name, "tiny", tokenizer, concept_loss_weight=1.0, **extra)
    size, channels = model.image_config["image_size"], model.image_config["channels"]
    images = np.random.RandomState(0).uniform(-1, 1, (3, size, size, channels)).astype("float32")
    history = model.fit(x={"images": images, "captions": captions}, batch_size=3, epochs=3, verbose=0)
    out[key] = {"loss": history.history["loss"], "greedy": model.generate(images, max_length=8),
                 "beam": model.generate(images, max_length=8, sampler="beam", num_beams=2)}
print(json.dumps(out))
""" % (CAPTIONS, [(name, extra, key) for (name, extra), key in zip(CONFIGS, IDS)])


def test_concept_head_trains_and_generates_on_torch():
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "KERAS_BACKEND": "torch", "PYTHONPATH": str(repo), "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", TORCH_SCRIPT], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["backend"] == "torch"
    for name in IDS:
        loss = result[name]["loss"]
        assert loss[0] > 10 and loss[-1] < loss[0]  # the concept term (many nats untrained) is in the loss
        assert len(result[name]["greedy"]) == len(result[name]["beam"]) == 3


@pytest.mark.parametrize("name", ["cnn_gru", "git"])
def test_caption_loss_is_the_token_cross_entropy_without_the_word_loss(name, tokenizer):
    # pipelines/training.py stops and keeps checkpoints on val_caption_loss: the word loss (a sum over the
    # vocabulary) dominates `loss` and can overfit on small sets while the captions still improve.
    keras.utils.set_random_seed(0)
    model = build_captioner(name, "tiny", tokenizer, concept_loss_weight=1.0)
    size, channels = model.image_config["image_size"], model.image_config["channels"]
    images = np.random.RandomState(0).uniform(-1, 1, (3, size, size, channels)).astype("float32")
    results = model.evaluate(x={"images": images, "captions": np.array(CAPTIONS)}, batch_size=3, verbose=0,
                             return_dict=True)
    x, labels, mask = model.preprocessor({"images": images, "captions": np.array(CAPTIONS)})
    logits = ops.convert_to_numpy(model(x))
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    token_ce = -np.take_along_axis(log_probs, np.asarray(labels)[..., None], -1)[..., 0]
    mask = np.asarray(mask, "float32")
    assert results["caption_loss"] == pytest.approx((token_ce * mask).sum() / mask.sum(), rel=1e-4)
    assert results["loss"] > 5 * results["caption_loss"]  # the untrained word loss dominates the total


@pytest.mark.parametrize("name", ["cnn_gru", "git"])
def test_concept_tagger_trains_the_image_path_and_word_logits_only(name, tokenizer):
    keras.utils.set_random_seed(0)
    model = build_captioner(name, "tiny", tokenizer, concept_loss_weight=1.0, **SMALL_HEAD)
    size, channels = model.image_config["image_size"], model.image_config["channels"]
    images = np.random.RandomState(0).uniform(-1, 1, (3, size, size, channels)).astype("float32")
    x = model.preprocessor({"images": images, "captions": np.array(CAPTIONS)})[0]
    tagger = ConceptTagger(model.backbone)
    # its logits are the captioner's concept logits, its loss the head's word loss
    np.testing.assert_allclose(ops.convert_to_numpy(tagger(x)),
                               ops.convert_to_numpy(model.backbone(x)["concept_logits"]), atol=1e-5)
    before = {id(v): ops.convert_to_numpy(v) for v in model.backbone.weights}
    tagger.compile(optimizer=keras.optimizers.Adam(1e-2))
    loss = tagger.fit(x, batch_size=3, epochs=5, verbose=0).history["loss"]
    assert loss[-1] < loss[0]
    head = model.backbone.concept_head
    changed = {id(v) for v in model.backbone.weights if not np.array_equal(before[id(v)], ops.convert_to_numpy(v))}
    feature_layers = model.backbone.concept_feature_layers()
    allowed = {id(v) for layer in [*feature_layers, head.word_logits] for v in layer.weights}
    assert changed and changed <= allowed  # no decoder, embedding, gate or concept-embedding weight moved
    assert {id(v) for v in head.word_logits.weights} <= changed
    assert changed & {id(v) for v in feature_layers[0].trainable_weights}
    # the captioner reads the trained layers: same logits through it and through the tagger
    np.testing.assert_allclose(ops.convert_to_numpy(tagger(x)),
                               ops.convert_to_numpy(model.backbone(x)["concept_logits"]), atol=1e-5)


def test_concept_tagger_needs_a_concept_head(tokenizer):
    with pytest.raises(ValueError, match="concept head"):
        ConceptTagger(build_captioner("cnn_gru", "tiny", tokenizer).backbone)
