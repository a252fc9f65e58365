"""benchmarks.field_ceiling: one study's images, its labels, and a tiny run end to end."""

import json

import pytest

from benchmarks import field_ceiling


def test_render_study_draws_only_that_study_and_repeats_itself():
    pngs, fields = field_ceiling.render_study("mri/knee", "train", 5, size=64, workers=1)
    again, _ = field_ceiling.render_study("mri/knee", "train", 5, size=64, workers=1)
    held_out, _ = field_ceiling.render_study("mri/knee", "test", 5, size=64, workers=1)
    assert {(f["modality"], f["region"]) for f in fields} == {("mri", "knee")}
    assert all(png.startswith(b"\x89PNG") for png in pngs)
    assert pngs == again
    assert not set(pngs) & set(held_out)
    with pytest.raises(ValueError, match="split must be one of"):
        field_ceiling.render_study("mri/knee", "valid", 1, size=64, workers=1)


def test_labels_join_finding_and_size_and_keep_laterality_apart():
    fields = [{"finding": "cyst", "size": "small", "laterality": "left"},
              {"finding": "none", "size": None, "laterality": None},
              {"finding": "cyst", "size": "large", "laterality": "right"}]
    finding_classes, side_classes, y_finding, y_side = field_ceiling.labels(fields)
    assert finding_classes == ["cyst large", "cyst small", "none"]
    assert side_classes == ["-", "left", "right"]
    assert y_finding.tolist() == [1, 2, 0] and y_side.tolist() == [1, 0, 2]


def test_a_tiny_run_reports_each_epoch(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(field_ceiling, "limit_threads", lambda threads: None)  # keep this session's TF threads
    out = tmp_path / "ceiling.json"
    payload = field_ceiling.main(["--study", "x-ray/hand", "--train", "64", "--test", "32", "--epochs", "2",
                                  "--image-size", "64", "--threads", "1", "--json", str(out)])
    assert [row["epoch"] for row in payload["history"]] == [1, 2]
    assert all(0.0 <= row["exact"] <= min(row["finding_size"], row["laterality"]) for row in payload["history"])
    saved = json.loads(out.read_text())
    assert saved["args"]["study"] == "x-ray/hand" and saved["fit_seconds"] > 0
    assert "epoch 2/2: finding+size" in capsys.readouterr().out


def test_an_unknown_study_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        field_ceiling.main(["--study", "ct/knee"])
    assert "choose one of ct/abdomen" in capsys.readouterr().err
