"""The captioner API that the CNN-GRU and GIT models share.

A captioner is a `keras_hub.models.CausalLM` whose functional inputs are
`{"images": float [B, H, W, C], "token_ids": int [B, T], "padding_mask": bool [B, T]}`
and whose output is next-token logits `[B, T, vocab]`. Its preprocessor is a
`CaptionPreprocessor`. A subclass supplies two methods and gets `generate()`
with every keras-hub sampler (greedy, beam, top-k, top-p, ...):

- `_build_cache(images, token_ids, padding_mask) -> (hidden_states, cache)`:
  encode the images once and run the prompt; `cache` is any nest of tensors
  whose leading axis is the batch (beam search repeats it per beam).
- `call_with_cache(token_ids, cache, cache_update_index) -> (logits, hidden_states, cache)`:
  one decoding step for text position `cache_update_index` (0 is [CLS]).

`generate()` and the SavedModel score each caption (mean log-probability per token) with
`generated_log_probs`: a teacher-forced pass of the whole model, unless the subclass's
`generate_step` already scored its tokens from its cache (GIT does).
"""

from __future__ import annotations

import keras
import keras_hub
import numpy as np
from keras import ops

from keras_models.beam_search import BeamSampler, stop_tokens

SAMPLERS = ("greedy", "beam", "top_k", "top_p", "random")


def get_sampler(sampler="greedy", num_beams: int = 3, k: int = 5, p: float = 0.9, seed=None):
    """A keras-hub sampler from a name (or the instance itself)."""
    if isinstance(sampler, keras_hub.samplers.Sampler):
        return sampler
    if sampler == "greedy":
        return keras_hub.samplers.GreedySampler()
    if sampler == "beam":
        return BeamSampler(num_beams=num_beams)  # keras-hub's search, reordering whole rows
    if sampler == "top_k":
        return keras_hub.samplers.TopKSampler(k=k, seed=seed)
    if sampler == "top_p":
        return keras_hub.samplers.TopPSampler(p=p, seed=seed)
    if sampler == "random":
        return keras_hub.samplers.RandomSampler(seed=seed)
    raise ValueError(f"Unknown sampler {sampler!r}; choose one of {SAMPLERS} or pass a keras_hub Sampler.")


