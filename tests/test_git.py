"""GIT: parity with Hugging Face transformers, cached decoding, saving, training on both backends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import keras_hub
import numpy as np
import pytest

from keras_models.captioner import get_sampler
from keras_models.git import GitCaptioner, build_git_captioner
from keras_models.git.convert_hf import convert_checkpoint, load_hf_weights, load_state_dict, main
from keras_models.git.git_causal_lm import SparseCrossentropyWithLabelSmoothing, _contracted_axes, _one_static_row, project
from keras_models.git.git_vision_encoder import GitVisionEncoder, conv_stem
from pipelines.text import SPECIAL_TOKENS, make_tokenizer

REPO = Path(__file__).resolve().parents[1]
CLS, SEP = 101, 102
# Two shapes of GitConfig: (config kwargs, saved as safetensors?)
HF_CONFIGS = {
    "a": (
        dict(
            vision_config=dict(
                image_size=64, patch_size=16, hidden_size=64, intermediate_size=128,
                num_hidden_layers=2, num_attention_heads=2,
            ),
            hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
            vocab_size=1000, max_position_embeddings=64,
        ),
        True,
    ),
    "b": (
        dict(
            vision_config=dict(
                image_size=48, patch_size=8, hidden_size=48, intermediate_size=80,
                num_hidden_layers=3, num_attention_heads=3, layer_norm_eps=1e-6,
            ),
            hidden_size=96, num_hidden_layers=3, num_attention_heads=4, intermediate_size=160,
            vocab_size=1000, max_position_embeddings=40,
        ),
        False,
    ),
}


def bert_like_vocab(size: int = 1000) -> list[str]:
    """A vocabulary with BERT's special ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103)."""
    vocab = [f"tok{i}" for i in range(size)]
    for token, index in zip(SPECIAL_TOKENS, (0, 100, 101, 102, 103)):
        vocab[index] = token
    return vocab


def make_hf_checkpoint(name: str, folder: Path):
    """A random GitForCausalLM (weights scaled up so images and tokens matter), saved with a vocab.txt."""
    import torch
    from transformers import GitConfig, GitForCausalLM

    kwargs, safetensors = HF_CONFIGS[name]
    torch.manual_seed(0)
    model = GitForCausalLM(GitConfig(**kwargs)).eval()
    with torch.no_grad():
        for key, p in model.named_parameters():
            if any(n in key for n in ("LayerNorm", "layer_norm", "layrnorm", "visual_projection.1")):
                p.copy_(float(key.endswith("weight")) + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
        model.output.bias[SEP] = -30.0  # never end early: both sides produce every requested token
    if safetensors:
        model.save_pretrained(folder)
    else:  # a legacy checkpoint: transformers 5 only writes safetensors
        model.config.save_pretrained(folder)
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "vocab.txt").write_text("\n".join(bert_like_vocab()) + "\n")
    return model


def hf_inputs(model, seed: int = 0):
    """Two different images (NHWC) and a padded prompt batch for an HF model's config."""
    size = model.config.vision_config.image_size
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((2, size, size, 3)).astype("float32")
    token_ids = rng.integers(104, 1000, (2, 12)).astype("int32")
    token_ids[:, 0] = CLS
    padding_mask = np.ones_like(token_ids, dtype=bool)
    padding_mask[1, 8:] = False
    return images, token_ids, padding_mask


def hf_logits(model, images, token_ids, padding_mask) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(token_ids, dtype=torch.long),
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            attention_mask=torch.tensor(padding_mask.astype("int64")),
        )
    return out.logits[:, -token_ids.shape[1] :].numpy()


def hf_greedy(model, images, new_tokens: int) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model.generate(
            pixel_values=torch.tensor(images.transpose(0, 3, 1, 2)),
            input_ids=torch.full((len(images), 1), CLS),
            max_new_tokens=new_tokens,
            do_sample=False,
        )
    return out.numpy()


def uncached_greedy(model: GitCaptioner, images, new_tokens: int) -> np.ndarray:
    """Greedy decoding by repeated full forward passes (no cache)."""
    tokens = np.full((len(images), 1), CLS, dtype="int32")
    for _ in range(new_tokens):
        logits = model({"images": images, "token_ids": tokens, "padding_mask": np.ones_like(tokens, bool)})
        step = np.argmax(keras.ops.convert_to_numpy(logits)[:, -1], axis=-1).astype("int32")
        tokens = np.concatenate([tokens, step[:, None]], axis=1)
    return tokens


