"""The run's `report.md`: what was trained on what, how long it took, and how well it did."""

from __future__ import annotations

from pathlib import Path

from pipelines.metrics import MIN_STUDY_IMAGES, weakest_first

FIELD_ORDER = ("modality", "region", "view", "finding", "laterality", "size", "all_fields")
METRIC_ORDER = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "ROUGE-1 F")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _pretraining(info: dict | None) -> str:
    """'3 epochs, 1.6 min' (the time is part of the train time), or 'none'."""
    if not info:
        return "none"
    return f"{info['epochs']} epochs, {info['seconds'] / 60:.1f} min" if info["seconds"] else f"{info['epochs']} epochs ({info['status']})"


def _preset(model: dict) -> str:
    """'small (128 px, augmented)': the preset and the input it trained on (older summaries: the preset alone)."""
    if "image_size" not in model:
        return model["preset"]
    return f"{model['preset']} ({model['image_size']} px{', augmented' if model.get('augment') else ''})"


def weakest_study(by_study: dict[str, dict], min_images: int = MIN_STUDY_IMAGES) -> str | None:
    """'ct abdomen: 53.9% (n=76)': the study of at least `min_images` captions with the lowest share of captions
    right in every field; None when there is no such study or only one study."""
    ranked = weakest_first(by_study, min_images)
    if len(ranked) < 2 or ranked[0][1]["all_fields"]["support"] < min_images:
        return None
    study, result = ranked[0]
    return f"{study}: {_pct(result['all_fields']['accuracy'])} (n={result['all_fields']['support']})"


def write_run_report(run_dir: Path, summary: dict) -> Path:
    """Write report.md for a finished run and return its path."""
    models = summary["models"]
    names = list(models)
    lines = [
        "# medcap training run",
        "",
        f"- Dataset: `{summary['dataset']}`",
        "- Splits (usable / listed): "
        + ", ".join(f"{s} {v['usable']}/{v['total']}" for s, v in summary["splits"].items()),
        f"- Evaluated on: **{summary['eval_split']}**; wall time of the whole run: "
        f"{summary['wall_seconds'] / 60:.1f} min" + (" (resumed run: this process only)" if summary["resumed"] else "")
        + ("; the models trained side by side, one process each, so each one's times (training, captions per second) "
           "were taken while the other ran" if summary.get("parallel") else ""),
        "",
        "## Models",
        "",
        "| model | preset | parameters | concept pretraining | epochs | train time | stopped by budget | val loss "
        "| val caption loss | val token acc |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in models.items():
        final = r["final"]
        lines.append(
            f"| {name} | {_preset(r)} | {r['parameters']:,} | {_pretraining(r.get('concept_pretraining'))} | {r['epochs_run']} | {r['train_seconds'] / 60:.1f} min "
            f"| {'yes' if r['stopped_by_time_budget'] else 'no'} | {_num(final.get('val_loss'))} "
            f"| {_num(final.get('val_caption_loss'))} | {_pct(final.get('val_token_accuracy'))} |"
        )
    lines += ["", "## Clinical field accuracy", "", "| field | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for field in FIELD_ORDER:
        cells = [models[n]["metrics"]["fields"].get(field, {}) for n in names]
        if all(c.get("accuracy") is None for c in cells):
            continue
        label = "all fields right (exact)" if field == "all_fields" else field
        lines.append(f"| {label} | " + " | ".join(f"{_pct(c.get('accuracy'))} (n={c.get('support', 0)})" for c in cells) + " |")
    weakest = [weakest_study(models[n]["metrics"].get("fields_by_study") or {}) for n in names]
    if any(weakest):
        label = f"weakest study of {MIN_STUDY_IMAGES}+ images, all fields (per study: each model's report)"
        lines.append(f"| {label} | " + " | ".join(w or "n/a" for w in weakest) + " |")
    lines += ["", "![field accuracy](field_accuracy.png)", "", "## Caption metrics (ImageCLEFmedical preprocessing)", ""]
    lines += ["| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for metric in METRIC_ORDER:
        lines.append(f"| {metric} | " + " | ".join(_num(models[n]["metrics"]["caption_metrics"].get(metric)) for n in names) + " |")
    lines.append("| captions / second | " + " | ".join(str(models[n]["metrics"]["images_per_second"]) for n in names) + " |")
    lines += ["", "## Examples (most wrong fields first)", "", "![examples](examples.png)"]
    for name in names:
        lines += ["", f"## {name}", "", f"Full evaluation with confusion matrices: [{name}/report.md]({name}/report.md)",
                  "", f"![{name} curves]({name}/curves.png)", "", "| reference | prediction |", "|---|---|"]
        for ex in models[name]["metrics"]["examples"]:
            lines.append(f"| {ex['reference']} | {ex['prediction']} |")
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
