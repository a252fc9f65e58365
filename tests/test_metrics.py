"""Caption metrics on a fixture whose values are worked out by hand."""

import shutil

import pytest

from pipelines.evaluation_report import study_table, summary_text
from pipelines.metrics import (caption_metrics, field_accuracy, field_accuracy_by_study, imageclef_preprocess, rouge1_f,
                               weakest_first)
from pipelines.report import weakest_study


def test_imageclef_preprocessing():
    assert imageclef_preprocess("Chest X-ray, 2 views (PA/AP) on day 14.") == "chest x ray number views pa ap on day number"


def test_rouge1_by_hand():
    # 3 of 4 unigrams shared: P = R = 3/4, F = 3/4.
    assert rouge1_f("a b c d", "a b c e") == pytest.approx(0.75)
    # clipped counts: "a a" vs "a b": overlap 1, P = 1/2, R = 1/2.
    assert rouge1_f("a b", "a a") == pytest.approx(0.5)
    assert rouge1_f("x", "y") == 0.0


def test_metric_path_by_hand():
    refs = ["left lung nodule seen", "normal chest"]
    preds = ["left lung mass seen", "normal chest"]
    m = caption_metrics(refs, preds)
    # BLEU-1: 3 + 2 matched of 4 + 2 candidate words, lengths equal (no brevity penalty) -> 5/6.
    assert m["BLEU-1"] == pytest.approx(5 / 6, abs=1e-6)
    # BLEU-2: bigrams matched: "left lung" (1 of 3) + "normal chest" (1 of 1) -> 2/4; geometric mean sqrt(5/6 * 1/2).
    assert m["BLEU-2"] == pytest.approx((5 / 6 * 2 / 4) ** 0.5, abs=1e-6)
    # ROUGE-L (beta 1.2): LCS 3 of 4 -> F = 0.75 for the first pair, 1.0 for the second.
    assert m["ROUGE-L"] == pytest.approx((0.75 + 1.0) / 2, abs=1e-6)
    assert m["ROUGE-1 F"] == pytest.approx((0.75 + 1.0) / 2)
    if shutil.which("java"):
        assert 0 < m["METEOR"] < 1
    assert m["CIDEr"] > 0


def test_perfect_predictions_score_one():
    refs = ["axial ct of the head showing a small haemorrhage", "chest x ray pa view"]
    m = caption_metrics(refs, refs)
    assert m["BLEU-1"] == pytest.approx(1.0) and m["ROUGE-L"] == pytest.approx(1.0)


def test_field_accuracy_counts_only_stated_fields():
    refs = ["Axial CT of the abdomen showing a large cyst in the left kidney.", "MRI of the brain."]
    preds = ["Axial CT of the abdomen showing a large cyst in the right kidney.", "CT of the brain."]
    acc = field_accuracy(refs, preds)
    assert acc["modality"]["accuracy"] == pytest.approx(0.5) and acc["modality"]["support"] == 2
    assert acc["laterality"]["accuracy"] == 0.0 and acc["laterality"]["support"] == 1
    assert acc["all_fields"]["accuracy"] == 0.0


def test_field_accuracy_by_study_groups_by_the_references_modality_and_region():
    refs = ["Axial CT of the abdomen showing a large cyst in the left kidney.",
            "Coronal CT of the abdomen showing a small renal stone.",
            "Axial brain MRI: a small cyst in the right hemisphere.",
            "A radiograph."]  # no region: grouped under its modality
    preds = ["Axial CT of the abdomen showing a large mass in the left kidney.",
             "Coronal CT of the abdomen showing a small renal stone.",
             "Axial brain CT: a small cyst in the right hemisphere.",  # the modality wrong
             "A radiograph."]
    by_study = field_accuracy_by_study(refs, preds)
    assert list(by_study) == ["ct abdomen", "mri brain", "x-ray"]
    assert by_study["ct abdomen"]["finding"] == {"accuracy": 0.5, "support": 2}
    assert by_study["mri brain"]["modality"]["accuracy"] == 0.0 and by_study["x-ray"]["finding"]["support"] == 0
    assert [study for study, _ in weakest_first(by_study, min_images=1)] == ["mri brain", "ct abdomen", "x-ray"]
    assert [study for study, _ in weakest_first(by_study, min_images=2)] == ["ct abdomen", "mri brain", "x-ray"]
    assert study_table(by_study, min_images=1)[-3:] == [  # weakest first, modality and region kept
        "| mri brain | 1 | 0.0% | 100.0% | 100.0% | 100.0% | 100.0% | 100.0% | 0.0% |",
        "| ct abdomen | 2 | 100.0% | 100.0% | 100.0% | 50.0% | 100.0% | 100.0% | 50.0% |",
        "| x-ray | 1 | 100.0% | - | - | - | - | - | 100.0% |"]
    assert study_table({"ct abdomen": by_study["ct abdomen"]}) == []  # one study: the overall table says it all
    assert weakest_study(by_study, min_images=1) == "mri brain: 0.0% (n=1)"
    assert weakest_study(by_study, min_images=2) == "ct abdomen: 50.0% (n=2)"
    assert weakest_study(by_study, min_images=3) is None  # no study large enough to rank


def test_the_printed_summary_names_each_field_and_the_weakest_large_study():
    refs = ["Axial CT of the abdomen showing a large cyst in the left kidney."] * 20 + ["Axial brain MRI."] * 20
    preds = ["Axial CT of the abdomen showing a large mass in the left kidney."] * 20 + ["Axial brain MRI."] * 20
    metrics = {"caption_metrics": {"BLEU-1": 0.5, "METEOR": None},
               "fields": field_accuracy(refs, preds), "fields_by_study": field_accuracy_by_study(refs, preds)}
    assert summary_text(metrics).splitlines() == [
        "caption metrics: BLEU-1 0.5000",  # METEOR skipped (no Java): not printed
        "clinical fields right: modality 100.0% (n=40)  region 100.0% (n=40)  view 100.0% (n=40)  "
        "finding 0.0% (n=20)  laterality 100.0% (n=20)  size 100.0% (n=20)  all fields 50.0% (n=40)",
        "weakest study of 20+ images (all fields right): ct abdomen: 0.0% (n=20); every study: report.md"]
