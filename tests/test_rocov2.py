"""ROCOv2 reader: every kind of bad row is caught and reported, good rows survive, results are cached."""

from __future__ import annotations

import csv
import os
import stat
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import rocov2
from pipelines.rocov2 import (
    EXAMPLES_DIR,
    DatasetError,
    DatasetWarning,
    Record,
    ValidationReport,
    list_splits,
    read_split,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "roco-ccby"
TRICKY_CAPTION = 'Axial CT, "arrow": a 3,5 cm mass;\nsecond line'


@pytest.fixture(autouse=True)
def cache_home(tmp_path, monkeypatch):
    """Fallback caches go to a temporary folder, never the user's ~/.cache."""
    monkeypatch.setenv(rocov2.CACHE_ENV, str(tmp_path / "cache_home"))
    return tmp_path / "cache_home"


def _image(path: Path, size: tuple[int, int] = (16, 12), mode: str = "RGB", fmt: str | None = None) -> bytes:
    """Write a small noisy image and return its bytes."""
    rng = np.random.default_rng(len(path.name))
    dtype = np.uint16 if mode == "I;16" else np.uint8
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    pixels = rng.integers(0, 255 if dtype == np.uint8 else 65535, shape).astype(dtype)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def _png_header_only_bomb(path: Path, width: int, height: int) -> None:
    """A valid 1-bit PNG of width x height whose file is tiny (all-zero rows compress ~1000x)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = bytes(1 + (width + 7) // 8)  # filter byte + packed bits
    deflate = zlib.compressobj(9)
    idat = b"".join(deflate.compress(row) for _ in range(height)) + deflate.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _write_csv(path: Path, rows: list[list[str]], header: list[str] = ("ID", "Caption"), bom: bool = False) -> None:
    """A captions CSV, optionally with a BOM, blank lines between rows."""
    with open(path, "w", encoding="utf-8-sig" if bom else "utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in rows:
            writer.writerow(row)
            f.write("\r\n")  # a blank line


@pytest.fixture
def messy(tmp_path) -> Path:
    """A ROCOv2 'train' split with four good rows and one row for every problem kind."""
    root = tmp_path / "roco"
    images = root / "train"
    images.mkdir(parents=True)
    _image(images / "good_png.png")
    _image(images / "good_jpg.jpg", mode="L")
    _image(images / "good_ext.jpg")
    _image(images / "good_16bit.png", mode="I;16")
    (images / "empty.png").write_bytes(b"")
    jpeg = _image(images / "trunc_jpg.jpg", size=(24, 24))
    (images / "trunc_jpg.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = _image(images / "trunc_png.png", size=(24, 24))
    (images / "trunc_png.png").write_bytes(png[: len(png) * 2 // 3])
    (images / "text.png").write_text("this is not an image\n")
    _image(images / "gif.jpg", mode="L", fmt="GIF")
    _image(images / "big.png", size=(64, 64))
    _png_header_only_bomb(images / "bomb.png", 20_000, 20_000)
    _image(images / "no_caption.png")
    Image.new("CMYK", (16, 12), (0, 128, 255, 30)).save(images / "good_cmyk.jpg")  # a print figure: fine
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers rotate it 90 degrees; TF's decoder would not
    Image.new("L", (16, 12), 90).save(images / "rotated.jpg", exif=exif)
    rows = [
        ["good_png", TRICKY_CAPTION, "extra column"],
        ["good_jpg", "Chest X-ray."],
        ["good_ext.jpg", "An ID that carries its extension."],
        ["good_16bit", "A 16-bit PNG."],
        ["missing", "Listed but absent."],
        ["empty", "Empty file."],
        ["trunc_jpg", "Truncated JPEG."],
        ["trunc_png", "Truncated PNG."],
        ["text", "Text named .png."],
        ["gif", "A GIF named .jpg."],
        ["big", "Too large for a small max_pixels."],
        ["bomb", "20000 x 20000 PNG."],
        ["good_cmyk", "A CMYK JPEG."],
        ["rotated", "A phone photo of a film, stored sideways."],
        ["no_caption", "   "],
        ["good_png", "A duplicate row."],
    ]
    _write_csv(root / "train_captions.csv", rows, header=["ID", "Caption", "Notes"], bom=True)
    return root


EXPECTED = {
    "missing_image": ["missing"],
    "empty_file": ["empty"],
    "truncated_or_corrupt": ["trunc_jpg", "trunc_png"],
    "not_an_image": ["gif", "text"],
    "exif_rotated": ["rotated"],
    "too_large": ["big", "bomb"],
    "empty_caption": ["no_caption"],
    "duplicate_id": ["good_png"],
}


def _problems(report: ValidationReport) -> dict[str, list[str]]:
    return {kind: sorted(ids) for kind, ids in report.problems.items() if ids}


def test_bad_rows_are_skipped_with_a_warning(messy):
    with pytest.warns(DatasetWarning) as caught:
        records, report = read_split(messy, "train", max_pixels=32 * 32, workers=2, progress=False)
    assert [r.id for r in records] == ["good_png", "good_jpg", "good_ext.jpg", "good_16bit", "good_cmyk"]
    assert records[0] == Record("good_png", str(messy / "train" / "good_png.png"), TRICKY_CAPTION, ())
    assert records[2].image_path.endswith("good_ext.jpg")
    assert _problems(report) == EXPECTED
    assert (report.total, report.valid, report.ok) == (16, 5, False)
    message = str(caught[0].message)
    assert message == report.summary()
    assert "truncated_or_corrupt: 2" in message and "trunc_jpg" in message and "GIF file" in message


def test_strict_raises_the_summary(messy):
    with pytest.raises(DatasetError) as error:
        read_split(messy, "train", strict=True, max_pixels=32 * 32, progress=False)
    assert str(error.value).startswith("ROCOv2 split 'train'")
    for kind, ids in EXPECTED.items():
        assert f"{kind}: {len(ids)}" in str(error.value)


def test_default_max_pixels_rejects_the_bomb_by_its_header(messy):
    _png_header_only_bomb(messy / "train" / "mid_bomb.png", 8_000, 8_000)  # over 50 MP, under PIL's limit
    with open(messy / "train_captions.csv", "a", encoding="utf-8", newline="") as f:
        f.write("mid_bomb,An 8000 x 8000 PNG.\r\n")
    with pytest.warns(DatasetWarning):
        records, report = read_split(messy, "train", progress=False)
    assert sorted(report.problems["too_large"]) == ["bomb", "mid_bomb"]
    assert report.details["mid_bomb"] == "8000x8000"
    assert "big" in {r.id for r in records}


def test_summary_shows_at_most_five_examples():
    report = ValidationReport("train", 10, 3, {"missing_image": [f"id{i}" for i in range(7)]})
    text = report.summary()
    assert "missing_image: 7" in text and "id4" in text and "id5" not in text and "+2 more" in text


def test_clean_split_is_ok_and_silent(tmp_path):
    root = tmp_path / "clean"
    (root / "valid").mkdir(parents=True)
    _image(root / "valid" / "a.png")
    _image(root / "valid" / "b.jpg", fmt="JPEG")
    _write_csv(root / "valid_captions.csv", [["a", "One."], ["b", "Two."]])
    _write_csv(root / "valid_concepts.csv", [["a", "C0040405; C0817096"]], header=["ID", "CUIs"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records, report = read_split(root, "valid", progress=True)
    assert report.ok and report.valid == 2
    assert records[0].concepts == ("C0040405", "C0817096") and records[1].concepts == ()


def test_missing_csv_names_the_expected_file_and_what_exists(messy):
    with pytest.raises(FileNotFoundError) as error:
        read_split(messy, "test")
    message = str(error.value)
    assert str(messy / "test_captions.csv") in message and "train_captions.csv" in message
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_split(messy / "nowhere", "train")


def test_bad_header_is_a_dataset_error(tmp_path):
    _write_csv(tmp_path / "train_captions.csv", [["a", "b"]], header=["image", "text"])
    with pytest.raises(DatasetError, match="lacks the columns"):
        read_split(tmp_path, "train")


def test_validation_alias_and_list_splits(tmp_path):
    (tmp_path / "validation").mkdir()
    _image(tmp_path / "validation" / "a.png")
    _write_csv(tmp_path / "validation_captions.csv", [["a", "One."]])
    _write_csv(tmp_path / "train_captions.csv", [])
    assert list_splits(tmp_path) == ["train", "valid"]
    records, report = read_split(tmp_path, "valid", progress=False)
    assert report.ok and records[0].image_path.endswith(os.path.join("validation", "a.png"))


def test_check_images_false_skips_decoding(messy):
    with pytest.warns(DatasetWarning):
        records, report = read_split(messy, "train", check_images=False, progress=False)
    assert set(report.problems) == {"missing_image", "empty_caption", "duplicate_id"}
    assert len(records) == 13


def test_cache_makes_revalidation_instant_and_notices_changes(messy, monkeypatch):
    with pytest.warns(DatasetWarning):
        _, first = read_split(messy, "train", max_pixels=32 * 32, progress=False)
    assert (messy / ".medcap_validation_train.json").is_file()

    def must_not_run(*args, **kwargs):
        raise AssertionError("an unchanged image was checked again")

    monkeypatch.setattr(rocov2, "inspect_image", must_not_run)
    with pytest.warns(DatasetWarning):
        _, cached = read_split(messy, "train", max_pixels=32 * 32, progress=False)
    assert _problems(cached) == _problems(first)

    checked = []
    monkeypatch.setattr(rocov2, "inspect_image", lambda p, m: checked.append(Path(p).name) or (None, ""))
    _image(messy / "train" / "trunc_png.png", size=(8, 8))  # repaired: new size and mtime
    with pytest.warns(DatasetWarning):
        _, after = read_split(messy, "train", max_pixels=32 * 32, progress=False)
    assert checked == ["trunc_png.png"] and after.problems["truncated_or_corrupt"] == ["trunc_jpg"]


def test_read_only_root_caches_under_the_user_cache(messy, cache_home):
    os.chmod(messy, stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.warns(DatasetWarning):
            read_split(messy, "train", progress=False)
    finally:
        os.chmod(messy, stat.S_IRWXU)
    assert not list(messy.glob(".medcap_validation_*"))
    assert len(list(cache_home.glob("validation_*_train.json"))) == 1
    assert rocov2.cache_path(messy, "train").parent == messy


def test_bundled_examples_are_clean(monkeypatch):
    monkeypatch.setattr(rocov2, "_writable", lambda folder: False)  # keep the repository clean
    assert list_splits(EXAMPLES_DIR) == ["train", "valid"]
    train, train_report = read_split(EXAMPLES_DIR, "train", strict=True, progress=False)
    valid, valid_report = read_split(EXAMPLES_DIR, "valid", strict=True, progress=False)
    assert (len(train), len(valid)) == (20, 4) and train_report.ok and valid_report.ok
    with open(EXAMPLES_DIR / "license_information.csv", encoding="utf-8", newline="") as f:
        licensed = {row["ID"] for row in csv.DictReader(f)}
    assert licensed == {r.id for r in train + valid}


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared ROCO sample is not on this machine")
def test_shared_roco_sample_loads_unchanged():
    train, train_report = read_split(SHARED, "train", strict=True, progress=False)
    valid, valid_report = read_split(SHARED, "valid", strict=True, progress=False)
    assert (len(train), len(valid)) == (1868, 220)
    assert train_report.ok and valid_report.ok
    assert all(Path(r.image_path).is_file() and r.caption for r in train[:50])
