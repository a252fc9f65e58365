"""`python pipelines/evaluate.py`: which split it reads, and clear errors instead of tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import pytest

from keras_models.registry import build_captioner
from pipelines import evaluate
from pipelines.text import build_vocabulary, make_tokenizer

EXAMPLES = Path(__file__).resolve().parent.parent / "pipelines" / "examples"  # train and valid, no test split


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    keras.utils.set_random_seed(0)
    model = build_captioner("cnn_gru", "tiny", make_tokenizer(build_vocabulary(["a chest x-ray"] * 4, 50)),
                            sequence_length=8)
    path = tmp_path_factory.mktemp("evaluate") / "model.keras"
    model.save(path)
    return path


def test_without_a_test_split_it_evaluates_valid_and_says_so(model_path, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--model", str(model_path), "--dataset", str(EXAMPLES), "--limit", "3",
                          "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "has no test split: evaluating on valid" in printed
    assert "caption metrics: BLEU-1 " in printed and "clinical fields right: modality " in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["split"] == "valid" and metrics["images"] == 3
    studies = metrics["fields_by_study"]  # the references' studies, each with its own field accuracy
    assert list(studies) == ["ct abdomen", "mri brain", "x-ray pelvis"]
    assert all(s["all_fields"]["support"] == 1 for s in studies.values())
    assert "| x-ray pelvis | 1 |" in (out / "report.md").read_text()


def test_a_missing_split_asked_for_is_a_clear_error(model_path, tmp_path):
    with pytest.raises(SystemExit, match="No captions CSV for split 'test'.*valid_captions.csv"):
        evaluate.main(["--model", str(model_path), "--dataset", str(EXAMPLES), "--split", "test",
                       "--out", str(tmp_path / "eval")])
