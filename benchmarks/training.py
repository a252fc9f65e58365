"""Training speed: examples per second of a training step per model and preset, and the default run's wall time.

    python -m benchmarks.training                                # every preset of both models
    python -m benchmarks.training --presets git:small cnn_gru:small --steps 10

Presets with a concept head also time a concept pretraining step (`ConceptTagger`: the image
encoder and the head alone) on the same batch. Each preset's captioner is built as `pipelines/train.py` builds it (the preset's batch size,
AdamW, the default loss) and `fit` runs on one batch of random images and real captions held in
memory, so only the step is timed: `--steps` steps after a warm-up epoch that traces and compiles.
The default run's wall time (`python pipelines/train.py`: synthetic set, both models, small
presets, their CPU time budgets) is read from the newest `runs/*/summary.json` made with the
default settings; `--run-default` runs it first (about ten minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import print_table, write_json

REPO = Path(__file__).resolve().parents[1]
PRESETS = ["cnn_gru:tiny", "cnn_gru:small", "cnn_gru:efficientnetb0", "cnn_gru:densenet121",
           "git:tiny", "git:small", "git:base"]
DEFAULTS = {"dataset": None, "model": "all", "preset": "small", "epochs": None, "batch_size": None,
            "max_train_examples": None, "time_budget_minutes": None, "parallel": None}


def example_captions() -> list[str]:
    """The bundled real captions (ROCO examples) for vocabularies and batches."""
    from pipelines.rocov2 import read_split

    records, _ = read_split(REPO / "pipelines" / "examples", "train")
    return [r.caption for r in records]


def build(model: str, preset: str, captions: list[str]):
    """(compiled captioner as pipelines/train.py builds it, batch size of the preset)."""
    import keras

    from keras_models.registry import build_captioner, presets
    from pipelines.text import build_vocabulary, make_tokenizer

    keras.utils.set_random_seed(0)
    captioner = build_captioner(model, preset, make_tokenizer(build_vocabulary(captions, 2000)))
    captioner.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=1e-4, clipnorm=1.0))
    return captioner, presets(model)[preset].get("train", {}).get("batch_size", 32)


def one_batch(captioner, batch_size: int, captions: list[str]):
    """One cached batch of random images and real captions, as the training pipeline yields them."""
    import tensorflow as tf

    config = captioner.image_config
    rng = np.random.default_rng(0)
    images = rng.standard_normal((batch_size, config["image_size"], config["image_size"], config["channels"]))
    texts = [captions[i % len(captions)] for i in range(batch_size)]
    return tf.data.Dataset.from_tensors({"images": images.astype("float32"), "captions": texts}).cache()


def timed_fit(model, batch, steps: int, batch_size: int) -> float:
    """Examples per second of `fit` steps on `batch` repeated (after a warm-up epoch that traces and compiles)."""
    model.fit(batch.repeat(2), epochs=1, verbose=0, shuffle=False)  # a tf.data batch: nothing to shuffle
    started = time.perf_counter()
    model.fit(batch.repeat(steps), epochs=1, verbose=0, shuffle=False)
    return steps * batch_size / (time.perf_counter() - started)


def step_rate(captioner, batch_size: int, steps: int, captions: list[str]) -> float:
    """Examples per second of the captioner's `fit` steps on one in-memory batch."""
    return timed_fit(captioner, one_batch(captioner, batch_size, captions), steps, batch_size)


def concept_step_rate(captioner, batch_size: int, steps: int, captions: list[str]) -> float | None:
    """Examples per second of a concept pretraining step (`ConceptTagger`), or None without a concept head."""
    import keras

    from keras_models.concepts import ConceptTagger

    if captioner.backbone.concept_head is None:
        return None
    tagger = ConceptTagger(captioner.backbone)
    tagger.compile(optimizer=keras.optimizers.AdamW(1e-4, weight_decay=1e-4, clipnorm=1.0))
    batch = one_batch(captioner, batch_size, captions).map(lambda b: (captioner.preprocessor(b)[0],)).cache()
    return timed_fit(tagger, batch, steps, batch_size)


def default_run_seconds(runs: Path) -> dict | None:
    """The newest finished default run under `runs`: its wall seconds and when it was made."""
    found = []
    for summary in runs.glob("*/summary.json"):
        data = json.loads(summary.read_text())
        config = data.get("config", {})
        if all(config.get(k) == v for k, v in DEFAULTS.items()):
            found.append((summary.parent.name, data))
    if not found:
        return None
    name, data = max(found)
    return {"run": name, "wall_seconds": data["wall_seconds"], "resumed": data.get("resumed", False),
            "side_by_side": data.get("parallel", False),
            "models": {m: {k: r.get(k) for k in ("epochs_run", "train_seconds", "stopped_by_time_budget")}
                       for m, r in data["models"].items()}}


def main(argv: list[str] | None = None) -> int:
    """Measure each preset, read (or make) the default run, print the table."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=PRESETS, help="MODEL:PRESET pairs")
    p.add_argument("--steps", type=int, default=8, help="timed steps per preset")
    p.add_argument("--runs", type=Path, default=REPO / "runs", help="where pipelines/train.py writes its runs")
    p.add_argument("--run-default", action="store_true", help="run `python pipelines/train.py` first (~14 min)")
    p.add_argument("--out", help="JSON path (default benchmarks/results/training.json)")
    args = p.parse_args(argv)

    default_run = None
    if args.run_default:
        started = time.perf_counter()
        subprocess.run([sys.executable, "pipelines/train.py", "--out", str(args.runs)], cwd=REPO, check=True)
        print(f"default run: {time.perf_counter() - started:.0f} s wall (process included)")
    default_run = default_run_seconds(args.runs)

    captions = example_captions()
    rows = []
    for item in args.presets:
        model, preset = item.split(":")
        captioner, batch_size = build(model, preset, captions)
        steps = max(2, args.steps if captioner.count_params() < 50e6 else args.steps // 4)  # git:base is slow
        rate = step_rate(captioner, batch_size, steps, captions)
        concept_rate = concept_step_rate(captioner, batch_size, steps, captions)
        rows.append({"model": model, "preset": preset, "parameters": int(captioner.count_params()),
                     "batch_size": batch_size, "image_size": captioner.image_config["image_size"],
                     "steps": steps, "examples_per_second": rate, "concept_pretraining_examples_per_second": concept_rate})
        print(f"{model}:{preset}: {rate:.1f} examples/s"
              + (f"; concept pretraining {concept_rate:.1f} ({concept_rate / rate:.2f}x)" if concept_rate else ""), flush=True)
        del captioner
    print(f"\nTraining step throughput ({args.steps} steps after a warm-up epoch, in-memory batch):\n")
    print_table(["model", "preset", "parameters", "image size", "batch", "examples/s", "concept pretraining examples/s"],
                [[r["model"], r["preset"], f"{r['parameters']:,}", r["image_size"], r["batch_size"],
                  r["examples_per_second"], r["concept_pretraining_examples_per_second"] or "-"] for r in rows])
    if default_run:
        print(f"\nDefault `python pipelines/train.py` (run {default_run['run']}): "
              f"{default_run['wall_seconds'] / 60:.1f} min wall; " + ", ".join(
                  f"{m} {r['epochs_run']} epochs in {r['train_seconds'] / 60:.1f} min"
                  for m, r in default_run["models"].items()))
    else:
        print(f"\nNo finished default run under {args.runs}; use --run-default to make one.")
    write_json("training", {"rows": rows, "default_run": default_run}, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
