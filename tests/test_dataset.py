"""The tf.data pipeline: shapes, dtypes, determinism, and augmentation that keeps left and right."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.dataset import epoch_variable, make_augmenter, make_dataset
from pipelines.rocov2 import Record

CFG = {"image_size": 32, "channels": 1, "resize": "pad", "interpolation": "bilinear", "mean": [0.5], "std": [0.5]}


@pytest.fixture
def records(tmp_path):
    out = []
    for i in range(10):
        image = np.zeros((48, 64), np.uint8)
        image[:, : 6 * (i + 1)] = 255
        path = tmp_path / f"img{i}.png"
        Image.fromarray(image).save(path)
        out.append(Record(id=f"img{i}", image_path=str(path), caption=f"Caption number {i}."))
    return out


def test_batches_have_model_shapes_and_dtypes(records):
    ds = make_dataset(records, CFG, batch_size=4, training=False, deterministic=True)
    batches = list(ds)
    assert [b["images"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0]["images"].shape[1:] == (32, 32, 1) and batches[0]["images"].dtype == tf.float32
    assert batches[0]["captions"].dtype == tf.string
    assert batches[0]["captions"][1].numpy() == b"Caption number 1."
    assert float(tf.reduce_min(batches[0]["images"])) >= -1.0 and float(tf.reduce_max(batches[0]["images"])) <= 1.0


def test_evaluation_order_is_the_record_order(records):
    ds = make_dataset(records, CFG, batch_size=3, deterministic=True)
    captions = [c.decode() for b in ds for c in b["captions"].numpy()]
    assert captions == [r.caption for r in records]


def test_training_shuffle_is_seeded(records):
    def order(seed):
        ds = make_dataset(records, CFG, batch_size=10, training=True, seed=seed, deterministic=True, augment=False)
        return [c.decode() for c in next(iter(ds))["captions"].numpy()]

    assert order(1) == order(1)
    assert sorted(order(1)) == sorted(r.caption for r in records)


def test_cached_training_images_are_decoded_once_and_reshuffled_each_epoch(records):
    def passes(cache_images, n=2):
        epoch = epoch_variable()
        ds = make_dataset(records, CFG, batch_size=10, training=True, seed=3, augment=False, epoch=epoch,
                          cache_images=cache_images)
        return ds, [next(iter(ds)) for _ in range(n)]

    _, uncached = passes(False)
    ds, cached = passes(True)
    for batches in (uncached, cached):  # every pass holds every image once, paired with its own caption
        for batch in batches:
            widths = (batch["images"].numpy()[:, 16, :, 0] > 0).sum(axis=1)
            numbers = [int(c.split()[-1][:-1]) for c in batch["captions"].numpy().astype(str)]
            assert sorted(numbers) == list(range(10))
            assert np.all(np.diff(widths[np.argsort(numbers)]) > 0)
    orders = [[c for c in b["captions"].numpy()] for b in cached]
    assert orders[0] != orders[1]  # a new order each epoch ...
    assert orders == [[c for c in b["captions"].numpy()] for b in passes(True)[1]]  # ... set by (seed, epoch)
    for r in records:  # a third pass needs no file
        Path(r.image_path).unlink()
    assert sorted(next(iter(ds))["captions"].numpy().tolist()) == sorted(orders[0])


def test_augmentation_never_flips_left_and_right():
    augmenter = make_augmenter(seed=3)
    assert not any("Flip" in type(layer).__name__ for layer in augmenter.layers)
    image = np.zeros((16, 48, 48, 1), np.float32)
    image[:, :, :16] = 1.0  # bright on the image's left
    out = augmenter(image, training=True).numpy()
    assert (out[:, :, :16].mean(axis=(1, 2, 3)) > out[:, :, 32:].mean(axis=(1, 2, 3)) + 0.5).all()


def test_empty_records_are_refused():
    with pytest.raises(ValueError, match="No records"):
        make_dataset([], CFG)
