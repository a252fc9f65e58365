"""The GIT captioner task: LM head on `GitBackbone`, KV-cached decoding for every keras-hub sampler."""

from __future__ import annotations

import math

import keras
from keras import ops

from keras_models.captioner import ImageCaptioner, picked_log_probs
from keras_models.git.git_backbone import GitBackbone
from keras_models.git.git_presets import PRESETS
from keras_models.preprocessor import CaptionPreprocessor


def project(layer, x):
    """`layer(x)` as one 2-D product with the bias folded in (`[x, 1] @ [W; b]`) when `x` is one row on TensorFlow.

    One row is a decoding step of one caption. There XLA's CPU compiler turned the attention projections'
    3-D einsums into plain loops and fused each product with the bias add after it into a slower loop; as
    2-D products with their biases folded, git-base's 32 greedy tokens took 0.64 s against 0.97 s, the small
    shape's 0.13 s against 0.23 s (benchmarks/generation.py). XLA hoists the folded kernels out of the decoding
    loop (seen in the small shape's optimised HLO), so they are built once a call. Layers that cannot be
    folded (no bias, an einsum that is not a product over the input's last axes, mixed precision, LoRA,
    quantized), several rows, a dynamic batch (the SavedModel's) and the other backends call the layer as it is.
    """
    contracted = _contracted_axes(layer)
    if not (contracted and _one_static_row(x, contracted)):
        return layer(x)
    kept = tuple(layer.kernel.shape[contracted:])
    rows = tuple(x.shape[:-contracted])
    inputs = ops.reshape(x, (*rows, -1))
    inputs = ops.concatenate([inputs, ops.ones_like(inputs[..., :1])], axis=-1)
    kernel = ops.concatenate([ops.reshape(layer.kernel, (-1, math.prod(kept))),
                              ops.reshape(layer.bias, (1, -1))], axis=0)
    y = ops.reshape(ops.matmul(inputs, kernel), (*rows, *kept))
    return y if layer.activation is None else layer.activation(y)


def _one_static_row(x, features: int = 1) -> bool:
    """On TensorFlow, whether `x` is one row of its last `features` axes, its shape known when traced."""
    shape = tuple(x.shape[:-features])
    return keras.config.backend() == "tensorflow" and None not in shape and math.prod(shape) == 1


