"""Synthetic dataset: ROCOv2 layout, determinism, captions that name exactly what is drawn."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import synthetic
from pipelines.findings import FIELDS, parse_findings
from pipelines.synthetic import (
    FINDINGS_BY_REGION,
    LATERALISED_VIEWS,
    MODALITIES,
    REGIONS_BY_MODALITY,
    SPLITS,
    VIEWS_BY_STUDY,
    caption_templates,
    compose_caption,
    ensure_dataset,
    generate_dataset,
    iter_field_combinations,
    render_example,
)

TINY = {"n_train": 12, "n_valid": 12, "n_test": 12, "image_size": 64}


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _pixels(folder: Path) -> dict[str, np.ndarray]:
    return {p.relative_to(folder).as_posix(): np.asarray(Image.open(p)) for p in sorted(folder.glob("*/*.png"))}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("synth") / "data", seed=3, workers=1, **TINY)


def test_layout_is_rocov2(tiny):
    expected = {f"{s}{suffix}" for s in SPLITS for suffix in ("", "_captions.csv", "_findings.csv")}
    assert {p.name for p in tiny.iterdir()} == expected | {"README.md", "dataset.json", "examples.png"}
    assert not list(tiny.parent.glob(".data.*")), "temporary folders left behind"
    for split in SPLITS:
        with open(tiny / f"{split}_captions.csv", newline="", encoding="utf-8") as f:
            assert next(csv.reader(f)) == ["ID", "Caption"]
        rows = _read(tiny / f"{split}_captions.csv")
        assert [r["ID"] for r in rows] == [f"SYNTH_{split}_{i:06d}" for i in range(1, 13)]
        assert {p.stem for p in (tiny / split).iterdir()} == {r["ID"] for r in rows}
        for row in rows:
            with Image.open(tiny / split / f"{row['ID']}.png") as image:
                assert (image.format, image.mode, image.size) == ("PNG", "L", (64, 64))
        truth = _read(tiny / f"{split}_findings.csv")
        assert list(truth[0]) == ["ID", *FIELDS]
        assert [t["ID"] for t in truth] == [r["ID"] for r in rows]


def test_findings_csv_matches_captions(tiny):
    for split in SPLITS:
        for row, truth in zip(_read(tiny / f"{split}_captions.csv"), _read(tiny / f"{split}_findings.csv")):
            expected = {k: truth[k] or None for k in FIELDS}
            assert parse_findings(row["Caption"]) == expected, row["Caption"]


def test_metadata(tiny):
    meta = json.loads((tiny / "dataset.json").read_text())
    assert meta["params"] == {**TINY, "seed": 3, "version": synthetic.GENERATOR_VERSION}
    assert meta["counts"] == {"train": 12, "valid": 12, "test": 12}
    assert "seed 3" in (tiny / "README.md").read_text()


def test_same_seed_is_identical_whatever_the_worker_count(tiny, tmp_path):
    again = generate_dataset(tmp_path / "again", seed=3, workers=2, **TINY)
    for split in SPLITS:
        for suffix in ("_captions.csv", "_findings.csv"):
            assert (again / f"{split}{suffix}").read_bytes() == (tiny / f"{split}{suffix}").read_bytes()
    first, second = _pixels(tiny), _pixels(again)
    assert first.keys() == second.keys()
    assert all(np.array_equal(first[k], second[k]) for k in first)


def test_other_seed_differs(tiny, tmp_path):
    other = generate_dataset(tmp_path / "other", seed=4, workers=1, **TINY)
    assert (other / "train_captions.csv").read_bytes() != (tiny / "train_captions.csv").read_bytes()
    first, second = _pixels(tiny), _pixels(other)
    assert sum(np.array_equal(first[k], second[k]) for k in first) == 0


def test_ensure_dataset_reuses_and_regenerates(tmp_path, monkeypatch):
    out = ensure_dataset(tmp_path / "d", workers=1, seed=1, **TINY)
    stamp = (out / "dataset.json").stat().st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("regenerated an up-to-date dataset")

    monkeypatch.setattr(synthetic, "generate_dataset", fail)
    assert ensure_dataset(out, workers=1, seed=1, **TINY) == out
    monkeypatch.undo()
    ensure_dataset(out, workers=1, seed=1, **{**TINY, "n_test": 5})
    assert (out / "dataset.json").stat().st_mtime_ns != stamp
    assert len(_read(out / "test_captions.csv")) == 5
    assert len(list((out / "test").iterdir())) == 5


def test_refuses_to_overwrite_other_data(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        generate_dataset(tmp_path / "mine", workers=1, **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def crash(job):
        raise RuntimeError("killed")

    monkeypatch.setattr(synthetic, "_render_chunk", crash)
    with pytest.raises(RuntimeError):
        generate_dataset(tmp_path / "d", workers=1, **TINY)
    assert list(tmp_path.iterdir()) == []


def test_leftovers_of_killed_runs_are_removed(tmp_path):
    dead = 2 ** 22 + 12345  # above Linux's default pid_max, so no such process
    (tmp_path / f".d.tmp-{dead}" / "train").mkdir(parents=True)
    generate_dataset(tmp_path / "d", workers=1, **{**TINY, "n_train": 1, "n_valid": 1, "n_test": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["d"]


def test_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        synthetic.main(["--help"])
    assert exit_.value.code == 0 and "--out" in capsys.readouterr().out
    out = synthetic.main(["--out", str(tmp_path / "cli"), "--train", "3", "--valid", "2", "--test", "1",
                          "--size", "48", "--workers", "1"])
    assert [len(_read(out / f"{s}_captions.csv")) for s in SPLITS] == [3, 2, 1]


# ----------------------------------------------------------------------------- captions


def test_vocabularies_are_consistent():
    assert set(REGIONS_BY_MODALITY) == set(MODALITIES)
    studies = {(m, r) for m, regions in REGIONS_BY_MODALITY.items() for r in regions}
    assert set(VIEWS_BY_STUDY) == studies and set(LATERALISED_VIEWS) <= studies
    assert {r for _, r in studies} == set(FINDINGS_BY_REGION)
    assert all(f[0] == "none" for f in FINDINGS_BY_REGION.values())


def as_generated(caption: str) -> str:
    """A caption as the captioners write it: WordPiece lowercases and splits off punctuation."""
    return " ".join(re.findall(r"\w+|[^\w\s]", caption.lower()))


def test_fields_recoverable_from_every_phrasing():
    """Every field combination x every template x several synonym draws parses back exactly,
    as written and as a captioner would write it ("portable ap chest x - ray , ...")."""
    checked = 0
    for fields in iter_field_combinations():
        for template in range(len(caption_templates(fields["finding"]))):
            for seed in range(6):
                rng = np.random.default_rng([seed, template])
                caption = compose_caption(fields, rng, template=template, arrow=seed % 2 == 0)
                assert parse_findings(caption) == fields, caption
                assert parse_findings(as_generated(caption)) == fields, as_generated(caption)
                checked += 1
    assert checked > 2000


def test_at_least_five_phrasings_per_finding():
    for fields in iter_field_combinations():
        captions = {compose_caption(fields, np.random.default_rng(0), template=t)
                    for t in range(len(caption_templates(fields["finding"])))}
        assert len(captions) >= 5, fields


def test_no_finding_means_no_side_or_size():
    for fields in iter_field_combinations():
        assert (fields["finding"] == "none") <= (fields["laterality"] is None and fields["size"] is None)


# ----------------------------------------------------------------------------- images

LATERALISED = [f for f in iter_field_combinations() if f["laterality"] is not None]


def _lesion_only(fields: dict, seed: int, size: int = 128) -> np.ndarray:
    """|image with the lesion - same image without it|."""
    with_lesion = render_example(fields, seed, size, arrow=False)[0].astype(np.int16)
    without = render_example({**fields, "finding": "none", "laterality": None, "size": None}, seed, size)[0]
    return np.abs(with_lesion - without)


@pytest.mark.parametrize("fields", LATERALISED, ids=lambda f: "-".join(str(v) for v in f.values()))
def test_laterality_follows_radiological_convention(fields):
    """The patient's left is on the image's right, well off the midline."""
    diff = _lesion_only(fields, seed=7)
    assert diff.sum() > 0
    centre_x = (diff.sum(0) * np.arange(diff.shape[1])).sum() / diff.sum() / diff.shape[1]
    if fields["laterality"] == "left":
        assert centre_x > 0.58
    else:
        assert centre_x < 0.42


@pytest.mark.parametrize("study", sorted({(f["modality"], f["region"], f["finding"]) for f in iter_field_combinations()
                                          if f["size"] == "large"}))
def test_large_lesions_are_clearly_larger(study):
    """The changed area at least doubles (focal lesions' diameters differ ~2.5x; effusions, collapse differ too)."""
    modality, region, finding = study
    view = VIEWS_BY_STUDY[(modality, region)][0]
    side = "left" if view in LATERALISED_VIEWS.get((modality, region), ()) else None
    area = {}
    for size in ("small", "large"):
        fields = dict(zip(FIELDS, (modality, region, view, finding, side, size)))
        area[size] = np.mean([(_lesion_only(fields, seed) > 12).sum() for seed in range(3)])
    assert area["small"] > 0 and area["large"] > 2 * area["small"], area


def test_arrow_points_at_every_kind_of_finding():
    for fields in iter_field_combinations():
        if fields["finding"] == "none":
            continue
        with_arrow, caption = render_example(fields, 2, 64, arrow=True)
        assert "arrow" in caption and "arrow" not in render_example(fields, 2, 64, arrow=False)[1]
        assert not np.array_equal(with_arrow, render_example(fields, 2, 64, arrow=False)[0]), fields


def test_render_example_is_deterministic():
    fields = next(iter_field_combinations())
    image, caption = render_example(fields, 5, 96)
    assert image.dtype == np.uint8 and image.shape == (96, 96)
    again, caption_again = render_example(fields, 5, 96)
    assert np.array_equal(image, again) and caption == caption_again
    assert not np.array_equal(image, render_example(fields, 6, 96)[0])


def test_modalities_look_like_themselves():
    """Crude signatures: dark surroundings for CT/MRI/US, a black fan outside the ultrasound sector."""
    for fields in iter_field_combinations():
        if fields["finding"] != "none":
            continue
        image = render_example(fields, 1, 128)[0].astype(float)
        if fields["modality"] == "ultrasound":
            assert image[:10, :10].mean() < 25 and image[40:90, 40:90].std() > 12, fields
        elif fields["modality"] in ("ct", "mri"):
            assert image[:6, :6].mean() < 40 and image[40:90, 40:90].mean() > 40, fields


def test_contact_sheet(tmp_path):
    sheet = synthetic.contact_sheet(synthetic.example_fields(8, 0), size=64, columns=4)
    assert sheet.shape == (2 * 68, 4 * 68) and sheet.dtype == np.uint8
    Image.fromarray(sheet).save(tmp_path / "sheet.png")
