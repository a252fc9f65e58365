"""Input pipeline: images per second the tf.data pipeline delivers against what a training step consumes.

    python -m benchmarks.input_pipeline                          # real ROCO sample if present, else synthetic
    python -m benchmarks.input_pipeline --dataset DIR --records 512

For each model's CPU preset (`small`), `pipelines.dataset.make_dataset` runs exactly as in training
(decode, resize, shuffle, augment, normalise; the decoded images kept in memory after the first epoch
when they fit `pipelines.dataset.IMAGE_CACHE_BYTES`) and is drained on its own: images per second on the
first epoch (files read, decoded and cached) and on a cached epoch. The consumer is
`benchmarks.training.step_rate` (fit on an in-memory batch). The pipeline must deliver at least 3x what
the step consumes, so it is never the bottleneck; as a check, `fit` on the real pipeline is timed too and
should match the in-memory rate.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.common import print_table, write_json
from benchmarks.training import build, example_captions, step_rate

REPO = Path(__file__).resolve().parents[1]
SHARED_ROCO = REPO.parent / "shared" / "data" / "roco-ccby"
TARGET = 3.0


def records_for(dataset: str | None, count: int) -> tuple[list, str]:
    """`count` training records: --dataset, else the shared real ROCO sample, else the synthetic set."""
    from pipelines.rocov2 import read_split

    if dataset:
        root = Path(dataset)
    elif (SHARED_ROCO / "train_captions.csv").is_file():
        root = SHARED_ROCO
    else:
        from pipelines.train import DEFAULT_CACHE
        from pipelines.training import synthetic_dataset

        root = synthetic_dataset(DEFAULT_CACHE)
    records, _ = read_split(root, "train")
    return records[:count], str(root)


def drain(dataset, epochs: int = 1) -> float:
    """Images per second over `epochs` full passes of `dataset`."""
    images, started = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in dataset:
            images += int(batch["images"].shape[0])
    return images / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    """Measure both models; print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.input_pipeline", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", help="a ROCOv2-layout folder")
    p.add_argument("--records", type=int, default=512, help="training records to read")
    p.add_argument("--models", nargs="+", default=["cnn_gru", "git"])
    p.add_argument("--preset", default="small")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--out", help="JSON path (default benchmarks/results/input_pipeline.json)")
    args = p.parse_args(argv)

    from pipelines.dataset import make_dataset

    records, root = records_for(args.dataset, args.records)
    captions = example_captions()
    rows = []
    for name in args.models:
        captioner, batch_size = build(name, args.preset, captions)
        dataset = make_dataset(records, captioner.image_config, batch_size, training=True, seed=0)
        first = drain(dataset)
        cached = drain(dataset, 2)
        consumed = step_rate(captioner, batch_size, args.steps, captions)
        steps = len(records) // batch_size
        captioner.fit(dataset.take(2), epochs=1, verbose=0, shuffle=False)  # retrace for the pipeline's element spec
        started = time.perf_counter()
        captioner.fit(dataset.take(steps), epochs=1, verbose=0, shuffle=False)
        fed = steps * batch_size / (time.perf_counter() - started)
        rows.append({"model": name, "preset": args.preset, "batch_size": batch_size,
                     "image_size": captioner.image_config["image_size"], "pipeline_first_epoch": first,
                     "pipeline_cached": cached, "step_consumes": consumed, "ratio": cached / consumed,
                     "fit_on_pipeline": fed, "target": TARGET})
        print(f"{name}: pipeline {cached:.0f} images/s (first epoch {first:.0f}), step {consumed:.0f}/s, "
              f"fit on the pipeline {fed:.0f}/s", flush=True)
        del captioner
    print(f"\n{len(records)} training records from {root}; images/s; pipeline alone on all cores.\n")
    print_table(["model", "preset", "image size", "batch", "pipeline, 1st epoch", "pipeline, cached",
                 "training step", "pipeline / step", "fit on the pipeline"],
                [[r["model"], r["preset"], r["image_size"], r["batch_size"], r["pipeline_first_epoch"],
                  r["pipeline_cached"], r["step_consumes"], f"{r['ratio']:.1f}x (>= {TARGET:g}x)",
                  r["fit_on_pipeline"]] for r in rows])
    write_json("input_pipeline", {"dataset": root, "records": len(records), "rows": rows}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
