"""Evaluate a captioner on a ROCOv2-layout split: predictions.csv, metrics.json and report.md with plots.

    python pipelines/evaluate.py --model runs/RUN/git/model.keras --dataset DIR --split test
    python pipelines/evaluate.py --model artifacts/serving/git/1 --dataset DIR        # an exported SavedModel
    python pipelines/evaluate.py --model localhost:8500/git --dataset DIR             # a running server (gRPC)

The model may be a `.keras` file, an exported SavedModel version directory, or
`HOST:PORT/NAME` of a TF Serving (or medcap) server. Metrics are BLEU-1..4,
METEOR, ROUGE-L, CIDEr (pycocoevalcap) and ROUGE-1 F after ImageCLEFmedical's
preprocessing (`--raw` skips it), plus clinical field accuracy from the findings parser.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def caption_with_keras(path: Path, records, sampler: str, num_beams: int, batch_size: int) -> list[str]:
    """Captions from a `.keras` model through `generate()`."""
    import keras

    import keras_models  # noqa: F401  (registers the medcap layers)
    from pipelines.evaluate_lib import predict_captions

    model = keras.saving.load_model(path)
    return predict_captions(model, records, batch_size, sampler=sampler, num_beams=num_beams)["captions"]


def _batches(records, batch_size: int):
    for start in range(0, len(records), batch_size):
        yield records[start : start + batch_size]


def caption_with_saved_model(path: Path, records, sampler: str, batch_size: int) -> list[str]:
    """Captions from an exported SavedModel's signature, fed the raw file bytes."""
    import tensorflow as tf
    from tqdm import tqdm

    signature = tf.saved_model.load(str(path)).signatures["beam_search" if sampler == "beam" else "serving_default"]
    captions = []
    for batch in tqdm(list(_batches(records, batch_size)), desc="captioning", unit="batch"):
        images = tf.constant([Path(r.image_path).read_bytes() for r in batch])
        captions += [c.decode("utf-8") for c in signature(images=images)["captions"].numpy()]
    return captions


def caption_with_server(address: str, records, sampler: str, batch_size: int) -> list[str]:
    """Captions from a TF Serving compatible server over gRPC (`HOST:PORT/MODEL`)."""
    from serving.client import CaptionClient

    server, _, name = address.rpartition("/")
    signature = "beam_search" if sampler == "beam" else "serving_default"
    client = CaptionClient(server, name, signature=signature)
    captions = []
    for batch in _batches(records, batch_size):
        captions += [r["caption"] for r in client.caption([Path(r.image_path).read_bytes() for r in batch])]
    return captions


def caption_records(model: str, records, sampler: str = "greedy", num_beams: int = 3, batch_size: int = 32) -> list[str]:
    """Dispatch on what `model` names: a .keras file, a SavedModel directory, or a server address."""
    path = Path(model)
    if path.suffix == ".keras":
        return caption_with_keras(path, records, sampler, num_beams, batch_size)
    if (path / "saved_model.pb").is_file():
        return caption_with_saved_model(path, records, sampler, batch_size)
    if ":" in model and "/" in model:
        return caption_with_server(model, records, sampler, batch_size)
    raise SystemExit(f"--model {model!r} is neither a .keras file, a SavedModel directory, nor HOST:PORT/NAME.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python pipelines/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help=".keras file, SavedModel version dir, or HOST:PORT/NAME")
    p.add_argument("--dataset", required=True, help="ROCOv2-layout folder")
    p.add_argument("--split", help="split to caption (default: test, or valid when the dataset has no test split)")
    p.add_argument("--out", help="output folder (default: evaluations/<model name>-<split>-<time>)")
    p.add_argument("--sampler", choices=["greedy", "beam"], default="greedy")
    p.add_argument("--num-beams", type=int,
                   help="beams for --sampler beam with a .keras model (default 3); a SavedModel or server uses the "
                   "beam width its beam_search signature was exported with")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--raw", action="store_true", help="score raw text instead of ImageCLEFmedical preprocessing")
    p.add_argument("--limit", type=int, help="caption only the first N images")
    args = p.parse_args(argv)

    from pipelines.evaluate_lib import score_predictions, write_predictions
    from pipelines.evaluation_report import summary_text, write_evaluation_report
    from pipelines.rocov2 import DatasetError, list_splits, read_split

    if args.num_beams is not None and args.num_beams < 1:
        p.error(f"--num-beams must be 1 or more, got {args.num_beams}")
    if args.num_beams is not None and args.sampler == "beam" and not args.model.endswith(".keras"):
        print("note: --num-beams applies to .keras models; this model's beam_search signature keeps the beam width "
              "it was exported with (python -m export --num-beams)")
    if args.split is None:
        found = list_splits(args.dataset)
        args.split = "valid" if "test" not in found and "valid" in found else "test"
        if args.split == "valid":
            print(f"{args.dataset} has no test split: evaluating on valid")
    try:
        records, report = read_split(args.dataset, args.split)
    except (FileNotFoundError, DatasetError) as e:
        raise SystemExit(f"python pipelines/evaluate.py: {e}") from None
    records = records[: args.limit] if args.limit else records
    name = Path(args.model).stem if args.model.endswith(".keras") else args.model.strip("/").replace(":", "_").replace("/", "-")
    out = Path(args.out or f"evaluations/{name}-{args.split}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    captions = caption_records(args.model, records, args.sampler, 3 if args.num_beams is None else args.num_beams, args.batch_size)
    seconds = time.perf_counter() - start
    write_predictions(out / "predictions.csv", records, captions)
    metrics = score_predictions(records, captions, preprocess=not args.raw)
    metrics.update({"model": args.model, "dataset": args.dataset, "split": args.split, "images": len(records),
                    "skipped_rows": report.total - report.valid, "sampler": args.sampler,
                    "caption_seconds": round(seconds, 1)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    report_path = write_evaluation_report(out, records, captions, metrics)
    print(summary_text(metrics))
    print(f"\npredictions: {out / 'predictions.csv'}\nreport: {report_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
