"""Sharded TFRecords of ROCOv2 splits: encoded image bytes, caption, ID and concepts, with a manifest.

Layout: `{root}/manifest.json` (per split: examples, skipped rows, and each shard's examples, bytes and
SHA-256) beside `{root}/{split}-{i:05d}-of-{n:05d}.tfrecord`. Images stay encoded (PNG/JPEG) and are
decoded by `pipelines.images`, the one decode path; captions are stored as the models learn them
(`normalize_caption`). Every path goes through `tf.io.gfile`, so `root` may be a local folder or a bucket
(`gs://...`, or `s3://...` where a TensorFlow S3 filesystem plugin is installed).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import tensorflow as tf
from tqdm.auto import tqdm

from pipelines.rocov2 import Record, ValidationReport
from pipelines.text import normalize_caption

MANIFEST = "manifest.json"
FORMAT = "medcap-tfrecords"
VERSION = 1
FEATURES = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "caption": tf.io.FixedLenFeature([], tf.string),
    "image": tf.io.FixedLenFeature([], tf.string),
    "concepts": tf.io.VarLenFeature(tf.string),
}
TEXT_FEATURES = {k: v for k, v in FEATURES.items() if k != "image"}
_MAGIC_SUFFIX = {b"\x89PNG": ".png", b"\xff\xd8\xff": ".jpg"}


def join(root: str, name: str) -> str:
    """`root/name` for local folders and bucket URLs alike."""
    return f"{str(root).rstrip('/')}/{name}"


def shard_name(split: str, index: int, count: int) -> str:
    """`{split}-00003-of-00016.tfrecord`."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def to_example(record: Record, image_bytes: bytes) -> tf.train.Example:
    """One record as a `tf.train.Example` with `id`, `caption`, `image` and `concepts`."""

    def strings(*values: str | bytes) -> tf.train.Feature:
        data = [v if isinstance(v, bytes) else v.encode("utf-8") for v in values]
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=data))

    return tf.train.Example(features=tf.train.Features(feature={
        "id": strings(record.id),
        "caption": strings(normalize_caption(record.caption)),
        "image": strings(image_bytes),
        "concepts": strings(*record.concepts),
    }))


