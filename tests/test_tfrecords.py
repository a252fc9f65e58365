"""Sharded TFRecords: the build, its manifest and checksums, and training input identical to the folder's."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines import rocov2
from pipelines.build_tfrecords import build, main
from pipelines.dataset import make_dataset
from pipelines.rocov2 import read_split
from pipelines.tfrecords import MANIFEST, ShardedSplit, is_tfrecord_dataset, read_manifest, read_tfrecord_split, verify
from pipelines.training import prepare_data

pytestmark = pytest.mark.filterwarnings("ignore::pipelines.rocov2.DatasetWarning")  # the corrupt row, on purpose
CFG = {"image_size": 32, "channels": 1, "resize": "pad", "interpolation": "bilinear", "mean": [0.5], "std": [0.5]}


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Validation caches go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv(rocov2.CACHE_ENV, str(tmp_path / "cache_home"))


def _write_split(root: Path, split: str, n: int, broken: bool = False) -> None:
    """`n` PNG/JPEG images with captions and concepts (plus one corrupt row when `broken`)."""
    (root / split).mkdir(parents=True)
    rows, concepts = [], []
    for i in range(n):
        image = np.zeros((40, 56), np.uint8)
        image[:, : 4 * (i + 1)] = 255
        name = f"{split}_{i:03d}"
        fmt = "JPEG" if i % 3 == 0 else "PNG"
        Image.fromarray(image).save(root / split / f"{name}.{'jpg' if fmt == 'JPEG' else 'png'}", fmt)
        rows.append([name, f'  "Chest X-ray number {i}.\n"'])
        concepts.append([name, f"C00000{i % 3};C0001"])
    if broken:
        (root / split / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        rows.append(["bad", "A corrupt file."])
    for suffix, table, header in (("captions", rows, "Caption"), ("concepts", concepts, "CUIs")):
        with open(root / f"{split}_{suffix}.csv", "w", newline="") as f:
            csv.writer(f).writerows([["ID", header], *table])


@pytest.fixture
def rocov2_dir(tmp_path) -> Path:
    root = tmp_path / "roco"
    _write_split(root, "train", 10, broken=True)
    _write_split(root, "valid", 3)
    return root


@pytest.fixture
def built(rocov2_dir, tmp_path) -> Path:
    out = tmp_path / "shards"
    build(rocov2_dir, str(out), shards=4, progress=False)
    return out


def test_manifest_counts_shards_and_checksums(built):
    manifest = read_manifest(built)
    train, valid = manifest["splits"]["train"], manifest["splits"]["valid"]
    assert (train["examples"], train["skipped"], train["problems"]) == (10, 1, {"truncated_or_corrupt": ["bad"]})
    assert [s["examples"] for s in train["shards"]] == [2, 3, 2, 3]
    assert [s["file"] for s in valid["shards"]] == [f"valid-0000{i}-of-00003.tfrecord" for i in range(3)]  # <= N
    assert is_tfrecord_dataset(built) and verify(built) == []
    shard = built / train["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-1] + b"x")
    (built / valid["shards"][0]["file"]).unlink()
    assert verify(built) == [f"train: {shard.name} does not match its checksum",
                             "valid: valid-00000-of-00003.tfrecord is missing"]


def test_records_keep_id_caption_and_concepts_in_order(built, rocov2_dir):
    split, report = read_tfrecord_split(built, "train")
    originals, _ = read_split(rocov2_dir, "train", progress=False)
    assert len(split) == 10 and (report.total, report.valid) == (11, 10)
    records = list(split)
    assert [r.id for r in records] == [r.id for r in originals]
    assert records[1].caption == "Chest X-ray number 1."  # stored as the models learn it
    assert records[4].concepts == ("C000001", "C0001")
    assert [r.id for r in split.head(3)] == [r.id for r in originals[:3]]


def test_training_input_is_the_same_as_from_the_folder(built, rocov2_dir):
    split, _ = read_tfrecord_split(built, "train")
    originals, _ = read_split(rocov2_dir, "train", progress=False)
    from_shards = list(make_dataset(split, CFG, batch_size=4, deterministic=True))
    from_files = list(make_dataset(originals, CFG, batch_size=4, deterministic=True))
    for a, b in zip(from_shards, from_files, strict=True):
        np.testing.assert_array_equal(a["images"].numpy(), b["images"].numpy())  # the same decode function
        assert a["captions"].numpy().tolist() == b["captions"].numpy().tolist()


def _worker_captions(records, workers: int) -> list[set[bytes]]:
    """The captions each of `workers` input pipelines reads."""
    shares = []
    for index in range(workers):
        context = tf.distribute.InputContext(num_input_pipelines=workers, input_pipeline_id=index)
        ds = make_dataset(records, CFG, batch_size=2, training=True, input_context=context, augment=False)
        shares.append({c for batch in ds for c in batch["captions"].numpy()})
    return shares


@pytest.mark.parametrize("workers", [2, 5])  # 4 shards: whole files per worker, or every n-th example
def test_each_worker_reads_its_own_share(built, workers):
    split, _ = read_tfrecord_split(built, "train")
    shares = _worker_captions(split, workers)
    assert sum(len(s) for s in shares) == 10 and len(set().union(*shares)) == 10


def test_record_lists_are_shared_out_too(rocov2_dir):
    originals, _ = read_split(rocov2_dir, "valid", progress=False)
    assert [len(s) for s in _worker_captions(originals, 2)] == [2, 1]


def test_unpack_writes_the_original_bytes(built, rocov2_dir, tmp_path):
    split, _ = read_tfrecord_split(built, "valid")
    records = split.unpack(tmp_path / "unpacked")
    assert [Path(r.image_path).name for r in records] == ["valid_000.jpg", "valid_001.png", "valid_002.png"]
    for record in records:
        assert Path(record.image_path).read_bytes() == (rocov2_dir / "valid" / Path(record.image_path).name).read_bytes()
    assert split.unpack(tmp_path / "unpacked") == records  # the second call reuses the files


def test_training_reads_either_layout(built, tmp_path):
    cfg = SimpleNamespace(dataset=str(built), strict=False, max_train_examples=4, synthetic={})
    root, splits, reports = prepare_data(cfg, tmp_path)
    assert root == str(built) and isinstance(splits["train"], ShardedSplit)
    assert (len(splits["train"]), len(splits["valid"]), reports["train"].problems) == (4, 3, {"truncated_or_corrupt": ["bad"]})


def test_command_line(rocov2_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    with pytest.warns(rocov2.DatasetWarning):
        assert main(["--dataset", str(rocov2_dir), "--out", str(out), "--shards", "2", "--splits", "train"]) == 0
    assert "train: 10 examples (1 skipped) in 2 shards" in capsys.readouterr().out
    assert list(json.loads((out / MANIFEST).read_text())["splits"]) == ["train"]
    assert main(["--verify", str(out)]) == 0
    with pytest.raises(rocov2.DatasetError, match="truncated_or_corrupt"):
        build(rocov2_dir, str(tmp_path / "strict"), shards=2, strict=True, progress=False)
