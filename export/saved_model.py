"""A trained captioner -> a versioned SavedModel that TF Serving loads: encoded bytes in, captions out.

Signatures (inputs `images`: string [batch], dynamic batch):
- `serving_default`: greedy captions -> `captions` string [batch], `scores` float [batch]
  (mean log-probability per generated token).
- `beam_search`: the same with beam search (`num_beams` fixed at export time).

Inside the graph are the very functions training used: `pipelines.images.preprocess_images`
for pixels, the model's `generate_step` with a keras-hub sampler (for beam search our subclass,
`keras_models.beam_search`), and the model's WordPiece tokenizer (TensorFlow Text ops) for detokenization. Nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import keras
import keras_hub
import tensorflow as tf

from keras_models.beam_search import BeamSampler
from keras_models.captioner import ImageCaptioner
from pipelines.images import MAX_PIXELS, preprocess_images

INPUT_NAME = "images"

# Keras (TensorFlow backend) also traces a model's raw `call` as an implicit signature when
# it is saved. Our signatures are the explicit bytes-in/captions-out endpoints below, and the
# raw call with an unknown caption length is neither needed nor traceable for the GRU loop.
ImageCaptioner._default_save_signature = property(lambda self: None)


def captions_from_ids(tokenizer, token_ids: tf.Tensor, padding_mask: tf.Tensor) -> tf.Tensor:
    """Generated ids -> caption strings in the graph: drop specials and padding, then detokenize."""
    special = tf.constant(tokenizer.special_token_ids, dtype=token_ids.dtype)
    is_special = tf.reduce_any(tf.equal(token_ids[..., None], special), axis=-1)
    keep = tf.logical_and(tf.cast(padding_mask, tf.bool), tf.logical_not(is_special))
    return tokenizer.detokenize(tf.ragged.boolean_mask(token_ids, keep))


def _caption_fn(model, sampler, max_length: int, max_pixels: int):
    """A graph function bytes[B] -> {captions, scores} using `sampler`."""
    tokenizer = model.preprocessor.tokenizer
    stop = (tokenizer.end_token_id,)

    def caption(images: tf.Tensor) -> dict:
        model.sampler = sampler  # read by generate_step while this endpoint is traced
        pixels = preprocess_images(images, model.image_config, max_pixels)
        inputs = model.preprocessor.generate_preprocess({"images": pixels}, sequence_length=max_length)
        outputs = model.generate_step(inputs, stop_token_ids=stop)
        log_probs = model.generated_log_probs(pixels, outputs)
        counts = tf.reduce_sum(tf.cast(outputs["padding_mask"][:, 1:], tf.float32), axis=-1)
        return {
            "captions": captions_from_ids(tokenizer, outputs["token_ids"], outputs["padding_mask"]),
            "scores": tf.reduce_sum(log_probs, axis=-1) / tf.maximum(counts, 1.0),
        }

    return caption


def build_archive(model, max_length: int | None = None, num_beams: int = 3, max_pixels: int = MAX_PIXELS):
    """A Keras ExportArchive with the greedy `serving_default` and the `beam_search` endpoints."""
    if keras.config.backend() != "tensorflow":
        raise RuntimeError("Export needs KERAS_BACKEND=tensorflow (SavedModels are TensorFlow graphs).")
    max_length = max_length or model.preprocessor.sequence_length
    archive = keras.export.ExportArchive()
    archive.track(model)
    signature = [tf.TensorSpec([None], tf.string, name=INPUT_NAME)]
    endpoints = {
        "serving_default": keras_hub.samplers.GreedySampler(),
        "beam_search": BeamSampler(num_beams=num_beams),  # keras-hub's search, reordering whole rows
    }
    for name, sampler in endpoints.items():
        archive.add_endpoint(name, _caption_fn(model, sampler, max_length, max_pixels), input_signature=signature)
    model.sampler, model.generate_function = keras_hub.samplers.GreedySampler(), None
    return archive


def next_version(model_dir: Path) -> int:
    """One more than the highest integer version directory (TF Serving ignores other names)."""
    versions = [int(p.name) for p in model_dir.glob("*") if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def export_model(
    model, base_dir: str | Path, name: str, version: int | None = None, num_beams: int = 3,
    max_length: int | None = None,
) -> Path:
    """Write `{base_dir}/{name}/{version}/` atomically: export to a hidden temp dir, then rename.

    TF Serving may load a version as soon as `saved_model.pb` appears, so the
    version directory only ever appears complete. Returns the version path.
    """
    model_dir = Path(base_dir) / name
    model_dir.mkdir(parents=True, exist_ok=True)
    version = version if version is not None else next_version(model_dir)
    target = model_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target} exists; choose another --version.")
    tmp = model_dir / f".tmp-{version}-{uuid.uuid4().hex[:8]}"
    try:
        build_archive(model, max_length=max_length, num_beams=num_beams).write_out(str(tmp), verbose=False)
        (tmp / "assets.extra").mkdir(exist_ok=True)
        info = {"image_config": model.image_config, "num_beams": num_beams, "class": type(model).__name__}
        (tmp / "assets.extra" / "medcap.json").write_text(json.dumps(info, indent=2))
        os.rename(tmp, target)  # atomic on one filesystem
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
