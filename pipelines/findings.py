"""Structured findings read back from a caption: modality, region, view, finding, laterality, size.

`parse_findings` works on any caption, synthetic or real (ROCO), with word-boundary regexes, and on
generated ones, which the WordPiece tokenizer lowercases and spaces ("portable ap chest x - ray , ...").
A field the caption does not mention is None. When no finding is named, "normal", "unremarkable",
"no abnormality" or a negated finding ("no pneumothorax") give finding "none".
"""

from __future__ import annotations

import re

FIELDS = ("modality", "region", "view", "finding", "laterality", "size")


def _table(entries: tuple[tuple[str, str], ...]) -> tuple[tuple[str, re.Pattern], ...]:
    """Compile (value, alternation) pairs into case-insensitive word-bounded patterns."""
    return tuple((value, re.compile(rf"\b(?:{alternation})\b", re.IGNORECASE)) for value, alternation in entries)


# Earlier mention wins; at the same position the longer match wins ("thoracic spine" over "thoracic").
MODALITY_PATTERNS = _table((
    ("x-ray", r"x-?rays?|radiograph\w*|plain films?|chest films?|CXR|roentgenogra\w*|mammogra\w*"
              r"|orthopantomogra\w*|panoramic"),
    ("ct", r"CT|CTA|HRCT|MDCT|CBCT|TDM|computed tomograph\w*|CAT scans?|tomodensitom\w*"),
    ("mri", r"MRI|IRM|MR|MRA|MRCP|magnetic resonance|T[12]W?I?|T[12][- ]weighted|FLAIR|STIR|DWI"
            r"|diffusion[- ]weighted|susceptibility[- ]weighted"),
    ("ultrasound", r"ultrasound\w*|ultrasonogra\w*|sonogra\w*|echogra\w*|echocardiogra\w*|doppler|duplex"
                   r"|(?-i:US)|us(?= (?:image|scan|view|examination))"),
    ("angiography", r"angiogra\w*|arteriogra\w*|venogra\w*|aortogra\w*|DSA"),
    ("pet", r"PET|positron emission"),
    ("nuclear", r"scintigra\w*|SPECT|bone scans?"),
))
REGION_PATTERNS = _table((
    ("chest", r"chest|thorax|thoracic|hemithorax|lungs?|pulmonary|pleural?|mediastin\w*|CXR"),
    ("hand", r"hands?|fingers?|wrists?|metacarp\w*|phalan\w*|carpal|distal radius"),
    ("head", r"head|cranial|cranium|skull"),
    ("brain", r"brain|cerebr\w*|cerebell\w*"),
    ("abdomen", r"abdomen|abdominal|kidneys?|renal|liver|hepatic|gall ?bladder|spleen|splenic|pancrea\w*|bowel"),
    ("knee", r"knees?|\w*patell\w*|popliteal|menisc\w*|cruciate"),
    ("thyroid", r"thyroid"),
    ("spine", r"spine|spinal|vertebra\w*|lumbar|thoracic spine|cervical spine"),
    ("pelvis", r"pelvis|pelvic|hips?"),
))
_PROJECTED = r"(?:view|projection|radiograph|plain|film|x-?ray|cxr|chest|thoracic|hand|erect|supine|image)"
VIEW_PATTERNS = _table((
    # Upper case alone (PA is also the pulmonary artery); lower case (generated) only as a projection.
    ("pa", rf"(?-i:PA)|postero-?anterior|pa(?= {_PROJECTED})|(?<=portable )pa"),
    ("ap", rf"(?-i:AP)|antero-?posterior|ap(?= {_PROJECTED})|(?<=portable )ap"),
    ("lateral", r"lateral (?:view|projection|radiograph|x-?ray)"),
    ("oblique", r"oblique"),
    ("axial", r"axial|transaxial"),
    ("coronal", r"coronal"),
    ("sagittal", r"sagittal|parasagittal"),
    ("transverse", r"transverse"),
    ("longitudinal", r"longitudinal|long-axis"),
))
FINDING_PATTERNS = _table((
    ("nodule", r"nodules?|nodular"),
    ("mass", r"mass(?:es)?|tumou?rs?|neoplasms?|space-occupying lesions?"),
    ("cyst", r"cysts?|cystic"),
    ("effusion", r"effusions?|pleural fluid"),
    ("pneumothorax", r"pneumothora(?:x|ces)"),
    ("fracture", r"fractures?|fractured"),
    ("haemorrhage", r"ha?emorrhag\w*|ha?ematomas?|bleed(?:s|ing)?"),
    ("infarct", r"infarcts?|infarction\w*|isch(?:a)?emic strokes?|strokes?"),
    ("stone", r"stones?|calcul(?:us|i)|gallstones?|(?:nephro|uro|chole|sialo)lith\w*"),
))
LATERALITY_PATTERNS = _table((
    ("left", r"left"),
    ("right", r"right"),
    ("bilateral", r"bilateral(?:ly)?"),
))
SIZE_PATTERNS = _table((
    ("small", r"small|tiny|little|minute"),
    ("large", r"large|big|huge|massive|sizeable|sizable|giant|extensive"),
))
_NORMAL = re.compile(
    r"\b(?:normal|unremarkable|within normal limits"
    r"|no (?:\w+ )?(?:abnormalit(?:y|ies)|pathology|findings?))\b",
    re.IGNORECASE,
)
# A negation at most three words before the finding: "no evidence of pleural effusion".
_NEGATED = re.compile(r"\b(?:no|not|without|absence of|negative for|free of)\b(?:\W+\w+){0,3}\W*$", re.IGNORECASE)
# Where a finding's noun phrase starts (looking back) and its trailing clause ends (looking forward).
_PHRASE_START = re.compile(
    r"[.;:,()]|\b(?:showing|shows?|with|and|of|in|on|at|is|are|there|note|demonstrat\w*|reveal\w*)\b", re.IGNORECASE
)
_CLAUSE_END = re.compile(r"[.;:()]|\b(?:and|but|with|showing|while|whereas)\b", re.IGNORECASE)
_SPACED_HYPHEN = re.compile(r"(?<=\w) - (?=\w)")  # detokenized "x - ray"
# Plane words read differently by modality: "transverse CT" is axial, "sagittal ultrasound" is longitudinal.
_VIEW_BY_MODALITY = {("ct", "transverse"): "axial", ("mri", "transverse"): "axial", ("ultrasound", "sagittal"): "longitudinal"}


