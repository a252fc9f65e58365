"""Caption metrics: word overlap (pycocoevalcap, ImageCLEFmedical preprocessing) and clinical fields."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import string
from typing import Sequence

from pipelines.findings import FIELDS, parse_findings

log = logging.getLogger(__name__)
MIN_STUDY_IMAGES = 20  # a study with fewer captions is listed, but not ranked among the weakest
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def imageclef_preprocess(caption: str) -> str:
    """ImageCLEFmedical caption preprocessing: lowercase, digit runs -> 'number', no punctuation."""
    text = re.sub(r"\d+", "number", caption.lower())
    text = _PUNCTUATION.sub(" ", text)
    return " ".join(text.split())


def rouge1_f(reference: str, prediction: str) -> float:
    """ROUGE-1 F-measure of unigram overlap (clipped counts)."""
    ref, pred = reference.split(), prediction.split()
    if not ref or not pred:
        return float(ref == pred)
    overlap = sum(min(ref.count(w), pred.count(w)) for w in set(pred))
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def caption_metrics(references: Sequence[str], predictions: Sequence[str], preprocess: bool = True) -> dict:
    """BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) and ROUGE-1 F over paired captions.

    METEOR needs Java; without it METEOR is skipped (reported as None) and a warning says so.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(predictions) or not references:
        raise ValueError("Need the same, non-zero number of references and predictions.")
    clean = imageclef_preprocess if preprocess else (lambda c: " ".join(c.split()))
    # pycocoevalcap scorers reject empty strings; a lone placeholder scores zero as it should.
    gts = {i: [clean(r) or "empty"] for i, r in enumerate(references)}
    res = {i: [clean(p) or "empty"] for i, p in enumerate(predictions)}
    metrics: dict[str, float | None] = {}
    with contextlib.redirect_stdout(io.StringIO()):  # Bleu prints its internals
        bleu, _ = Bleu(4).compute_score(gts, res)
    metrics.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    metrics["METEOR"] = _meteor(gts, res)
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    metrics["ROUGE-1 F"] = sum(rouge1_f(gts[i][0], res[i][0]) for i in gts) / len(gts)
    return metrics


def _meteor(gts: dict, res: dict) -> float | None:
    """METEOR through pycocoevalcap's Java jar, or None when Java is missing."""
    if shutil.which("java") is None:
        log.warning("Java is not installed: METEOR is skipped (the other metrics are unaffected).")
        return None
    from pycocoevalcap.meteor.meteor import Meteor

    scorer = Meteor()
    try:
        return float(scorer.compute_score(gts, res)[0])
    finally:
        with contextlib.suppress(Exception):
            scorer.close()


def field_accuracy(references: Sequence[str], predictions: Sequence[str], fields: Sequence[str] = FIELDS) -> dict:
    """Per-field accuracy of the findings parsed from predictions against those of references.

    A field counts only where the reference states it (a synthetic caption
    states every field it has; a real one often only the modality). `all_fields`
    is the share of captions whose every field matches: clinically exact captions.
    """
    parsed = [(parse_findings(r), parse_findings(p)) for r, p in zip(references, predictions)]
    result: dict[str, dict] = {}
    for field in fields:
        pairs = [(ref[field], pred[field]) for ref, pred in parsed if ref[field] is not None]
        correct = sum(r == p for r, p in pairs)
        result[field] = {"accuracy": correct / len(pairs) if pairs else None, "support": len(pairs)}
    exact = [all(ref[f] == pred[f] for f in fields) for ref, pred in parsed]
    result["all_fields"] = {"accuracy": sum(exact) / len(exact) if exact else None, "support": len(exact)}
    return result


def field_accuracy_by_study(references: Sequence[str], predictions: Sequence[str],
                            fields: Sequence[str] = FIELDS) -> dict[str, dict]:
    """`field_accuracy` within each study the references name: {"ct abdomen": {...}, ...}, sorted by name.

    The study is the reference's modality and region ("ct" where it names no region, "not said" where it
    names neither). An overall figure hides where a model fails: in the default run of 2026-12-05 08:13
    (commit 3823f7d) GIT small had 93.4% of findings right overall and 59.2% in abdominal CT.
    """
    groups: dict[str, tuple[list, list]] = {}
    for reference, prediction in zip(references, predictions):
        ref = parse_findings(reference)
        study = " ".join(x for x in (ref["modality"], ref["region"]) if x) or "not said"
        refs, preds = groups.setdefault(study, ([], []))
        refs.append(reference)
        preds.append(prediction)
    return {study: field_accuracy(refs, preds, fields) for study, (refs, preds) in sorted(groups.items())}


def weakest_first(by_study: dict[str, dict], min_images: int = MIN_STUDY_IMAGES) -> list[tuple[str, dict]]:
    """`field_accuracy_by_study`'s studies, the lowest share of captions with every field right first (then by name);
    studies with fewer than `min_images` captions come after the others, in the same order: on real data many
    hold a caption or two, and their shares say little."""
    return sorted(by_study.items(), key=lambda item: (item[1]["all_fields"]["support"] < min_images,
                                                      item[1]["all_fields"]["accuracy"], item[0]))
