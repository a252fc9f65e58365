"""Where each word looked: GIT's recomputed text->patch attention and the per-word maps of both captioners."""

import numpy as np
import pytest
from keras import ops

from keras_models.registry import build_captioner
from pipelines.text import SPECIAL_TOKENS, make_tokenizer
from serving.attention import attention_grid, attention_maps, git_attention_maps, word_maps

VOCABULARY = SPECIAL_TOKENS + ["chest", "x", "##ray", "pa", "view", "no", "effusion", "-", ":", "of", "the"]


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer(VOCABULARY)


@pytest.fixture(scope="module", params=["cnn_gru", "git"])
def model(request, tokenizer):
    return build_captioner(request.param, "tiny", tokenizer, sequence_length=8)


def ids(tokenizer, *tokens: str) -> list[int]:
    return [VOCABULARY.index(t) for t in tokens]


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 32, 32, 1)).astype("float32")


def test_git_matches_softmax_of_the_last_layer_projections(tokenizer):
    """Recomputed from the last decoder layer's own query/key projections, as the layer attends."""
    model = build_captioner("git", "tiny", tokenizer, sequence_length=8)
    backbone = model.backbone
    token_ids = np.array([ids(tokenizer, "[CLS]", "chest", "x", "##ray", "[SEP]", "[PAD]"),
                          ids(tokenizer, "[CLS]", "no", "effusion", "[SEP]", "[PAD]", "[PAD]")], "int32")
    pixels = images(2)
    x = ops.concatenate([backbone.encode_images(pixels), backbone.embed_text(token_ids)], axis=1)
    mask = ops.convert_to_numpy(backbone.attention_mask(ops.cast(token_ids != 0, "int32")))
    for layer in backbone.transformer_layers[:-1]:
        x = layer(x, decoder_attention_mask=mask, use_causal_mask=False)
    attention = backbone.transformer_layers[-1]._self_attention_layer
    query = ops.convert_to_numpy(attention._query_dense(x))
    key = ops.convert_to_numpy(attention._key_dense(x))
    scores = np.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(query.shape[-1])
    scores = np.where(mask[:, None], scores, -1e9)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    n = backbone.num_image_tokens
    expected = probs.mean(1)[:, n:, 1:n]
    expected /= expected.sum(-1, keepdims=True)
    got = ops.convert_to_numpy(git_attention_maps(model, pixels, token_ids))
    assert got.shape == (2, 6, n - 1)  # text rows over image patches, the class token dropped
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_maps_are_distributions_over_the_grid(model, tokenizer):
    token_ids = np.array([ids(tokenizer, "[CLS]", "chest", "pa", "view", "[SEP]")], "int32")
    maps = attention_maps(model, images(1), token_ids)
    h, w = attention_grid(model)
    assert maps.shape == (1, 5, h * w) and maps.dtype == np.float32
    np.testing.assert_allclose(maps.sum(-1), 1.0, atol=1e-5)
    assert (maps >= 0).all()


def test_cnn_gru_uses_its_own_attention(tokenizer):
    model = build_captioner("cnn_gru", "tiny", tokenizer, sequence_length=8)
    token_ids = np.array([ids(tokenizer, "[CLS]", "no", "effusion", "[SEP]")], "int32")
    pixels = images(1, seed=1)
    np.testing.assert_allclose(attention_maps(model, pixels, token_ids),
                               ops.convert_to_numpy(model.attention_maps(pixels, token_ids)), atol=1e-6)
    assert attention_grid(model) == tuple(model.backbone.feature_grid)


def test_words_merge_wordpieces_and_take_the_row_that_predicted_them(model, tokenizer):
    token_ids = ids(tokenizer, "[CLS]", "chest", "x", "##ray", ":", "[SEP]", "[PAD]", "[PAD]")
    pixels = images(1, seed=2)
    words = word_maps(model, pixels[0], token_ids)
    assert [w for w, _ in words] == ["chest", "xray", ":"]
    h, w = attention_grid(model)
    rows = attention_maps(model, pixels, np.array([token_ids[:6]], "int32"))[0].reshape(-1, h, w)
    np.testing.assert_allclose(words[0][1], rows[0], atol=1e-6)  # "chest" was predicted at [CLS]
    np.testing.assert_allclose(words[1][1], (rows[1] + rows[2]) / 2, atol=1e-6)  # "x" + "##ray"
    np.testing.assert_allclose(words[2][1], rows[3], atol=1e-6)


def test_an_empty_caption_has_no_words(model, tokenizer):
    assert word_maps(model, images(1)[0], ids(tokenizer, "[CLS]", "[SEP]", "[PAD]")) == []