class ImageCaptioner(keras_hub.models.CausalLM):
    """Base class: image-conditioned causal LM with `generate()` and caption scoring."""

    def compile(self, optimizer="auto", loss="auto", *, weighted_metrics="auto", sampler="greedy", **kwargs):
        """Like `CausalLM.compile`, with masked token accuracy and a greedy default sampler.

        The default metrics also report `caption_loss`, the masked token cross-entropy alone: `loss`
        adds a concept head's word loss (a sum over the vocabulary), which can overfit while captions improve.
        """
        if optimizer == "auto":
            optimizer = keras.optimizers.Adam(1e-3)
        if weighted_metrics == "auto":
            weighted_metrics = [
                keras.metrics.SparseCategoricalAccuracy(name="token_accuracy"),
                keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="caption_loss"),
            ]
        sampler = BeamSampler() if sampler == "beam" else sampler  # ours (beam_search.py), keras-hub's default width
        super().compile(optimizer=optimizer, loss=loss, weighted_metrics=weighted_metrics, sampler=sampler, **kwargs)

    def get_compile_config(self) -> dict:
        """Keep the optimizer in `.keras` files so a reloaded model can train on where it stopped."""
        if not (self.compiled and self.optimizer):
            return {}
        return {"optimizer": keras.saving.serialize_keras_object(self.optimizer)}

    def compile_from_config(self, config: dict) -> None:
        """Recompile a loaded model with its saved optimizer (its variables are restored next)."""
        optimizer = config.get("optimizer")
        self.compile(optimizer=keras.saving.deserialize_keras_object(optimizer) if optimizer else "auto")
        if self.built:
            self.optimizer.build(self.trainable_variables)

    @property
    def image_config(self) -> dict:
        """How `pipelines.images.preprocess_image` must prepare this model's pixels."""
        return self.preprocessor.image_config

    # --- to be supplied by subclasses -------------------------------------------------
    def _build_cache(self, images, token_ids, padding_mask):
        raise NotImplementedError

    def call_with_cache(self, token_ids, cache, cache_update_index):
        raise NotImplementedError

    # --- generation -------------------------------------------------------------------
    def generate_step(self, inputs, stop_token_ids=None, score: bool = True):
        """One compilable batch of generation: the keras-hub sampler loop over `call_with_cache`.

        A subclass that can score the chosen tokens from its cache adds `token_log_probs` to the outputs
        unless `score=False`; here there is none, and `generated_log_probs` runs the teacher-forced pass.
        """
        images, token_ids, padding_mask = inputs["images"], inputs["token_ids"], inputs["padding_mask"]
        hidden_states, cache = self._build_cache(images, token_ids, padding_mask)
        return self._sample(token_ids, padding_mask, hidden_states, cache, self.call_with_cache, stop_token_ids)

    def _sample(self, token_ids, padding_mask, hidden_states, cache, step, stop_token_ids=None):
        """The sampler's loop from the prompt; `step(ids, cache, index) -> (logits, hidden, cache)` is one step."""
        index = ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=-1))

        def next(prompt, cache, index):
            batch_size = ops.shape(prompt)[0]
            last = ops.slice(prompt, [0, index - 1], [batch_size, 1])
            logits, hidden, cache = step(last, cache, index - 1)
            return ops.squeeze(logits, axis=1), ops.squeeze(hidden, axis=1), cache

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=index,
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        return {"token_ids": token_ids, "padding_mask": generated_mask(token_ids, padding_mask, stop_token_ids)}

    def token_log_probs(self, inputs):
        """Teacher-forced log-probability of each token `token_ids[:, 1:]`, zero where masked."""
        inputs = {key: ops.convert_to_tensor(value) for key, value in inputs.items()}
        logits = self(
            {
                "images": inputs["images"],
                "token_ids": inputs["token_ids"][:, :-1],
                "padding_mask": inputs["padding_mask"][:, :-1],
            }
        )
        return picked_log_probs(logits, inputs["token_ids"], inputs["padding_mask"])

    def generated_log_probs(self, images, outputs):
        """Log-probabilities of `generate_step`'s tokens (`[B, T - 1]`, zero where masked).

        A `generate_step` that scored its tokens from its decoding cache returns them as
        `outputs["token_log_probs"]` (GIT: no second pass of the image encoder); otherwise
        a teacher-forced pass of the whole model scores them.
        """
        if "token_log_probs" in outputs:
            return outputs["token_log_probs"]
        return self.token_log_probs(
            {"images": images, "token_ids": outputs["token_ids"], "padding_mask": outputs["padding_mask"]}
        )

    def generate(
        self,
        images,
        max_length: int | None = None,
        sampler="greedy",
        num_beams: int = 3,
        batch_size: int = 32,
        return_details: bool = False,
    ):
        """Caption preprocessed images (`[B, H, W, C]` floats from `pipelines.images`).

        Returns a list of caption strings, or with `return_details` a dict with
        `captions`, `scores` (mean log-probability per generated token, [SEP]
        included), `token_ids` and `token_log_probs`.
        """
        key = (sampler, num_beams) if isinstance(sampler, str) else sampler
        if getattr(self, "_sampler_key", None) != key:  # a new sampler means a new compiled function
            self.sampler, self.generate_function = get_sampler(sampler, num_beams=num_beams), None
            self._sampler_key = key
        generate_function = self.make_generate_function()
        max_length = max_length or self.preprocessor.sequence_length
        images = np.asarray(images, dtype="float32")
        stop = (self.preprocessor.tokenizer.end_token_id,)
        details = {"captions": [], "scores": [], "token_ids": [], "token_log_probs": []}
        for start in range(0, len(images), batch_size):
            inputs = self.preprocessor.generate_preprocess(
                {"images": images[start : start + batch_size]}, sequence_length=max_length
            )
            outputs = generate_function(inputs, stop_token_ids=stop)
            log_probs = ops.convert_to_numpy(self.generated_log_probs(inputs["images"], outputs))
            mask = ops.convert_to_numpy(outputs["padding_mask"])[:, 1:]
            captions = self.preprocessor.generate_postprocess(
                {k: ops.convert_to_numpy(outputs[k]) for k in ("token_ids", "padding_mask")}
            )
            details["captions"] += [as_text(c) for c in np.atleast_1d(ops.convert_to_numpy(captions))]
            details["scores"] += list(log_probs.sum(-1) / np.maximum(mask.sum(-1), 1))
            details["token_ids"] += list(ops.convert_to_numpy(outputs["token_ids"]))
            details["token_log_probs"] += [row[m] for row, m in zip(log_probs, mask.astype(bool))]
        if not return_details:
            return details["captions"]
        details["scores"] = np.asarray(details["scores"], dtype="float32")
        return details


def as_text(value) -> str:
    """A detokenized caption (bytes or str) as a clean Python string."""
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return " ".join(str(value).split())


def picked_log_probs(logits, token_ids, padding_mask):
    """Log-probability of each token `token_ids[:, 1:]` under `logits` `[B, T - 1, vocab]`, zero where masked."""
    log_probs = ops.log_softmax(ops.cast(logits, "float32"), axis=-1)
    targets = ops.expand_dims(token_ids[:, 1:], -1)
    picked = ops.squeeze(ops.take_along_axis(log_probs, targets, axis=-1), -1)
    return picked * ops.cast(padding_mask[:, 1:], "float32")


def generated_mask(token_ids, padding_mask, stop_token_ids):
    """Mask of the prompt and the generated tokens up to and including the first stop token."""
    if stop_token_ids is None:
        return ops.ones_like(token_ids, dtype="bool")
    stops = ops.cast(stop_tokens(token_ids, stop_token_ids, padding_mask), "int32")
    after_stop = ops.cumsum(stops, axis=-1) - stops
    return ops.logical_not(ops.cast(after_stop, "bool"))