def _contracted_axes(layer) -> int:
    """How many of the input's last axes a float32 Dense or EinsumDense with a bias multiplies by its kernel's
    first axes (its output: the input's other axes, then the kernel's); 0 when `project` cannot fold it."""
    if (getattr(layer, "bias", None) is None or getattr(layer, "lora_enabled", False)
            or getattr(layer, "quantization_mode", None) or layer.compute_dtype != layer.variable_dtype):
        return 0
    if type(layer) is keras.layers.Dense:
        return 1
    if type(layer) is not keras.layers.EinsumDense:
        return 0
    inputs, rest = layer.equation.split(",")
    kernel, output = rest.split("->")
    for k in range(1, len(kernel)):
        if (inputs[-k:] == kernel[:k] and output == inputs[:-k] + kernel[k:]
                and tuple(layer.bias.shape) == tuple(layer.kernel.shape[k:])):
            return k
    return 0


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

    The decoding cache holds, per layer, `(image_keys, image_values, text_keys, text_values)`, heads first
    in the layouts the attention products read (keys `[B, num_heads, head_dim, length]`, values
    `[B, num_heads, length, head_dim]`, see `_heads_first`): the image ones (length N) computed once in
    `_build_cache` and never copied again (never repeated per beam either), the text ones (length T)
    written one position per step; with a concept head, the concept logits `[B, vocab]` follow.
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
        outputs = backbone(inputs)
        logits = self.next_token_logits(outputs["sequence_output"], outputs.get("concept_logits"))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

    fold_biases = True  # `project` in the decoding step; False calls each layer as it is (benchmarks.generation)

    def _project(self, layer, x):
        return project(layer, x) if self.fold_biases else layer(x)

    def next_token_logits(self, hidden, concept_logits=None):
        """LM head on text hidden states, plus the concept head's gated word bias if the backbone has it."""
        logits = self._project(self.lm_head, hidden)
        if self.backbone.concept_word_bias:  # the backbone refuses the word bias without a concept head
            logits = logits + self.backbone.concept_head.word_bias(hidden, concept_logits)
        return logits

    def compile(self, optimizer="auto", loss="auto", *, label_smoothing: float = 0.0, **kwargs):
        """`ImageCaptioner.compile`; with `label_smoothing > 0` the default loss smooths the targets."""
        if loss == "auto" and label_smoothing:
            loss = SparseCrossentropyWithLabelSmoothing(label_smoothing)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def make_generate_function(self):
        """keras-hub's compiled generation, with XLA on TensorFlow for generation alone.

        Keras leaves XLA off on CPU-only machines, but the fused decoding loop is about 1.4x
        faster at batch 1 there; training keeps `jit_compile` as it was set.
        """
        if self.generate_function is not None or self.run_eagerly or keras.config.backend() != "tensorflow":
            return super().make_generate_function()
        training_jit, self.jit_compile = self.jit_compile, True
        try:
            return super().make_generate_function()
        finally:
            self.jit_compile = training_jit

    def generate_step(self, inputs, stop_token_ids=None, score: bool = True):
        """`ImageCaptioner.generate_step` with the image keys/values outside the sampler's loop state.

        Beam search repeats and reorders its loop state per beam at every step; the image
        keys/values are the same for every beam of an image, so they stay one row per image.
        The chosen tokens are then scored in one teacher-forced pass of the text over the same
        image keys/values (`token_log_probs` in the outputs), not a second pass of the whole model;
        `score=False` leaves that out (the ids alone, as Hugging Face's `generate` returns them).
        """
        images, token_ids, padding_mask = inputs["images"], inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(images, token_ids, padding_mask)
        layers, per_image = self._split_cache(cache)
        image_kv = tuple(layer[:2] for layer in layers)

        def step(ids, text_kv, index):
            beams = ops.shape(ids)[0] // ops.shape(images)[0]  # an image's beams are adjacent rows
            per_row = tuple(ops.repeat(logits, beams, axis=0) for logits in per_image)
            full = tuple((*image, *text) for image, text in zip(image_kv, text_kv)) + per_row
            logits, hidden, cache = self.call_with_cache(ids, full, index)
            return logits, hidden, tuple(layer[2:] for layer in self._split_cache(cache)[0])

        text_kv = tuple(layer[2:] for layer in layers)
        outputs = self._sample(token_ids, padding_mask, hidden_states, text_kv, step, stop_token_ids)
        if not score:
            return outputs
        generated = outputs["token_ids"]
        logits, _, _ = self.call_with_cache(generated[:, :-1], cache, 0)
        outputs["token_log_probs"] = picked_log_probs(logits, generated, outputs["padding_mask"])
        return outputs

    def _layer(self, layer, x, parts):
        """One post-LN decoder layer for queries `x` over `parts` [(keys, values, mask or None, grouped)].

        The parts are attended to as one sequence (one softmax), so the image keys/values stay
        where they are instead of being copied next to the text ones at every step. A `grouped`
        part holds one row per image while `x` holds one per beam (an image's beams are adjacent).
        Keys and values are heads first (`_heads_first`), so the products read them as they are.
        """
        attention = layer._self_attention_layer
        query = self._project(attention._query_dense, x) * ops.cast(attention._inverse_sqrt_key_dim, x.dtype)
        rows, length, heads = ops.shape(query)[0], ops.shape(query)[1], query.shape[2]
        query = ops.transpose(query, (0, 2, 1, 3))  # [rows, H, T, head_dim]

        def per_image(t, keys):  # [rows, H, T, *] -> [images, H, rows / images * T, *]
            t = ops.reshape(t, (ops.shape(keys)[0], -1, heads, length, t.shape[-1]))
            return ops.reshape(ops.transpose(t, (0, 2, 1, 3, 4)), (ops.shape(keys)[0], heads, -1, t.shape[-1]))

        def per_row(t):  # [images, H, rows / images * T, *] -> [rows, H, T, *]
            t = ops.reshape(t, (ops.shape(t)[0], heads, -1, length, t.shape[-1]))
            return ops.reshape(ops.transpose(t, (0, 2, 1, 3, 4)), (rows, heads, length, t.shape[-1]))

        scores = []
        for keys, _, mask, grouped in parts:  # [rows, H, T, head_dim] @ [rows, H, head_dim, K]
            score = per_row(ops.matmul(per_image(query, keys), keys)) if grouped else ops.matmul(query, keys)
            score = ops.cast(score, "float32")
            scores.append(score if mask is None else ops.where(mask[:, None, :, :], score, -1e9))
        probs = ops.cast(ops.softmax(ops.concatenate(scores, axis=-1), axis=-1), x.dtype)
        context, start = 0, 0
        for (keys, values, _, grouped), score in zip(parts, scores):  # [rows, H, T, K] @ [rows, H, K, head_dim]
            end = start + ops.shape(score)[-1]
            part = probs[..., start:end]
            context = context + (per_row(ops.matmul(per_image(part, keys), values)) if grouped
                                 else ops.matmul(part, values))
            start = end
        context = ops.transpose(context, (0, 2, 1, 3))  # [rows, T, H, head_dim]
        x = layer._self_attention_layer_norm(x + self._project(attention._output_dense, context))
        intermediate = self._project(layer._feedforward_intermediate_dense, x)
        feedforward = self._project(layer._feedforward_output_dense, intermediate)
        return layer._feedforward_layer_norm(x + feedforward)

    def _build_cache(self, images, token_ids, padding_mask):
        """Encode the images once and run [image; prompt]: (text hidden states, filled cache).

        Image rows see only image tokens, so they run first and alone; the prompt then
        attends to their keys/values and to itself (causal, padding hidden).
        """
        backbone = self.backbone
        image, concept_logits = backbone.encode_images(images, return_concept_logits=True)
        text = backbone.embed_text(token_ids)
        positions = ops.arange(ops.shape(token_ids)[1])
        causal = ops.less_equal(positions[None, :], positions[:, None])
        text_mask = ops.logical_and(causal[None], ops.cast(padding_mask, "bool")[:, None, :])
        cache = []
        for layer in backbone.transformer_layers:
            attention = layer._self_attention_layer
            image_kv = _heads_first(attention._key_dense(image), attention._value_dense(image))
            text_kv = _heads_first(self._project(attention._key_dense, text),
                                   self._project(attention._value_dense, text))
            text = self._layer(layer, text, [(*image_kv, None, False), (*text_kv, text_mask, False)])
            image = self._layer(layer, image, [(*image_kv, None, False)])
            cache.append((*image_kv, *text_kv))
        return text, tuple(cache) + (() if concept_logits is None else (concept_logits,))

    def _split_cache(self, cache):
        """(per-layer key/value tuples, what follows them: the concept logits, one row per image, if any)."""
        layers = len(self.backbone.transformer_layers)
        return cache[:layers], tuple(cache[layers:])

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """Decode `token_ids` `[B, L]` at text positions `cache_update_index...`: (logits, hidden, cache)."""
        backbone = self.backbone
        batch_size, query_length = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        queries = ops.arange(query_length)[:, None] + cache_update_index
        cache, per_image = self._split_cache(cache)
        keys = ops.arange(ops.shape(cache[0][2])[-1])[None, :]
        mask = ops.broadcast_to(ops.less_equal(keys, queries)[None], (batch_size, query_length, ops.shape(keys)[1]))
        x = backbone.embed_text(token_ids, start_index=cache_update_index)  # text positions count text only
        new_cache = []
        for layer, (image_keys, image_values, text_keys, text_values) in zip(backbone.transformer_layers, cache):
            attention = layer._self_attention_layer
            keys, values = _heads_first(self._project(attention._key_dense, x),
                                        self._project(attention._value_dense, x))
            text_keys = ops.slice_update(text_keys, [0, 0, 0, cache_update_index], keys)
            text_values = ops.slice_update(text_values, [0, 0, cache_update_index, 0], values)
            parts = [(image_keys, image_values, None, True), (text_keys, text_values, mask, False)]
            x = self._layer(layer, x, parts)
            new_cache.append((image_keys, image_values, text_keys, text_values))
        return self.next_token_logits(x, *per_image), x, tuple(new_cache) + per_image


def _heads_first(keys, values):
    """Keys `[B, L, H, head_dim]` as `[B, H, head_dim, L]`, values as `[B, H, L, head_dim]`.

    The layouts the decoding step's attention products read as they are: cached so, the image keys/values
    are not transposed again at every step (XLA did that at batch 8: 102 ms of a 0.61 s call, small shape).
    """
    return ops.transpose(keys, (0, 2, 3, 1)), ops.transpose(values, (0, 2, 1, 3))


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