def file_digest(path: str) -> tuple[str, int]:
    """(SHA-256 hex, size in bytes) of a file, read through `tf.io.gfile`."""
    digest, size = hashlib.sha256(), 0
    with tf.io.gfile.GFile(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def write_split(records: Sequence[Record], root: str, split: str, shards: int, progress: bool = True) -> list[dict]:
    """Write `records` in order into `shards` files of near-equal size; return their manifest rows."""
    count = max(1, min(shards, len(records)))
    bounds = [len(records) * i // count for i in range(count + 1)]
    rows = []
    bar = tqdm(total=len(records), desc=f"Writing {split}", unit="img", disable=not progress)
    for index in range(count):
        name = shard_name(split, index, count)
        with tf.io.TFRecordWriter(join(root, name)) as writer:
            for record in records[bounds[index] : bounds[index + 1]]:
                with tf.io.gfile.GFile(record.image_path, "rb") as f:
                    writer.write(to_example(record, f.read()).SerializeToString())
                bar.update()
        sha256, size = file_digest(join(root, name))
        rows.append({"file": name, "examples": bounds[index + 1] - bounds[index], "bytes": size, "sha256": sha256})
    bar.close()
    return rows


def write_manifest(root: str, splits: dict, source: str) -> str:
    """Write `manifest.json` last and atomically, so a half-written folder is never taken for a dataset."""
    manifest = {"format": FORMAT, "version": VERSION, "source": source,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "features": sorted(FEATURES), "splits": splits}
    path, tmp = join(root, MANIFEST), join(root, f".{MANIFEST}.tmp")
    with tf.io.gfile.GFile(tmp, "w") as f:
        f.write(json.dumps(manifest, indent=2))
    tf.io.gfile.rename(tmp, path, overwrite=True)
    return path


def is_tfrecord_dataset(root: str | Path) -> bool:
    """True when `root` holds a medcap TFRecord manifest."""
    return tf.io.gfile.exists(join(str(root), MANIFEST))


def read_manifest(root: str | Path) -> dict:
    """The manifest of a TFRecord dataset (FileNotFoundError without one, ValueError for another format)."""
    path = join(str(root), MANIFEST)
    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"No {MANIFEST} in {root}: build one with python -m pipelines.build_tfrecords.")
    with tf.io.gfile.GFile(path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise ValueError(f"{path} is not a {FORMAT} v{VERSION} manifest.")
    return manifest


def verify(root: str | Path) -> list[str]:
    """Problems found by re-hashing every shard against the manifest (an empty list when all match)."""
    problems = []
    for split, entry in read_manifest(root)["splits"].items():
        for shard in entry["shards"]:
            path = join(str(root), shard["file"])
            if not tf.io.gfile.exists(path):
                problems.append(f"{split}: {shard['file']} is missing")
            elif file_digest(path) != (shard["sha256"], shard["bytes"]):
                problems.append(f"{split}: {shard['file']} does not match its checksum")
    return problems


def _parse(serialized: tf.Tensor, features: dict = FEATURES) -> dict:
    """A serialized Example -> its features, concepts as a dense string vector."""
    parsed = tf.io.parse_single_example(serialized, features)
    parsed["concepts"] = tf.sparse.to_dense(parsed["concepts"], default_value="")
    return parsed


def _bytes_and_caption(serialized: tf.Tensor) -> dict:
    """A serialized Example -> what `make_dataset` decodes: `{"bytes", "caption"}`."""
    example = _parse(serialized)
    return {"bytes": example["image"], "caption": example["caption"]}


def _suffix(image: bytes) -> str:
    """'.png' or '.jpg' from the magic bytes ('' for anything else)."""
    return next((s for magic, s in _MAGIC_SUFFIX.items() if image.startswith(magic)), "")


def _record(example: dict, image_path: str = "") -> Record:
    """A parsed example (NumPy values) as a `Record`."""
    concepts = tuple(c.decode() for c in example["concepts"])
    return Record(example["id"].decode(), image_path, example["caption"].decode(), concepts)


@dataclass(frozen=True)
class ShardedSplit:
    """One split of a TFRecord dataset: what `pipelines.dataset.make_dataset` reads in place of records."""

    name: str
    files: tuple[str, ...]
    examples: int
    checksum: str = ""  # SHA-256 over the shards' checksums: names this exact content
    limit: int | None = None

    def __len__(self) -> int:
        return self.examples if self.limit is None else min(self.examples, self.limit)

    def head(self, n: int | None) -> ShardedSplit:
        """The first `n` examples (all when `n` is None)."""
        return self if n is None else replace(self, limit=min(n, len(self)))

    def _in_order(self, features: dict = FEATURES) -> tf.data.Dataset:
        """Parsed examples in the order they were written."""
        ds = tf.data.TFRecordDataset(list(self.files))
        return (ds if self.limit is None else ds.take(self.limit)).map(lambda s: _parse(s, features))

    def dataset(self, input_context: tf.distribute.InputContext | None = None, training: bool = False,
                order_seed: tf.Tensor | None = None) -> tf.data.Dataset:
        """`{"bytes", "caption"}` examples; whole shard files per worker when there are enough of them.

        In training the shard files are read in the order that the stateless `order_seed` ([2] int64) draws.
        """
        workers = input_context.num_input_pipelines if input_context else 1
        by_file = workers > 1 and len(self.files) >= workers and self.limit is None
        if by_file or (training and workers == 1 and self.limit is None):
            files = list(self.files)[input_context.input_pipeline_id :: workers] if by_file else list(self.files)
            names = tf.constant(files)
            if training and order_seed is not None:
                names = tf.gather(names, tf.random.experimental.stateless_shuffle(tf.range(len(files)), order_seed))
            ds = tf.data.Dataset.from_tensor_slices(names).interleave(
                tf.data.TFRecordDataset, cycle_length=min(len(files), 8) if training else 1,
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        else:  # in order: evaluation sees the examples as written, and sharding by example stays exact
            ds = tf.data.TFRecordDataset(list(self.files))
            ds = ds if self.limit is None else ds.take(self.limit)
            if workers > 1:  # too few files to give each worker its own
                ds = ds.shard(workers, input_context.input_pipeline_id)
        if workers == 1:  # Keras then knows the steps per epoch (and checks the manifest's count)
            ds = ds.apply(tf.data.experimental.assert_cardinality(len(self)))
        return ds.map(_bytes_and_caption, num_parallel_calls=tf.data.AUTOTUNE)

    def share(self, input_context: tf.distribute.InputContext | None = None) -> int | None:
        """How many examples this worker reads per epoch (None when only the shard files would tell)."""
        workers = input_context.num_input_pipelines if input_context else 1
        return len(self) if workers == 1 else None

    def __iter__(self) -> Iterator[Record]:
        """The records in order, without their images (`image_path` is empty)."""
        for example in self._in_order(TEXT_FEATURES).as_numpy_iterator():
            yield _record(example)

    def unpack(self, folder: str | Path) -> list[Record]:
        """Write the images to `folder` (once) and return records that point at them, for evaluation and plots."""
        folder, marker = Path(folder), Path(folder) / ".complete"
        folder.mkdir(parents=True, exist_ok=True)
        complete = marker.is_file() and marker.read_text() == str(len(self))
        records = []
        for example in self._in_order().as_numpy_iterator():
            record_id, image = example["id"].decode(), example["image"]
            path = folder / Path(record_id if Path(record_id).suffix else record_id + _suffix(image)).name
            if not complete:
                path.write_bytes(image)
            records.append(_record(example, str(path)))
        marker.write_text(str(len(records)))
        return records


def list_tfrecord_splits(root: str | Path) -> list[str]:
    """The splits a TFRecord dataset holds."""
    return list(read_manifest(root)["splits"])


def read_tfrecord_split(root: str | Path, split: str) -> tuple[ShardedSplit, ValidationReport]:
    """One split of a TFRecord dataset and the validation report its build recorded."""
    entry = read_manifest(root)["splits"].get(split)
    if entry is None:
        raise FileNotFoundError(f"No split '{split}' in the TFRecord dataset {root}.")
    files = tuple(join(str(root), s["file"]) for s in entry["shards"])
    checksum = hashlib.sha256("".join(s["sha256"] for s in entry["shards"]).encode()).hexdigest()
    report = ValidationReport(split=split, total=entry["examples"] + entry.get("skipped", 0), valid=entry["examples"],
                              problems=entry.get("problems", {}), source=str(root))
    return ShardedSplit(split, files, entry["examples"], checksum), report
