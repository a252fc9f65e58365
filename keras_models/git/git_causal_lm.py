"""The GIT captioner task: LM head on `GitBackbone`, KV-cached decoding for every keras-hub sampler."""

from __future__ import annotations

import keras
from keras import ops

from keras_models.captioner import ImageCaptioner
from keras_models.git.git_backbone import GitBackbone
from keras_models.git.git_presets import PRESETS
from keras_models.preprocessor import CaptionPreprocessor


@keras.saving.register_keras_serializable(package="medcap")
class SparseCrossentropyWithLabelSmoothing(keras.losses.Loss):
    """Cross-entropy from logits against integer labels, with label smoothing over the vocabulary.

    Per-token losses; padding is masked by the sample weights the preprocessor gives.
    """

    def __init__(self, label_smoothing: float = 0.1, name: str = "smoothed_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = label_smoothing

    def call(self, y_true, y_pred):
        log_probs = ops.log_softmax(ops.cast(y_pred, "float32"), axis=-1)
        labels = ops.expand_dims(ops.cast(y_true, "int32"), -1)
        nll = -ops.squeeze(ops.take_along_axis(log_probs, labels, axis=-1), -1)
        uniform = -ops.mean(log_probs, axis=-1)
        return (1.0 - self.label_smoothing) * nll + self.label_smoothing * uniform

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


@keras.saving.register_keras_serializable(package="medcap")
class GitCaptioner(ImageCaptioner):
    """GIT as a captioner: `GitBackbone` + untied `Linear(hidden_dim, vocab)` head on the text positions.

    The decoding cache holds, per layer, keys and values of the image tokens
    (computed once in `_build_cache`) followed by those of the text tokens:
    `[B, num_layers, 2, N + T, num_heads, head_dim]`.
    """

    backbone_cls = GitBackbone
    preprocessor_cls = CaptionPreprocessor

    def __init__(self, backbone: GitBackbone, preprocessor: CaptionPreprocessor | None = None, **kwargs):
        if preprocessor is not None and preprocessor.sequence_length > backbone.max_sequence_length:
            raise ValueError(
                f"sequence_length {preprocessor.sequence_length} exceeds the model's "
                f"{backbone.max_sequence_length} text positions."
            )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor
        self.lm_head = keras.layers.Dense(
            backbone.vocabulary_size,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
            dtype=backbone.dtype_policy,
            name="lm_head",
        )
        # === Functional model ===
        inputs = backbone.input
        outputs = self.lm_head(backbone(inputs))
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

    def compile(self, optimizer="auto", loss="auto", *, label_smoothing: float = 0.0, **kwargs):
        """`ImageCaptioner.compile`; with `label_smoothing > 0` the default loss smooths the targets."""
        if loss == "auto" and label_smoothing:
            loss = SparseCrossentropyWithLabelSmoothing(label_smoothing)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def _decode(self, x, mask, cache, cache_update_index):
        """Run the decoder layers over `x`, writing keys/values at `cache_update_index` (absolute)."""
        caches = []
        for i, layer in enumerate(self.backbone.transformer_layers):
            x, layer_cache = layer(
                x,
                decoder_attention_mask=mask,
                self_attention_cache=cache[:, i, ...],
                self_attention_cache_update_index=cache_update_index,
                use_causal_mask=False,
            )
            caches.append(layer_cache)
        return x, ops.stack(caches, axis=1)

    def _build_cache(self, images, token_ids, padding_mask):
        """Encode the images once and run [image; prompt]: (text hidden states, filled cache)."""
        backbone = self.backbone
        x = ops.concatenate([backbone.encode_images(images), backbone.embed_text(token_ids)], axis=1)
        batch_size, length = ops.shape(x)[0], ops.shape(x)[1]
        head_dim = backbone.hidden_dim // backbone.num_heads
        shape = (batch_size, backbone.num_layers, 2, length, backbone.num_heads, head_dim)
        cache = ops.zeros(shape, dtype=self.compute_dtype)
        x, cache = self._decode(x, backbone.attention_mask(padding_mask), cache, 0)
        return x[:, backbone.num_image_tokens :, :], cache

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Decode `token_ids` `[B, L]` at text positions `cache_update_index...`: (logits, hidden, cache)."""
        backbone = self.backbone
        index = backbone.num_image_tokens + cache_update_index  # where this text position sits in the cache
        batch_size, query_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        queries = ops.arange(query_length)[:, None] + index
        keys = ops.arange(ops.shape(cache)[3])[None, :]
        mask = ops.broadcast_to(ops.less_equal(keys, queries)[None], (batch_size, query_length, ops.shape(cache)[3]))
        x = backbone.embed_text(token_ids, start_index=cache_update_index)  # text positions count text only
        x, cache = self._decode(x, mask, cache, index)
        return self.lm_head(x), x, cache


def build_git_captioner(preset: str, tokenizer, sequence_length: int | None = None, **overrides) -> GitCaptioner:
    """A compiled `GitCaptioner` from a preset name.

    `overrides` replace backbone kwargs (e.g. `dropout`, `dtype="mixed_float16"`);
    `image_config` (a dict) is merged into the preset's; `label_smoothing` goes to `compile`.
    """
    if preset not in PRESETS:
        raise ValueError(f"Unknown GIT preset {preset!r}; choose one of {sorted(PRESETS)}.")
    config = PRESETS[preset]
    image_config = {**config["image_config"], **overrides.pop("image_config", {})}
    label_smoothing = overrides.pop("label_smoothing", 0.0)
    sequence_length = sequence_length or config["sequence_length"]
    backbone = GitBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_size=image_config["image_size"],
        num_channels=image_config["channels"],
        **{**config["backbone"], **overrides},
    )
    preprocessor = CaptionPreprocessor(tokenizer, sequence_length=sequence_length, image_config=image_config)
    model = GitCaptioner(backbone=backbone, preprocessor=preprocessor)
    model.compile(label_smoothing=label_smoothing)
    return model