@pytest.fixture(scope="module")
def checkpoint_a(tmp_path_factory):
    """(HF model, folder, converted GitCaptioner) of config `a`."""
    folder = tmp_path_factory.mktemp("git_a")
    hf = make_hf_checkpoint("a", folder)
    return hf, folder, convert_checkpoint(folder, sequence_length=24)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(40)])


def tiny_data(n: int = 16, size: int = 32, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = rng.standard_normal((n, size, size, 1)).astype("float32")
    captions = np.array([" ".join(f"w{(i + j) % 40}" for j in range(6)) for i in range(n)])
    return {"images": images, "captions": captions}


def assert_parity(hf, model: GitCaptioner) -> float:
    """Logits within 1e-4 and 20 greedy tokens equal to HF, with and without our cache; returns max abs diff."""
    images, token_ids, padding_mask = hf_inputs(hf)
    expected = hf_logits(hf, images, token_ids, padding_mask)
    ours = keras.ops.convert_to_numpy(model({"images": images, "token_ids": token_ids, "padding_mask": padding_mask}))
    valid = padding_mask[..., None]  # HF's logits at padded positions are not meaningful
    diff = float(np.max(np.abs(expected - ours) * valid))
    assert diff < 1e-4, diff

    reference = hf_greedy(hf, images, 20)
    assert reference.shape == (2, 21) and not np.array_equal(reference[0], reference[1])
    cached = np.stack(model.generate(images, max_length=21, return_details=True)["token_ids"])
    np.testing.assert_array_equal(cached, reference)
    one = np.stack(model.generate(images[:1], max_length=21, return_details=True)["token_ids"])
    np.testing.assert_array_equal(one, reference[:1])  # one row: the decoding step folds its biases (`project`)
    np.testing.assert_array_equal(uncached_greedy(model, images, 20), reference)
    return diff


def test_parity_safetensors(checkpoint_a):
    hf, _, model = checkpoint_a
    assert model.image_config["resize"] == "center_crop" and model.image_config["channels"] == 3
    print(f"config a max abs logit diff: {assert_parity(hf, model):.2e}")


def test_parity_pytorch_bin_other_shapes(tmp_path):
    hf = make_hf_checkpoint("b", tmp_path)
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    model = convert_checkpoint(tmp_path, sequence_length=24)
    assert model.backbone.num_image_tokens == 37
    print(f"config b max abs logit diff: {assert_parity(hf, model):.2e}")


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="the folding applies on TensorFlow only")
def test_one_row_projections_fold_their_bias_and_match_the_layer(checkpoint_a):
    _, _, model = checkpoint_a
    layer = model.backbone.transformer_layers[0]
    attention = layer._self_attention_layer
    folded = {model.lm_head: 1, attention._query_dense: 1, attention._key_dense: 1, attention._value_dense: 1,
              attention._output_dense: 2, layer._feedforward_intermediate_dense: 1, layer._feedforward_output_dense: 1}
    assert {dense: _contracted_axes(dense) for dense in folded} == folded  # the output one: heads x head size
    assert _contracted_axes(layer._self_attention_layer_norm) == 0
    rng = np.random.default_rng(0)
    for dense, contracted in folded.items():
        one = rng.standard_normal((1, 1, *dense.kernel.shape[:contracted])).astype("float32")
        assert _one_static_row(keras.ops.convert_to_tensor(one), contracted)
        np.testing.assert_allclose(keras.ops.convert_to_numpy(project(dense, one)),
                                   keras.ops.convert_to_numpy(dense(one)), atol=1e-5)
    assert not _one_static_row(keras.ops.ones((2, 1, 4)))


def test_projections_that_cannot_fold_their_bias_are_called_as_they_are():
    def dense(**kwargs):
        layer = keras.layers.Dense(6, **kwargs)
        layer.build((None, 4))
        return layer

    assert _contracted_axes(dense()) == 1
    assert _contracted_axes(dense(use_bias=False)) == 0
    assert _contracted_axes(dense(dtype="mixed_bfloat16")) == 0  # computes in bfloat16: folding would change it
    lora = dense()
    lora.enable_lora(2)
    assert _contracted_axes(lora) == 0  # left to the layer (its product adds the low-rank one)
    quantized = dense()
    quantized.quantize("int8")
    assert _contracted_axes(quantized) == 0
    einsum = keras.layers.EinsumDense("bqd,hd->bqh", output_shape=(None, 6), bias_axes="h")
    einsum.build((None, 1, 4))
    assert _contracted_axes(einsum) == 0  # contracts the kernel's last axis, not its first


