"""Caption a split with a trained captioner and score it (used by train.py and evaluate.py)."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Sequence

import numpy as np
from tqdm import tqdm

from pipelines.dataset import make_dataset
from pipelines.metrics import caption_metrics, field_accuracy, field_accuracy_by_study
from pipelines.text import normalize_caption


def predict_captions(
    model, records: Sequence, batch_size: int = 64, sampler: str = "greedy", num_beams: int = 3, max_length=None
) -> dict:
    """Captions and scores for every record, in order, with a progress bar and the time taken."""
    ds = make_dataset(records, model.image_config, batch_size=batch_size, training=False, cache=False, deterministic=True)
    captions: list[str] = []
    scores: list[float] = []
    start = time.perf_counter()
    for batch in tqdm(ds, total=int(np.ceil(len(records) / batch_size)), desc="captioning", unit="batch"):
        out = model.generate(
            batch["images"].numpy(), max_length=max_length, sampler=sampler, num_beams=num_beams,
            batch_size=batch_size, return_details=True,
        )
        captions += out["captions"]
        scores += [float(s) for s in out["scores"]]
    seconds = time.perf_counter() - start
    return {"captions": captions, "scores": scores, "seconds": seconds, "images_per_second": len(records) / seconds}


def score_predictions(records: Sequence, captions: Sequence[str], preprocess: bool = True) -> dict:
    """Word-overlap metrics and clinical field accuracy of captions against the records' references."""
    references = [normalize_caption(r.caption) for r in records]
    return {
        "caption_metrics": caption_metrics(references, captions, preprocess=preprocess),
        "fields": field_accuracy(references, captions),
        "fields_by_study": field_accuracy_by_study(references, captions),
    }


def write_predictions(path: str | Path, records: Sequence, captions: Sequence[str]) -> Path:
    """ImageCLEFmedical submission format: `ID,Caption`, every ID exactly once."""
    path = Path(path)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["ID", "Caption"])
        for record, caption in zip(records, captions):
            writer.writerow([record.id, caption])
    return path


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and the backend (TensorFlow or torch) for a reproducible run."""
    import keras

    keras.utils.set_random_seed(seed)
