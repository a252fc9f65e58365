"""Findings parser: real-style captions, synonyms, negation, laterality attached to the finding."""

from __future__ import annotations

import csv

import pytest

from pipelines.findings import (
    FIELDS,
    FINDING_PATTERNS,
    LATERALITY_PATTERNS,
    MODALITY_PATTERNS,
    REGION_PATTERNS,
    SIZE_PATTERNS,
    VIEW_PATTERNS,
    parse_findings,
)
from pipelines.synthetic import FINDINGS_BY_REGION, LATERALITIES, MODALITIES, SIZES, VIEWS_BY_STUDY

# (caption, the fields it states); fields left out must come back None. Several are real ROCO captions.
REAL_STYLE = [
    ("Axial contrast-enhanced CT scan of the chest showing a large right pleural effusion.",
     {"modality": "ct", "region": "chest", "view": "axial", "finding": "effusion", "laterality": "right",
      "size": "large"}),
    ("MRI T2-weighted image of the brain", {"modality": "mri", "region": "brain"}),
    ("Plain radiograph of the left hand", {"modality": "x-ray", "region": "hand", "laterality": "left"}),
    ("Ultrasonography revealed a small hypoechoic nodule in the right lobe of the thyroid.",
     {"modality": "ultrasound", "region": "thyroid", "finding": "nodule", "laterality": "right", "size": "small"}),
    ("Initial chest x-ray showing a left tension pneumothorax with shift of the mediastinum to the right, "
     "pleural effusion left, basal dorsolateral rib fractures.",
     {"modality": "x-ray", "region": "chest", "finding": "pneumothorax", "laterality": "left"}),
    ("Sagittal transperineal sonography showing the recurrent mass in the same patient occupying the "
     "rectovaginal septum.", {"modality": "ultrasound", "view": "longitudinal", "finding": "mass"}),
    ("Post-operative axial CT of head showing no intracranial pathology.",
     {"modality": "ct", "region": "head", "view": "axial", "finding": "none"}),
    ("Coronal view from a contrast-enhanced thoracic computed tomography scan demonstrates the extensive "
     "vegetations (white arrows) on the aortic valve prosthesis.",
     {"modality": "ct", "region": "chest", "view": "coronal", "size": "large"}),
    ("An axial T2 MRI showing the fatty atrophy and retraction of the right ilio-psoas tendon (arrow).",
     {"modality": "mri", "view": "axial", "laterality": "right"}),
    ("CXR, PA view: no acute abnormality.", {"modality": "x-ray", "region": "chest", "view": "pa", "finding": "none"}),
    ("Chest X-ray: no pneumothorax.", {"modality": "x-ray", "region": "chest", "finding": "none"}),
    ("Transverse CT image through the kidneys showing bilateral renal calculi.",
     {"modality": "ct", "region": "abdomen", "view": "axial", "finding": "stone", "laterality": "bilateral"}),
    ("Doppler ultrasound of the left kidney showing a 2 cm renal cyst.",
     {"modality": "ultrasound", "region": "abdomen", "finding": "cyst", "laterality": "left"}),
    ("Non-contrast CT of the head showing an acute subdural haematoma on the right.",
     {"modality": "ct", "region": "head", "finding": "haemorrhage", "laterality": "right"}),
    ("Plain radiograph of the right wrist demonstrating a fracture of the left distal radius.",
     {"modality": "x-ray", "region": "hand", "finding": "fracture", "laterality": "left"}),
    ("FLAIR image showing a large infarction in the left MCA territory.",
     {"modality": "mri", "finding": "infarct", "laterality": "left", "size": "large"}),
    ("Coronary angiography showing a tight stenosis.", {"modality": "angiography"}),
    ("PET/CT showing increased uptake.", {"modality": "pet"}),
    ("Unremarkable sagittal MR image of the knee.",
     {"modality": "mri", "region": "knee", "view": "sagittal", "finding": "none"}),
    ("CT scan showing abscess formation beginning around the piriform sinus.", {"modality": "ct"}),
    ("Dosimetric results obtained with RapidArc.", {}),
]


@pytest.mark.parametrize("caption, stated", REAL_STYLE, ids=[c[:40] for c, _ in REAL_STYLE])
def test_real_style_captions(caption, stated):
    assert parse_findings(caption) == {field: stated.get(field) for field in FIELDS}


