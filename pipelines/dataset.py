"""tf.data input pipelines: records -> batches of `{"images", "captions"}` for a captioner.

Images go through `pipelines.images` (the same functions the SavedModel runs);
captions stay strings here and are tokenized by the model's own preprocessor
(`CaptionPreprocessor`), which keras-hub's `fit()` maps over the dataset.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import keras
import tensorflow as tf

from pipelines.images import load_image, normalize_image
from pipelines.text import normalize_caption

AUTOTUNE = tf.data.AUTOTUNE
# Training images are decoded once and kept in memory when the split's decoded pixels (float32 at the model's
# size) fit in this many bytes: the 16,000 synthetic training images at 128 px take 0.98 GiB (shuffling an epoch
# briefly holds two more copies). Larger splits are decoded every epoch.
IMAGE_CACHE_BYTES = 2**30


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
    deterministic: bool = True,
    repeat: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    epoch: int | tf.Variable = 0,
    cache_images: bool | None = None,
) -> tf.data.Dataset:
    """Batches of `{"images": float [B, S, S, C], "captions": string [B]}` from ROCOv2 records.

    `records` are `pipelines.rocov2.Record`s (anything with `image_path` and
    `caption`) or a `pipelines.tfrecords.ShardedSplit` (read from its shards).
    Images are decoded in parallel; shuffling and augmentation
    happen only when `training`. `repeat` makes the stream endless. Under a
    `tf.distribute` strategy `input_context` gives this worker its share (whole
    shard files, or every n-th record) and `batch_size` is per replica.

    Training images (files, not shards) are decoded and resized once and kept
    in memory when `cache_images` (default: when they fit `IMAGE_CACHE_BYTES`);
    each epoch then shuffles the decoded images (augmentation still runs per
    batch). The first pass decodes every image before its first batch.

    Training order is a function of `(seed, epoch)` alone, never of how often
    this process has iterated, so a run resumed at epoch k reads epoch k's
    order. `epoch` is the first epoch, or a `tf.Variable` that a callback sets
    (`EpochOrder`); each new pass over the dataset starts at its value and
    advances it by one. Evaluation data is read once and cached (`cache`: in
    memory, or a path), in file order; `deterministic=False` lets parallel
    decoding reorder elements for a little speed.
    """
    if not len(records):
        raise ValueError("No records to build a dataset from.")
    sharded = hasattr(records, "dataset")  # a ShardedSplit
    if not sharded and input_context is not None and input_context.num_input_pipelines > 1:
        records = records[input_context.input_pipeline_id :: input_context.num_input_pipelines]
    if cache_images is None:
        cache_images = _decoded_bytes(len(records), image_config) <= IMAGE_CACHE_BYTES
    decode = functools.partial(_decode, image_config=image_config)
    if training and cache_images and not sharded:
        ds = _shuffled_epochs(records, input_context, seed, epoch, repeat,
                              decoded=_read_files(records, order=None).map(decode, num_parallel_calls=AUTOTUNE).cache())
    elif training:
        ds = _shuffled_epochs(records, input_context, seed, epoch, repeat).map(decode, num_parallel_calls=AUTOTUNE)
    else:
        ds = records.dataset(input_context) if sharded else _read_files(records, order=None)
        if cache and not sharded:  # shards already are a cache
            ds = ds.cache(cache if isinstance(cache, str) else "")
        if repeat:
            ds = ds.repeat()
        ds = ds.map(decode, num_parallel_calls=AUTOTUNE)
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


class EpochOrder(keras.callbacks.Callback):
    """Tell a training dataset which epoch `fit()` is starting, so its order is that epoch's.

    `offset` is added: a fit that follows other passes over the same data (concept pretraining) reads
    the orders after theirs.
    """

    def __init__(self, epoch: tf.Variable, offset: int = 0):
        super().__init__()
        self.epoch, self.offset = epoch, offset

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch.assign(epoch + self.offset)


def epoch_variable(first: int = 0) -> tf.Variable:
    """The counter that `make_dataset(..., epoch=...)` and `EpochOrder` share."""
    return tf.Variable(first, dtype=tf.int64, trainable=False, name="data_epoch")


def _decoded_bytes(count: int, image_config: dict) -> int:
    """Memory that `count` decoded float32 images at the model's size take."""
    return count * image_config["image_size"] ** 2 * image_config["channels"] * 4


def _decode(record: dict, image_config: dict) -> dict:
    """`{"bytes", "caption"}` -> `{"images": [S, S, C] in [0, 1], "captions"}` (pipelines.images.load_image)."""
    return {"images": load_image(record["bytes"], image_config), "captions": record["caption"]}


def _read_files(records: Sequence, order: tf.Tensor | None) -> tf.data.Dataset:
    """`{"bytes", "caption"}` for `records`, in file order or in the order of the indices `order`."""
    paths = tf.constant([str(r.image_path) for r in records])
    captions = tf.constant([normalize_caption(r.caption) for r in records])
    indices = tf.data.Dataset.range(len(records)) if order is None else tf.data.Dataset.from_tensor_slices(order)
    return indices.map(lambda i: {"bytes": tf.io.read_file(paths[i]), "caption": captions[i]},
                       num_parallel_calls=AUTOTUNE)


def _shuffled_epochs(records, input_context, seed: int, epoch: int | tf.Variable, repeat: bool,
                     decoded: tf.data.Dataset | None = None) -> tf.data.Dataset:
    """Examples, one full shuffled pass per epoch, each pass's order set by (seed, epoch).

    `{"bytes", "caption"}` read from the files or shards, or, given `decoded` (every record decoded, in file
    order, cached), its elements shuffled as one window (for a moment the split is in memory three times).
    """
    counter = epoch if isinstance(epoch, tf.Variable) else epoch_variable(int(epoch))
    start = tf.data.Dataset.range(1).map(lambda _: counter.assign_add(1) - 1)  # read when a pass begins
    epochs = start.flat_map(lambda first: tf.data.Dataset.range(first, first + (2**62 if repeat else 1)))

    def one_epoch(e: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([tf.constant(seed, tf.int64), e])
        if decoded is not None:  # one window: the whole split
            return _window_shuffle(decoded, len(records), key)
        if hasattr(records, "dataset"):  # shards: shuffled file order, then windows shuffled
            return _window_shuffle(records.dataset(input_context, training=True, order_seed=key), 1024, key)
        return _read_files(records, tf.random.experimental.stateless_shuffle(tf.range(len(records), dtype=tf.int64), key))

    ds = epochs.flat_map(one_epoch)
    if not repeat:  # Keras then knows the steps per epoch
        examples = len(records) if not hasattr(records, "dataset") else records.share(input_context)
        if examples is not None:
            ds = ds.apply(tf.data.experimental.assert_cardinality(examples))
    return ds


def _window_shuffle(ds: tf.data.Dataset, window: int, key: tf.Tensor) -> tf.data.Dataset:
    """Shuffle within consecutive windows of `window` elements, each with its own stateless seed."""
    def shuffle(index, batch):
        size = tf.shape(tf.nest.flatten(batch)[0], out_type=tf.int64)[0]
        order = tf.random.experimental.stateless_shuffle(tf.range(size), key * 1_000_003 + index)
        return tf.nest.map_structure(lambda t: tf.gather(t, order), batch)

    return ds.batch(window).enumerate().map(shuffle).unbatch()
