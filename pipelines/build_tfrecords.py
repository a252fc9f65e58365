"""ROCOv2 layout -> sharded TFRecords with a manifest, for training that outgrows one machine's files.

    python -m pipelines.build_tfrecords --dataset ../shared/data/roco-ccby --out data/roco-tfrecords --shards 16
    python -m pipelines.build_tfrecords --dataset DIR --out gs://BUCKET/rocov2 --shards 256
    python -m pipelines.build_tfrecords --verify data/roco-tfrecords      # re-hash every shard

Every split found is validated first (`pipelines.rocov2.read_split`; bad rows are skipped and counted,
or fail the build with --strict), then written in order into near-equal shards. `manifest.json`, written
last, holds per split the example and skipped counts and each shard's size and SHA-256. Train on the
result exactly like on the folder: `python pipelines/train.py --dataset data/roco-tfrecords`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(dataset: str | Path, out: str, shards: int, splits: list[str] | None = None, strict: bool = False,
          progress: bool = True) -> dict:
    """Validate each split of a ROCOv2 folder and write it as shards under `out`; return the manifest's splits."""
    import tensorflow as tf

    from pipelines.rocov2 import list_splits, read_split
    from pipelines.tfrecords import write_manifest, write_split

    if shards < 1:
        raise ValueError("--shards must be at least 1.")
    splits = splits or list_splits(dataset)
    if not splits:
        raise SystemExit(f"No {{split}}_captions.csv in {dataset}: is it a ROCOv2-layout folder?")
    tf.io.gfile.makedirs(out)
    entries = {}
    for split in splits:
        records, report = read_split(dataset, split, strict=strict, progress=progress)
        if not records:
            raise SystemExit(f"Split '{split}' of {dataset} has no usable records.\n{report.summary()}")
        entries[split] = {
            "examples": len(records),
            "skipped": report.total - report.valid,
            "problems": report.problems,
            "shards": write_split(records, out, split, shards, progress=progress),
        }
    write_manifest(out, entries, source=str(Path(dataset).expanduser().absolute()))
    return entries


def main(argv: list[str] | None = None) -> int:
    """Build (or verify) a sharded TFRecord dataset from the command line."""
    p = argparse.ArgumentParser(prog="python -m pipelines.build_tfrecords", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="ROCOv2-layout folder ({split}_captions.csv + {split}/ images)")
    p.add_argument("--out", help="output folder or bucket URL (gs://...) for the shards and manifest.json")
    p.add_argument("--shards", type=int, default=16,
                   help="shards per split (fewer for a split with fewer examples); aim for 100-200 MB per shard "
                        "and at least as many shards as training workers (default 16)")
    p.add_argument("--splits", nargs="+", help="splits to convert (default: every split found)")
    p.add_argument("--strict", action="store_true", help="fail if any row has a missing/corrupt image or empty caption")
    p.add_argument("--verify", metavar="DIR", help="only re-hash the shards of an existing build against its manifest")
    args = p.parse_args(argv)

    if args.verify:
        from pipelines.tfrecords import verify

        problems = verify(args.verify)
        print("\n".join(problems) or f"{args.verify}: every shard matches the manifest.")
        return 1 if problems else 0
    if not (args.dataset and args.out):
        p.error("--dataset and --out are required (or --verify DIR)")
    started = time.perf_counter()
    entries = build(args.dataset, args.out, args.shards, args.splits, args.strict)
    for split, entry in entries.items():
        size = sum(s["bytes"] for s in entry["shards"]) / 1e6
        print(f"{split}: {entry['examples']} examples ({entry['skipped']} skipped) in {len(entry['shards'])} "
              f"shards, {size:.1f} MB")
    print(f"Done in {time.perf_counter() - started:.1f} s -> {args.out}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