@pytest.mark.parametrize("phrase, modality", [
    ("radiograph", "x-ray"), ("plain film", "x-ray"), ("CXR", "x-ray"), ("X-Ray", "x-ray"), ("xray", "x-ray"),
    ("computed tomography", "ct"), ("CT scan", "ct"), ("HRCT", "ct"), ("MR", "mri"), ("magnetic resonance", "mri"),
    ("T1-weighted", "mri"), ("T2 weighted", "mri"), ("FLAIR", "mri"), ("DWI", "mri"), ("sonography", "ultrasound"),
    ("ultrasonography", "ultrasound"), ("US", "ultrasound"), ("Doppler", "ultrasound"), ("sonogram", "ultrasound"),
    ("angiogram", "angiography"), ("PET", "pet"), ("bone scintigraphy", "nuclear"),
])
def test_modality_synonyms(phrase, modality):
    assert parse_findings(f"{phrase} image of the region")["modality"] == modality


def test_us_is_case_sensitive_and_words_are_bounded():
    assert parse_findings("The images show us the anatomy.")["modality"] is None
    assert parse_findings("Massive haemoptysis in a bright room.") == {**dict.fromkeys(FIELDS), "size": "large"}
    assert parse_findings("Abnormal enhancement on MRI.")["finding"] is None


def test_views_read_by_modality():
    assert parse_findings("Transverse MRI of the brain")["view"] == "axial"
    assert parse_findings("Transverse ultrasound of the thyroid")["view"] == "transverse"
    assert parse_findings("Sagittal ultrasound of the thyroid")["view"] == "longitudinal"
    assert parse_findings("Sagittal CT of the chest")["view"] == "sagittal"
    assert parse_findings("Posteroanterior chest radiograph")["view"] == "pa"
    assert parse_findings("Anteroposterior chest radiograph")["view"] == "ap"


def test_lower_case_projection_is_read_only_as_a_projection():
    """Generated captions are lower case: "pa view" is a view; "pa" alone (pulmonary artery) is not."""
    assert parse_findings("chest plain film , pa view : a large rounded right lung nodule .")["view"] == "pa"
    assert parse_findings("normal pa chest plain film .")["view"] == "pa"
    assert parse_findings("portable ap chest x - ray : no acute abnormality .")["view"] == "ap"
    assert parse_findings("portable ap chest x - ray : no acute abnormality .")["modality"] == "x-ray"
    assert parse_findings("the pa is dilated on this ct .")["view"] is None
    assert parse_findings("us image of the thyroid .")["modality"] == "ultrasound"


def test_laterality_attaches_to_the_finding():
    assert parse_findings("Axial CT of the abdomen showing a large cyst in the left kidney (arrow).")["laterality"] \
        == "left"
    assert parse_findings("Right hand radiograph with a fracture of the left thumb.")["laterality"] == "left"
    assert parse_findings("Left-sided chest pain; CT shows a nodule in the right lung.")["laterality"] == "right"
    assert parse_findings("Small left-sided pneumothorax.")["laterality"] == "left"
    assert parse_findings("A large right renal mass.")["laterality"] == "right"


def test_size_attaches_to_the_finding():
    parsed = parse_findings("Large field of view CT showing a tiny nodule in the left lung.")
    assert (parsed["size"], parsed["finding"]) == ("small", "nodule")


def test_negation():
    assert parse_findings("CT of the head with no evidence of haemorrhage.")["finding"] == "none"
    assert parse_findings("Chest X-ray without pneumothorax but with a small effusion.")["finding"] == "effusion"
    assert parse_findings("No pneumothorax. Large left pleural effusion.")["finding"] == "effusion"


def test_every_synthetic_value_is_a_parser_value():
    parser_values = {
        "modality": {v for v, _ in MODALITY_PATTERNS}, "region": {v for v, _ in REGION_PATTERNS},
        "view": {v for v, _ in VIEW_PATTERNS}, "finding": {v for v, _ in FINDING_PATTERNS} | {"none"},
        "laterality": {v for v, _ in LATERALITY_PATTERNS}, "size": {v for v, _ in SIZE_PATTERNS},
    }
    assert set(MODALITIES) <= parser_values["modality"]
    assert {r for _, r in VIEWS_BY_STUDY} <= parser_values["region"]
    assert {v for views in VIEWS_BY_STUDY.values() for v in views} <= parser_values["view"]
    assert {f for fs in FINDINGS_BY_REGION.values() for f in fs} <= parser_values["finding"]
    assert set(LATERALITIES) <= parser_values["laterality"] and set(SIZES) <= parser_values["size"]


def test_parses_the_real_sample(shared_roco):
    """On real ROCO captions most modalities are found and nothing breaks."""
    with open(shared_roco / "train_captions.csv", newline="", encoding="utf-8") as f:
        captions = [row["Caption"] for row in csv.DictReader(f)]
    parsed = [parse_findings(c) for c in captions]
    assert all(set(p) == set(FIELDS) for p in parsed)
    assert sum(p["modality"] is not None for p in parsed) > 0.6 * len(parsed)
