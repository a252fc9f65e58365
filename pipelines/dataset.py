"""tf.data input pipelines: records -> batches of `{"images", "captions"}` for a captioner.

Images go through `pipelines.images` (the same functions the SavedModel runs);
captions stay strings here and are tokenized by the model's own preprocessor
(`CaptionPreprocessor`), which keras-hub's `fit()` maps over the dataset.
"""

from __future__ import annotations

from typing import Sequence

import keras
import tensorflow as tf

from pipelines.images import load_image, normalize_image
from pipelines.text import normalize_caption

AUTOTUNE = tf.data.AUTOTUNE


def make_augmenter(seed: int = 0) -> keras.Sequential:
    """Training-only augmentation that keeps the caption true.

    Small rotation, scale and contrast changes. Never a horizontal flip: it
    would swap the patient's left and right and make the caption false.
    """
    return keras.Sequential(
        [
            keras.layers.RandomRotation(0.02, fill_mode="constant", seed=seed),  # about +-7 degrees
            keras.layers.RandomZoom(0.08, fill_mode="constant", seed=seed + 1),
            keras.layers.RandomContrast(0.15, value_range=(0.0, 1.0), seed=seed + 2),
        ],
        name="augment",
    )


def make_dataset(
    records: Sequence,
    image_config: dict,
    batch_size: int = 32,
    training: bool = False,
    seed: int = 0,
    cache: bool | str = True,
    augment: bool = True,
    deterministic: bool = False,
    repeat: bool = False,
    input_context: tf.distribute.InputContext | None = None,
) -> tf.data.Dataset:
    """Batches of `{"images": float [B, S, S, C], "captions": string [B]}` from ROCOv2 records.

    `records` are `pipelines.rocov2.Record`s (anything with `image_path` and
    `caption`) or a `pipelines.tfrecords.ShardedSplit` (read from its shards,
    never cached: the shards already are the cache). Files are read once and
    cached (in memory, or at a path given as `cache`), decoded in parallel
    every epoch, shuffled and augmented only when `training`. `deterministic`
    fixes the element order for tests; `repeat` makes the stream endless.
    Under a `tf.distribute` strategy `input_context` gives this worker its
    share (whole shard files, or every n-th record) and `batch_size` is per replica.
    """
    if not len(records):
        raise ValueError("No records to build a dataset from.")
    if hasattr(records, "dataset"):  # a ShardedSplit
        ds = records.dataset(input_context, training=training, seed=seed)
    else:
        if input_context is not None and input_context.num_input_pipelines > 1:
            records = records[input_context.input_pipeline_id :: input_context.num_input_pipelines]
        paths = [str(r.image_path) for r in records]
        captions = [normalize_caption(r.caption) for r in records]
        ds = tf.data.Dataset.from_tensor_slices({"path": paths, "caption": captions})
        ds = ds.map(lambda r: {"bytes": tf.io.read_file(r["path"]), "caption": r["caption"]}, num_parallel_calls=AUTOTUNE)
        if cache:
            ds = ds.cache(cache if isinstance(cache, str) else "")
    if training:
        ds = ds.shuffle(min(len(records), 10_000), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.map(
        lambda r: {"images": load_image(r["bytes"], image_config), "captions": r["caption"]},
        num_parallel_calls=AUTOTUNE,
    )
    ds = ds.batch(batch_size, drop_remainder=False, num_parallel_calls=AUTOTUNE)
    augmenter = make_augmenter(seed) if training and augment else None

    def finish(batch: dict) -> dict:
        images = batch["images"]
        if augmenter is not None:
            images = tf.clip_by_value(augmenter(images, training=True), 0.0, 1.0)
        return {"images": normalize_image(images, image_config["mean"], image_config["std"]), "captions": batch["captions"]}

    ds = ds.map(finish, num_parallel_calls=AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = deterministic
    return ds.with_options(options).prefetch(AUTOTUNE)