def parse_findings(caption: str) -> dict[str, str | None]:
    """The fields a caption mentions (see FIELDS); absent ones are None."""
    text = _SPACED_HYPHEN.sub("-", str(caption))
    modality = _earliest(text, MODALITY_PATTERNS)
    view = _earliest(text, VIEW_PATTERNS)
    finding_match = _finding(text)
    if finding_match is not None:
        finding, match = finding_match
        laterality = _attached(text, match, LATERALITY_PATTERNS)
        size = _attached(text, match, SIZE_PATTERNS)
    else:
        negated = _earliest(text, FINDING_PATTERNS) is not None
        finding = "none" if negated or _NORMAL.search(text) else None
        laterality, size = _earliest(text, LATERALITY_PATTERNS), _earliest(text, SIZE_PATTERNS)
    return {
        "modality": modality,
        "region": _earliest(text, REGION_PATTERNS),
        "view": _VIEW_BY_MODALITY.get((modality, view), view),
        "finding": finding,
        "laterality": laterality,
        "size": size,
    }


def _matches(text: str, table) -> list[tuple[int, int, str, re.Match]]:
    """Every match of every value, ordered by position (longer first at a tie)."""
    found = [(m.start(), -len(m.group()), value, m) for value, pattern in table for m in pattern.finditer(text)]
    return sorted(found, key=lambda item: item[:2])


def _earliest(text: str, table) -> str | None:
    """The value mentioned first in `text`."""
    found = _matches(text, table)
    return found[0][2] if found else None


def _finding(text: str) -> tuple[str, re.Match] | None:
    """The first finding mentioned without a negation in front of it."""
    for _, _, value, match in _matches(text, FINDING_PATTERNS):
        if not _NEGATED.search(text[max(0, match.start() - 60): match.start()]):
            return value, match
    return None


def _attached(text: str, match: re.Match, table) -> str | None:
    """A value said of the finding: in its noun phrase, else in its clause, else anywhere."""
    before = _PHRASE_START.split(text[: match.start()])[-1]
    after = _CLAUSE_END.split(text[match.end():], maxsplit=1)[0]
    in_phrase = _matches(before, table)
    if in_phrase:
        return in_phrase[-1][2]
    return _earliest(after, table) or _earliest(text, table)
