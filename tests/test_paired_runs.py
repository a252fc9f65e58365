"""benchmarks/paired_runs.py: two variants of a training run side by side, each with its own arguments."""

import json
import zipfile

from benchmarks.paired_runs import main

TINY_RUN = ["--dataset", "pipelines/examples", "--model", "cnn_gru", "--preset", "tiny", "--epochs", "1",
            "--vocab-size", "200"]


def backbone_config(model_file) -> dict:
    with zipfile.ZipFile(model_file) as archive:
        return json.loads(archive.read("config.json"))["config"]["backbone"]["config"]


def test_paired_runs_train_both_variants_with_their_own_arguments_and_report_them(tmp_path, capsys):
    out, report = tmp_path / "pairs", tmp_path / "paired.json"
    args = ["--b", "--learning-rate 0.01 --backbone dropout=0.3", "--out", str(out), "--json", str(report), "--", *TINY_RUN]
    assert main(args) == 0
    rates = {v: json.loads((out / "seed0" / v / "summary.json").read_text())["models"]["cnn_gru"]["learning_rate"]
             for v in ("a", "b")}
    assert rates["b"] == 0.01 and rates["a"] != 0.01  # each run got its variant's arguments, and only those
    dropout = {v: backbone_config(out / "seed0" / v / "cnn_gru" / "model.keras")["dropout"] for v in ("a", "b")}
    assert dropout == {"a": 0.0, "b": 0.3}  # --backbone (tiny: 0.0) reached the model that trained
    runs = json.loads(report.read_text())["runs"]
    assert [(r["seed"], r["variant"], r["model"], r["captioner_epochs"]) for r in runs] == [
        (0, "a", "cnn_gru", 1), (0, "b", "cnn_gru", 1)]
    assert "cnn_gru: b - a, all fields:" in capsys.readouterr().out  # the examples' captions name findings

    assert main(args) == 0  # finished runs are read again, not retrained
    assert capsys.readouterr().out.count("already finished") == 2


def test_the_parent_renders_the_synthetic_set_once_and_refuses_two_sizes(monkeypatch):
    import pytest

    import pipelines.synthetic
    from benchmarks.paired_runs import prepare_synthetic

    calls = []
    monkeypatch.setattr(pipelines.synthetic, "ensure_dataset", lambda out, **params: calls.append(params))
    prepare_synthetic(["--model", "git"], {"a": [], "b": ["--learning-rate", "1e-3"]})
    assert calls == [{"seed": 0, "n_train": 16000, "n_valid": 1000, "n_test": 1000}]
    prepare_synthetic(TINY_RUN, {"a": [], "b": []})  # a dataset of their own: nothing to render
    assert len(calls) == 1
    with pytest.raises(SystemExit, match="different synthetic sets"):
        prepare_synthetic([], {"a": [], "b": ["--synthetic-size", "8000", "1000", "1000"]})
    assert len(calls) == 1