def test_converter_rejects_mismatched_checkpoints(checkpoint_a):
    _, folder, model = checkpoint_a
    state = load_state_dict(folder)
    before = keras.ops.convert_to_numpy(model.lm_head.bias)

    broken = dict(state)
    del broken["git.embeddings.LayerNorm.weight"]
    broken["git.extra.weight"] = np.zeros(3, "float32")
    broken["output.bias"] = np.zeros(999, "float32")
    with pytest.raises(ValueError) as error:
        load_hf_weights(model, broken)
    message = str(error.value)
    assert "missing: git.embeddings.LayerNorm.weight" in message
    assert "unknown: git.extra.weight" in message
    assert "shape mismatch: output.bias is (999,), expected (1000,)" in message
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model.lm_head.bias), before)  # nothing assigned


def test_cli_writes_loadable_model(checkpoint_a, tmp_path):
    hf, folder, model = checkpoint_a
    out = tmp_path / "git.keras"
    main(["--checkpoint", str(folder), "--out", str(out), "--sequence-length", "24"])
    loaded = keras.saving.load_model(out)
    images, token_ids, padding_mask = hf_inputs(hf)
    inputs = {"images": images, "token_ids": token_ids, "padding_mask": padding_mask}
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(inputs)), keras.ops.convert_to_numpy(model(inputs)))
    assert loaded.preprocessor.sequence_length == 24


def test_config_round_trip_and_keras_file(tokenizer, tmp_path):
    model = build_git_captioner("tiny", tokenizer)
    data = tiny_data(4)
    inputs = model.preprocessor.generate_preprocess({"images": data["images"]})
    inputs = {k: keras.ops.convert_to_numpy(v) for k, v in inputs.items()}
    inputs["token_ids"] = inputs["token_ids"] + 5  # any tokens

    clone = GitCaptioner.from_config(model.get_config())
    clone.set_weights(model.get_weights())
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(clone(inputs)), keras.ops.convert_to_numpy(model(inputs)), atol=1e-6
    )

    model.save(tmp_path / "tiny.keras")
    loaded = keras.saving.load_model(tmp_path / "tiny.keras")
    assert isinstance(loaded, GitCaptioner)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(inputs)), keras.ops.convert_to_numpy(model(inputs)))
    assert loaded.generate(data["images"], max_length=10) == model.generate(data["images"], max_length=10)


def test_conv_stem_extra_convs_deepen_the_last_stages_and_save(tokenizer, tmp_path):
    model = build_git_captioner("tiny", tokenizer, vision_stem="conv", vision_stem_extra_convs=2)
    stem = model.backbone.vision_encoder.embedding.patch_embedding
    convs = [layer for layer in stem.layers if isinstance(layer, keras.layers.Conv2D)]
    # 16 px patches: four stride-2 stages, the last two with a stride-1 conv, then the 1x1 projection
    assert [conv.strides[0] for conv in convs] == [2, 2, 2, 1, 2, 1, 1]
    data = tiny_data(2)
    model.save(tmp_path / "deep.keras")
    loaded = keras.saving.load_model(tmp_path / "deep.keras")
    assert loaded.backbone.vision_stem_extra_convs == 2
    assert loaded.generate(data["images"], max_length=8) == model.generate(data["images"], max_length=8)
    with pytest.raises(ValueError, match="stem='conv'"):
        build_git_captioner("tiny", tokenizer, vision_stem_extra_convs=1)  # the tiny preset's patch stem
    with pytest.raises(ValueError, match="between 0 and 4"):
        build_git_captioner("tiny", tokenizer, vision_stem="conv", vision_stem_extra_convs=5)
    with pytest.raises(ValueError, match=r"image size \(40\) must be a multiple of the patch size \(16\)"):
        build_git_captioner("tiny", tokenizer, vision_stem="conv", image_config={"image_size": 40})
    with pytest.raises(ValueError, match="multiple of the patch size"):  # a patch conv would drop the last 8 pixels
        build_git_captioner("tiny", tokenizer, image_config={"image_size": 40})


