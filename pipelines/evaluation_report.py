"""Plots and report.md of one evaluation: confusion matrices per field and an example grid, failures first."""

from __future__ import annotations

import textwrap
from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pipelines.findings import FIELDS, parse_findings  # noqa: E402
from pipelines.metrics import MIN_STUDY_IMAGES, weakest_first  # noqa: E402
from pipelines.report import METRIC_ORDER, weakest_study  # noqa: E402

MISSING = "(not said)"


def plot_confusion(field: str, references: Sequence[str], predictions: Sequence[str], out_png: Path) -> Path | None:
    """Confusion matrix of one field (rows: reference, columns: prediction); None when the field never occurs."""
    pairs = [(parse_findings(r)[field], parse_findings(p)[field]) for r, p in zip(references, predictions)]
    pairs = [(r, p or MISSING) for r, p in pairs if r is not None]
    if not pairs:
        return None
    labels = sorted({r for r, _ in pairs}) + sorted({p for _, p in pairs} - {r for r, _ in pairs})
    index = {label: i for i, label in enumerate(labels)}
    counts = np.zeros((len(labels), len(labels)), int)
    for r, p in pairs:
        counts[index[r], index[p]] += 1
    size = 1.2 + 0.45 * len(labels)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    ax.imshow(counts, cmap="Blues")
    for (i, j), n in np.ndenumerate(counts):
        if n:
            ax.text(j, i, n, ha="center", va="center", fontsize=7, color="white" if n > counts.max() / 2 else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("reference")
    ax.set_title(f"{field}: {np.trace(counts) / counts.sum():.1%} of {counts.sum()}")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def _wrong_fields(reference: str, prediction: str) -> int:
    ref, pred = parse_findings(reference), parse_findings(prediction)
    return sum(ref[f] is not None and ref[f] != pred[f] for f in FIELDS)


def plot_examples(records, columns: dict[str, Sequence[str]], out_png: Path, count: int = 12) -> Path:
    """A grid of image, reference and each model's caption; captions with the most wrong fields first."""
    first = next(iter(columns.values()))
    order = sorted(range(len(records)), key=lambda i: -_wrong_fields(records[i].caption, first[i]))[:count]
    rows = len(order)
    fig, axes = plt.subplots(rows, 2, figsize=(11, 2.3 * rows), gridspec_kw={"width_ratios": [1, 3.2]}, squeeze=False)
    for row, i in enumerate(order):
        image_ax, text_ax = axes[row]
        image_ax.imshow(Image.open(records[i].image_path).convert("L"), cmap="gray")
        image_ax.axis("off")
        lines = [f"reference: {records[i].caption}"] + [f"{name}: {captions[i]}" for name, captions in columns.items()]
        wrapped = "\n".join(textwrap.fill(line, 95) for line in lines)
        text_ax.text(0, 1, f"{records[i].id} ({_wrong_fields(records[i].caption, first[i])} fields wrong)\n{wrapped}",
                     va="top", fontsize=7.5, family="monospace", transform=text_ax.transAxes)
        text_ax.axis("off")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


def study_table(by_study: dict[str, dict], min_images: int = MIN_STUDY_IMAGES) -> list[str]:
    """Markdown lines: field accuracy per study (`pipelines.metrics.field_accuracy_by_study`), weakest first.

    Modality and region stay: the study is the reference's, and a prediction can name another one.
    A field no reference of a study states shows "-". Nothing for a single study (the overall table says it all).
    """
    if len(by_study) < 2:
        return []
    fields = [*FIELDS, "all_fields"]
    lines = ["", f"### By study (the reference's modality and region), weakest first; under {min_images} images last",
             "", "| study | images | " + " | ".join(f.replace("_", " ") for f in fields) + " |",
             "|---|---|" + "---|" * len(fields)]
    for study, result in weakest_first(by_study, min_images):
        cells = [f"{result[f]['accuracy']:.1%}" if result[f]["accuracy"] is not None else "-" for f in fields]
        lines.append(f"| {study} | {result['all_fields']['support']} | " + " | ".join(cells) + " |")
    return lines


def summary_text(metrics: dict) -> str:
    """What `pipelines/evaluate.py` prints: the caption metrics, each field's accuracy and the weakest study."""
    words = "  ".join(f"{m} {metrics['caption_metrics'][m]:.4f}" for m in METRIC_ORDER
                      if metrics["caption_metrics"].get(m) is not None)
    fields = "  ".join(f"{field.replace('_', ' ')} {value['accuracy']:.1%} (n={value['support']})"
                       for field, value in metrics["fields"].items() if value["accuracy"] is not None)
    lines = [f"caption metrics: {words or 'none'}", f"clinical fields right: {fields or 'none stated'}"]
    weakest = weakest_study(metrics.get("fields_by_study") or {})
    if weakest:
        lines.append(f"weakest study of {MIN_STUDY_IMAGES}+ images (all fields right): {weakest}; every study: report.md")
    return "\n".join(lines)


def write_evaluation_report(out: Path, records, captions: Sequence[str], metrics: dict) -> Path:
    """report.md with the metric tables, confusion matrices and the example grid."""
    references = [r.caption for r in records]
    lines = [f"# Evaluation of `{metrics['model']}`", "",
             f"- Dataset `{metrics['dataset']}`, split **{metrics['split']}**: {metrics['images']} images "
             f"({metrics['skipped_rows']} rows skipped by validation); sampler {metrics['sampler']}; "
             f"captioning took {metrics['caption_seconds']} s.",
             f"- Most common prediction: \"{Counter(captions).most_common(1)[0][0]}\" "
             f"({Counter(captions).most_common(1)[0][1]} of {len(captions)})", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {m} | {metrics['caption_metrics'][m]:.4f} |" if metrics["caption_metrics"].get(m) is not None
              else f"| {m} | n/a |" for m in METRIC_ORDER]
    lines += ["", "## Clinical fields", "", "| field | accuracy | support |", "|---|---|---|"]
    for field, value in metrics["fields"].items():
        if value["accuracy"] is not None:
            lines.append(f"| {field} | {value['accuracy']:.1%} | {value['support']} |")
    lines += study_table(metrics.get("fields_by_study") or {})
    for field in FIELDS:
        png = plot_confusion(field, references, captions, out / f"confusion_{field}.png")
        if png:
            lines += ["", f"![{field} confusion]({png.name})"]
    plot_examples(records, {"prediction": captions}, out / "examples.png")
    lines += ["", "## Examples (most wrong fields first)", "", "![examples](examples.png)"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
