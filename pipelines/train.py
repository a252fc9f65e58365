"""Train medcap's captioners on a ROCOv2-layout dataset (the embedded synthetic one by default).

    python pipelines/train.py                       # synthetic data, both models, CPU presets
    python pipelines/train.py --dataset ../shared/data/roco-ccby --model git
    python pipelines/train.py --resume              # continue the latest run after a crash
    python pipelines/train.py --dataset data/roco-tfrecords --distribute mirrored     # all local GPUs
    TF_CONFIG='{...}' python pipelines/train.py --dataset DIR --distribute multi-worker --run-dir /shared/run1

Everything a run makes lands in one run directory: per model the trained
`model.keras`, `history.csv`, curves, predictions and metrics; at the top the
vocabulary, the exact config and `report.md`.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python pipelines/train.py` from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipelines.synthetic import DEFAULT_SPLIT_SIZES  # noqa: E402  (after the path fix above)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_CACHE = Path(os.environ.get("MEDCAP_CACHE_DIR", Path.home() / ".cache" / "medcap"))


@dataclass
class TrainConfig:
    """Everything that decides a run; printed at the start and saved as config.json."""

    dataset: str | None = None
    model: str = "all"
    preset: str = "small"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    time_budget_minutes: float | None = None
    run_time_budget_minutes: float | None = 14.5
    augment: bool | None = None
    concept_epochs: int | None = None
    freeze_stem: bool | None = None
    backbone: dict = field(default_factory=dict)  # preset backbone settings replaced (--backbone KEY=VALUE)
    image_size: int | None = None  # the preset's unless set (--image-size)
    vocabulary_size: int = 2000
    sequence_length: int | None = None
    max_train_examples: int | None = None
    eval_split: str = "test"
    out: str = "runs"
    run_dir: str = ""
    seed: int = 0
    strict: bool = False
    distribute: str = "none"
    parallel: bool | None = None
    synthetic: dict | None = field(default_factory=lambda: dict(DEFAULT_SPLIT_SIZES))


def backbone_setting(text: str) -> tuple[str, object]:
    """'dropout=0' -> ('dropout', 0): one `--backbone` setting, its value a Python literal or else a string."""
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. dropout=0), got {text!r}")
    try:
        return key.strip(), ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
        return key.strip(), value.strip()  # a bare word such as vision_stem=conv


def wrong_type(value: object, current: object) -> str | None:
    """'a bool (now True)' when `value` cannot stand where the setting is now `current`; else None.

    Only plain scalars are checked (an int may stand for a float); a setting that is None or a
    container now may take anything the backbone accepts.
    """
    if current is None or not isinstance(current, (bool, int, float, str)):
        return None
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}[type(current)]
    if isinstance(value, kinds) and (isinstance(value, bool) == isinstance(current, bool)):
        return None
    return f"{'an' if type(current) is int else 'a'} {type(current).__name__} (now {current!r})"


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, str | None]:
    """Command-line options -> (config, run directory to resume or None)."""
    p = argparse.ArgumentParser(
        prog="python pipelines/train.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--dataset", help="ROCOv2-layout folder ({split}_captions.csv + {split}/ images), or sharded "
                   "TFRecords from python -m pipelines.build_tfrecords (a folder or gs:// URL). "
                   "Default: the embedded synthetic radiology set, generated once and cached in "
                   f"{DEFAULT_CACHE}/synthetic.")
    p.add_argument("--model", choices=["cnn_gru", "git", "all"], default="all", help="which captioner(s) to train")
    p.add_argument("--preset", default="small", help="model size preset: tiny (tests), small (CPU default), "
                   "or a larger one listed by keras_models.registry.presets(model)")
    p.add_argument("--epochs", type=int, help="maximum epochs (default: the preset's); early stopping on the validation caption loss may end sooner")
    p.add_argument("--batch-size", type=int, help="examples per step (default: the preset's)")
    p.add_argument("--learning-rate", type=float, help="peak Adam learning rate (default: the preset's)")
    p.add_argument("--time-budget", type=float, dest="time_budget_minutes",
                   help="stop a model's training after the epoch that would overrun this many minutes "
                        "(default: the preset's CPU budget; 0 = no limit, also for --run-time-budget)")
    p.add_argument("--run-time-budget", type=float, dest="run_time_budget_minutes", default=14.5,
                   help="models trained under a time budget also stop early enough that the whole run, "
                        "evaluations included, ends within this many minutes: one after the other, the last one gets what "
                        "the first left; side by side, each may train until then (default 14.5, what the CPU presets are sized for; 0 = no limit)")
    p.add_argument("--augment", action=argparse.BooleanOptionalAction,
                   help="random rotation, zoom and contrast on training images, never a flip (default: the "
                        "preset's; off for the small presets, where it did not help within their CPU budgets)")
    p.add_argument("--concept-epochs", type=int, dest="concept_epochs",
                   help="epochs that first train the image encoder and concept head alone to predict each caption's "
                        "words, before the captioner trains (about half a captioner epoch each on CPU; they count "
                        "against the time budget, which cuts them first). Default: the preset's (small: CNN-GRU 6, "
                        "GIT 8, as many as the budget fits; pretraining also stops after two epochs without a lower "
                        "validation loss); "
                        "0 = off, which did better for the CNN-GRU on a small real sample (README)")
    p.add_argument("--freeze-stem", action=argparse.BooleanOptionalAction, dest="freeze_stem",
                   help="after concept pretraining, freeze the image encoder's convolutions (CNN-GRU: the compact "
                        "CNN; GIT: its conv stem) while the captioner trains the rest: "
                        "faster epochs. Default: the preset's (small: on; the time saved goes to more epochs)")
    p.add_argument("--backbone", action="append", type=backbone_setting, default=[], metavar="KEY=VALUE",
                   help="replace one of the preset's backbone settings for this run, e.g. --backbone dropout=0 "
                        "--backbone vision_num_layers=3 (repeatable; VALUE is a Python literal, a bare word a string; "
                        "the keys are the backbone's arguments, as in keras_models/git/git_presets.py and "
                        "keras_models/cnn_gru/presets.py)")
    p.add_argument("--image-size", type=int, metavar="PIXELS",
                   help="side of the square image the models read: every image is resized (and padded or cropped, "
                        "as the preset says) to it, in training and in the exported SavedModel. Default: the "
                        "preset's (small: 128; at least 32; GIT needs a multiple of its patch size, 16). Larger "
                        "sees smaller lesions and costs time: about (size / 128)^2 as much per epoch for the small "
                        "presets, more once the decoded training images no longer fit the 1 GiB in-memory cache "
                        "(16,000 images: above about 128 px), when they are decoded every epoch")
    p.add_argument("--vocab-size", type=int, default=2000, dest="vocabulary_size",
                   help="WordPiece vocabulary size learned from the training captions")
    p.add_argument("--sequence-length", type=int, help="maximum caption length in tokens (default: the preset's)")
    p.add_argument("--max-train-examples", type=int, help="use only the first N training records (quick trials)")
    p.add_argument("--eval-split", default="test", help="split to evaluate on at the end (falls back to valid)")
    p.add_argument("--synthetic-size", type=int, nargs=3, metavar=("TRAIN", "VALID", "TEST"),
                   help="image counts of the generated synthetic set (default "
                        + " ".join(str(n) for n in DEFAULT_SPLIT_SIZES.values()) + ")")
    p.add_argument("--out", default="runs", help="parent folder of run directories")
    p.add_argument("--run-dir", default="", help="use this run directory instead of a new timestamped one; "
                   "launched again, it continues the run (every multi-worker node names the same shared folder)")
    p.add_argument("--distribute", choices=["none", "mirrored", "multi-worker"], default="none",
                   help="tf.distribute strategy: mirrored = every GPU of this machine (Keras fit); multi-worker = "
                        "the cluster in TF_CONFIG, one process per node (custom training step); only the chief "
                        "(worker 0) writes checkpoints, plots and reports")
    p.add_argument("--parallel", action=argparse.BooleanOptionalAction,
                   help="train the models side by side, one process each with an equal share of the CPU cores; each "
                        "model's preset time budget then extends to the run's deadline. Default: on when training "
                        "more than one model without --distribute on a machine with no GPU and a core per model (one "
                        "TensorFlow process keeps 2 cores only partly busy: two processes did about 1.8x the work)")
    p.add_argument("--resume", nargs="?", const="latest", metavar="RUN_DIR",
                   help="continue a killed run from its last finished epoch (default: the latest run in --out)")
    p.add_argument("--seed", type=int, default=0, help="random seed for data order, augmentation and weights")
    p.add_argument("--strict", action="store_true",
                   help="fail before training if any row has a missing/corrupt image or empty caption")
    args = p.parse_args(argv)
    args.backbone = dict(args.backbone)
    if args.backbone:
        from keras_models.registry import MODELS, backbone_arguments, backbone_values

        for model in MODELS if args.model == "all" else (args.model,):
            unknown = sorted(set(args.backbone) - set(backbone_arguments(model)))
            if unknown:
                p.error(f"--backbone {', '.join(unknown)}: not a setting of the {model} backbone"
                        + (" (with --model all a setting must exist in both; pick one with --model)"
                           if args.model == "all" else "") + f". Its settings: {', '.join(backbone_arguments(model))}")
            for key, value in args.backbone.items():
                wrong = wrong_type(value, backbone_values(model, args.preset).get(key))
                if wrong:
                    p.error(f"--backbone {key}={value!r}: the {model} backbone's {key} is {wrong}")
    if args.image_size is not None:
        if args.image_size < 32:  # the encoders' last feature maps need 2 x 2 cells (quadrant pooling), ImageNet CNNs 32 px
            p.error(f"--image-size must be at least 32 pixels, got {args.image_size}")
        if args.model in ("git", "all"):
            from keras_models.registry import backbone_values

            patch = {**backbone_values("git", args.preset), **args.backbone}.get("patch_size")
            if patch and (args.image_size % patch or args.image_size < 2 * patch):
                p.error(f"--image-size {args.image_size}: GIT's {args.preset} preset cuts images into {patch}-pixel "
                        f"patches, at least 2 x 2; use a multiple of {patch} "
                        f"(e.g. {max(2 * patch, round(args.image_size / patch) * patch)})")
    resume = args.__dict__.pop("resume")
    synthetic_size = args.__dict__.pop("synthetic_size")
    cfg = TrainConfig(**vars(args))
    if synthetic_size:
        if cfg.dataset:
            p.error("--synthetic-size sizes the generated synthetic set: not with --dataset")
        cfg.synthetic = dict(zip(("n_train", "n_valid", "n_test"), synthetic_size))
    if cfg.dataset:
        cfg.synthetic = None  # the config a run saves describes the data it used
    if cfg.concept_epochs is not None and cfg.concept_epochs < 0:
        p.error(f"--concept-epochs must be 0 or more, got {cfg.concept_epochs}")
    if cfg.distribute == "multi-worker" and not (cfg.dataset and (cfg.run_dir or resume)):
        p.error("--distribute multi-worker needs --dataset and --run-dir: every worker must read the same data "
                "and the chief's run directory (make a synthetic set once with python -m pipelines.synthetic)")
    if resume is None and cfg.run_dir and (Path(cfg.run_dir) / "config.json").is_file():
        resume = cfg.run_dir  # a relaunched job continues where it stopped
    return cfg, resume


def resolve_run_dir(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, Path]:
    """A fresh timestamped run directory, or the one to resume with its saved config."""
    if resume is None:
        run_dir = Path(cfg.run_dir) if cfg.run_dir else Path(cfg.out) / time.strftime("%Y%m%d-%H%M%S")
        run_dir.mkdir(parents=True, exist_ok=bool(cfg.run_dir))
        cfg.run_dir = str(run_dir)
        return cfg, run_dir
    if resume == "latest":
        runs = sorted(p for p in Path(cfg.out).glob("*") if (p / "config.json").is_file())
        if not runs:
            sys.exit(f"--resume: no run with a config.json in {cfg.out}/ to continue.")
        run_dir = runs[-1]
    else:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            sys.exit(f"--resume: {run_dir} has no config.json; is it a run directory?")
    saved = TrainConfig(**json.loads((run_dir / "config.json").read_text()))
    saved.run_dir = str(run_dir)
    return saved, run_dir


def main(argv: list[str] | None = None) -> int:
    """Run the whole job: data, vocabulary, training, evaluation, plots and report."""
    cfg, resume = parse_args(argv)
    cfg, run_dir = resolve_run_dir(cfg, resume)

    from pipelines.distributed import is_chief
    from pipelines.training import run_training  # heavy imports after --help has been served

    print("medcap training run\n" + json.dumps(asdict(cfg), indent=2), flush=True)
    if is_chief():  # atomically: other workers may be reading it to continue the run
        (run_dir / "config.json.tmp").write_text(json.dumps(asdict(cfg), indent=2))
        os.replace(run_dir / "config.json.tmp", run_dir / "config.json")
    report = run_training(cfg, run_dir, resumed=resume is not None, cache_dir=DEFAULT_CACHE)
    if report is None:
        print("\nWorker done; the chief writes the run's outputs.")
    else:
        print(f"\nDone. Outputs are in {run_dir.resolve()}\n  report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
