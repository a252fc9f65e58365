"""Where each word looked: per-token attention over the image for both captioners, as [B, T, h*w] maps.

- CNN-GRU: its own `attention_maps` (the additive attention weights over the CNN feature map).
- GIT: the last decoder layer's self-attention probabilities, averaged over heads, text rows over the
  image-patch columns (the ViT class token dropped), renormalised to sum to 1 per row.

Row t of a map is the attention while the model read token t and predicted token t + 1, so the
map of the word at position i (i >= 1, after [CLS]) is row i - 1: `word_maps` does that bookkeeping.
Uses `keras.ops` only, like the models.
"""

from __future__ import annotations

import numpy as np
from keras import ops


def attention_grid(model) -> tuple[int, int]:
    """(h, w) of the grid a captioner's attention maps cover."""
    backbone = model.backbone
    if hasattr(backbone, "feature_grid"):  # CNN-GRU
        return tuple(backbone.feature_grid)
    side = backbone.image_size // backbone.patch_size  # GIT
    return side, side


def git_attention_maps(model, images, token_ids, padding_mask=None):
    """GIT: last decoder layer's text->image-patch attention, mean over heads, renormalised: [B, T, patches]."""
    backbone = model.backbone
    token_ids = ops.convert_to_tensor(token_ids, dtype="int32")
    if padding_mask is None:
        padding_mask = ops.not_equal(token_ids, 0)  # [PAD] is id 0
    padding_mask = ops.cast(padding_mask, "int32")
    images = ops.convert_to_tensor(images, dtype="float32")
    x = ops.concatenate([backbone.encode_images(images), backbone.embed_text(token_ids)], axis=1)
    mask = backbone.attention_mask(padding_mask)
    layers = backbone.transformer_layers
    for layer in layers[:-1]:
        x = layer(x, decoder_attention_mask=mask, use_causal_mask=False)
    last = layers[-1]
    query = last._self_attention_layer_norm(x) if last.normalize_first else x
    _, scores = last._self_attention_layer(query=query, value=query, attention_mask=mask,
                                           return_attention_scores=True)  # [B, heads, N+T, N+T]
    n, vision = backbone.num_image_tokens, backbone.vision_encoder.num_tokens  # (a concept token may follow)
    text_to_patches = ops.mean(ops.cast(scores, "float32"), axis=1)[:, n:, 1:vision]  # no class token (column 0)
    return text_to_patches / ops.maximum(ops.sum(text_to_patches, axis=-1, keepdims=True), 1e-9)


def attention_maps(model, images, token_ids, padding_mask=None) -> np.ndarray:
    """Per-token attention over the image grid for either captioner: float32 [B, T, h*w], rows sum to 1."""
    if hasattr(model, "attention_maps"):
        maps = model.attention_maps(images, token_ids, padding_mask)
    else:
        maps = git_attention_maps(model, images, token_ids, padding_mask)
    return np.asarray(ops.convert_to_numpy(maps), dtype="float32")


def word_maps(model, image, token_ids) -> list[tuple[str, np.ndarray]]:
    """[(word, map [h, w])] for one image [H, W, C] and its generated ids [CLS] ... [SEP]; WordPiece
    pieces of one word ("##...") are merged and their maps averaged."""
    tokenizer = model.preprocessor.tokenizer
    ids = [int(t) for t in np.asarray(token_ids).reshape(-1)]
    if tokenizer.end_token_id in ids:
        ids = ids[: ids.index(tokenizer.end_token_id)]
    ids = [t for t in ids if t != tokenizer.pad_token_id]
    if len(ids) < 2:
        return []
    maps = attention_maps(model, np.asarray(image, "float32")[None], np.asarray([ids], "int32"))[0]
    grid = attention_grid(model)
    special = set(tokenizer.special_token_ids)
    words: list[tuple[str, list[np.ndarray]]] = []
    for position in range(1, len(ids)):
        if ids[position] in special:
            continue
        piece = tokenizer.id_to_token(ids[position])
        row = maps[position - 1].reshape(grid)
        if piece.startswith("##") and words:
            words[-1] = (words[-1][0] + piece[2:], words[-1][1] + [row])
        else:
            words.append((piece, [row]))
    return [(word, np.mean(rows, axis=0)) for word, rows in words]