def test_training_and_every_sampler(tokenizer):
    keras.utils.set_random_seed(0)
    model = build_git_captioner("tiny", tokenizer, dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    history = model.fit(tiny_data(), batch_size=8, epochs=6, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < losses[0] * 0.8, losses
    images = tiny_data(3, seed=1)["images"]
    for sampler in ("greedy", "beam", "top_k", "top_p"):
        details = model.generate(images, max_length=12, sampler=sampler, return_details=True)
        assert len(details["captions"]) == 3 and np.all(np.isfinite(details["scores"])), sampler


def test_label_smoothing_loss():
    logits = np.random.default_rng(0).standard_normal((2, 5, 7)).astype("float32")
    labels = np.array([[1, 2, 3, 0, 0], [6, 5, 4, 3, 2]])
    plain = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(labels, logits)
    np.testing.assert_allclose(SparseCrossentropyWithLabelSmoothing(0.0)(labels, logits), plain, rtol=1e-6)
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    expected = smoothed(keras.ops.one_hot(labels, 7), logits)
    np.testing.assert_allclose(SparseCrossentropyWithLabelSmoothing(0.1)(labels, logits), expected, rtol=1e-5)


def test_build_options(tokenizer):
    model = build_git_captioner("tiny", tokenizer, label_smoothing=0.1, image_config={"channels": 3})
    assert isinstance(model.loss, SparseCrossentropyWithLabelSmoothing) and model.loss.label_smoothing == 0.1
    assert model.backbone.input["images"].shape[-1] == 3 == model.image_config["channels"]
    with pytest.raises(ValueError, match="text positions"):
        build_git_captioner("tiny", tokenizer, sequence_length=65)


def test_mixed_precision_generates(tokenizer):
    model = build_git_captioner("tiny", tokenizer, dtype="mixed_bfloat16")
    assert model.backbone.transformer_layers[0].compute_dtype == "bfloat16"
    model.run_eagerly = True
    assert len(model.generate(tiny_data(2)["images"], max_length=6)) == 2


def test_beam_search_encodes_images_once(tokenizer, monkeypatch):
    model = build_git_captioner("tiny", tokenizer)
    model.run_eagerly = True  # so every decoding step runs in Python and is counted
    seen, steps = [], []
    encode, step = GitVisionEncoder.call, GitCaptioner.call_with_cache
    monkeypatch.setattr(GitVisionEncoder, "call", lambda self, x, **kw: seen.append(x.shape[0]) or encode(self, x, **kw))
    monkeypatch.setattr(GitCaptioner, "call_with_cache", lambda self, *a: steps.append(1) or step(self, *a))
    model.sampler = keras_hub.samplers.BeamSampler(num_beams=3)
    inputs = model.preprocessor.generate_preprocess({"images": tiny_data(2)["images"]}, sequence_length=8)
    assert "token_log_probs" in model.generate_step(inputs)
    assert seen == [2], seen  # one call, for the 2 images, not 2 x 3 beams, and none to score the captions
    assert len(steps) == 7 + 1  # 7 decoding steps, then one pass over the chosen tokens scores them
    steps.clear()
    assert "token_log_probs" not in model.generate_step(inputs, score=False)  # the app's beam list scores all beams
    assert len(steps) == 7


@pytest.mark.parametrize("sampler", ["greedy", "beam"])
def test_scores_from_the_cache_match_a_full_teacher_forced_pass(tokenizer, sampler):
    keras.utils.set_random_seed(0)
    model = build_git_captioner("tiny", tokenizer, dropout=0.0)
    model.fit(tiny_data(), batch_size=8, epochs=2, verbose=0)  # so that tokens have unequal probabilities
    model.sampler = get_sampler(sampler, num_beams=3)
    inputs = model.preprocessor.generate_preprocess({"images": tiny_data(3, seed=1)["images"]}, sequence_length=12)
    outputs = model.generate_step(inputs, stop_token_ids=(model.preprocessor.tokenizer.end_token_id,))
    full = model.token_log_probs({"images": inputs["images"], "token_ids": outputs["token_ids"],
                                  "padding_mask": outputs["padding_mask"]})
    cached = keras.ops.convert_to_numpy(outputs["token_log_probs"])
    np.testing.assert_allclose(cached, keras.ops.convert_to_numpy(full), atol=1e-4)
    assert cached.min() < -1e-3  # real log-probabilities, not zeros


def test_one_image_row_serves_its_beams(tokenizer):
    """Beam search keeps one row of image keys/values per image and one row of text per beam (image i's
    beams are rows i * beams ...): the step must give the logits it gives with the image rows repeated."""
    keras.utils.set_random_seed(0)
    model = build_git_captioner("tiny", tokenizer, dropout=0.0)
    images, beams = tiny_data(2, seed=2)["images"], 3
    prompt = model.preprocessor.generate_preprocess({"images": images}, sequence_length=8)
    _, cache = model._build_cache(keras.ops.convert_to_tensor(images), prompt["token_ids"], prompt["padding_mask"])
    layers, rest = model._split_cache(cache)
    text = [tuple(keras.ops.repeat(t, beams, axis=0) for t in layer[2:]) for layer in layers]
    ids = keras.ops.convert_to_tensor(np.array([[6], [7], [8]] * 2, "int32"))  # a different token per beam
    grouped = [(*layer[:2], *t) for layer, t in zip(layers, text)]
    repeated = [(*(keras.ops.repeat(k, beams, axis=0) for k in layer[:2]), *t) for layer, t in zip(layers, text)]
    extra = tuple(keras.ops.repeat(r, beams, axis=0) for r in rest)  # the concept logits: one row per beam
    logits = [keras.ops.convert_to_numpy(model.call_with_cache(ids, tuple(c) + extra, 1)[0]) for c in (grouped, repeated)]
    np.testing.assert_allclose(logits[0], logits[1], atol=1e-5)
    assert np.abs(logits[1][:beams] - logits[1][beams:]).max() > 1e-4  # the two images' rows differ


TORCH_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, keras
    assert keras.config.backend() == "torch"
    sys.path.insert(0, sys.argv[1])
    from tests.test_git import tiny_data
    from keras_models.git import build_git_captioner
    from keras_models.git.convert_hf import convert_checkpoint
    from pipelines.text import SPECIAL_TOKENS, make_tokenizer

    keras.utils.set_random_seed(0)
    model = build_git_captioner("tiny", make_tokenizer(SPECIAL_TOKENS + [f"w{i}" for i in range(40)]), dropout=0.0)
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    losses = model.fit(tiny_data(), batch_size=8, epochs=6, verbose=0).history["loss"]
    assert losses[-1] < losses[0] * 0.8, losses
    images = tiny_data(2, seed=1)["images"]
    for sampler in ("greedy", "beam", "top_k"):
        assert len(model.generate(images, max_length=10, sampler=sampler)) == 2

    converted = convert_checkpoint(sys.argv[2], sequence_length=24)
    reference = np.load(sys.argv[3])
    inputs = {k: reference[k] for k in ("images", "token_ids", "padding_mask")}
    logits = keras.ops.convert_to_numpy(converted(inputs))
    diff = np.max(np.abs(logits - reference["logits"]) * inputs["padding_mask"][..., None])
    assert diff < 1e-4, diff
    print("torch backend OK", diff)
    """
)


def test_torch_backend(checkpoint_a, tmp_path):
    hf, folder, _ = checkpoint_a
    images, token_ids, padding_mask = hf_inputs(hf)
    reference = tmp_path / "reference.npz"
    np.savez(reference, images=images, token_ids=token_ids, padding_mask=padding_mask,
             logits=hf_logits(hf, images, token_ids, padding_mask))
    env = {**os.environ, "KERAS_BACKEND": "torch"}
    result = subprocess.run(
        [sys.executable, "-c", TORCH_SCRIPT, str(REPO), str(folder), str(reference)],
        env=env, capture_output=True, text=True, timeout=400, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "torch backend OK" in result.stdout


def test_conv_stem_statistics_keep_up_with_a_short_fit():
    # Validation after a one-epoch fit uses the moving statistics: they must have caught up with the batches.
    stem = conv_stem(16, 32)
    images = np.random.default_rng(0).normal(3.0, 2.0, (4, 32, 32, 1)).astype("float32")
    for _ in range(30):
        training = keras.ops.convert_to_numpy(stem(images, training=True))
    inference = keras.ops.convert_to_numpy(stem(images, training=False))
    assert np.abs(inference - training).mean() < 0.3 * training.std()  # 0.18 at momentum 0.9, 0.73 at 0.99
