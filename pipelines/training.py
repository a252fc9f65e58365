"""The training job behind `pipelines/train.py`: data -> vocabulary -> fit -> evaluate -> report."""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import keras
import tensorflow as tf

from keras_models.registry import MODELS, build_captioner, presets
from keras_models.schedules import WarmupCosine
from pipelines.concept_pretraining import PRETRAINED_WEIGHTS, VALIDATION_IMAGES, pretrain_concepts
from pipelines.dataset import EpochOrder, epoch_variable, make_dataset
from pipelines.distributed import (
    ResumeFromChief,
    fit_custom,
    is_chief,
    make_strategy,
    needs_custom_loop,
    wait_for_all,
    weights_digest,
)
from pipelines.evaluate_lib import predict_captions, score_predictions, set_seed, write_predictions
from pipelines.evaluation_report import plot_examples, write_evaluation_report
from pipelines.parallel_training import should_train_in_parallel, train_in_parallel
from pipelines.plots import plot_field_accuracy, plot_history
from pipelines.report import write_run_report
from pipelines.rocov2 import list_splits, read_split
from pipelines.text import build_vocabulary, load_vocabulary, make_tokenizer, save_vocabulary
from pipelines.tfrecords import ShardedSplit, is_tfrecord_dataset, list_tfrecord_splits, read_tfrecord_split

DONE_MARKER = "DONE.json"
# A captioner epoch costs about this many concept pretraining epochs (2 cores, small presets). 2.2 was measured
# before the CNN-GRU's stem froze after pretraining (its later epochs 72-91 s against 32-45 s). In the two default
# runs of 2026-12-03 evening, captioner epochs (the first included) against a later pretraining epoch: CNN-GRU
# 78/57/56 s against 40 s (1.6) and 84/49/82 s against 36 s (2.0); GIT 113/78 s against 47 s (2.0). 1.8 sits between.
CAPTIONER_EPOCH_COST = 1.8
EVALUATION_RESERVE_SECONDS = 60.0  # kept for each evaluation still to come, until one has been timed


class TimeBudget(keras.callbacks.Callback):
    """Stop after the epoch when one more epoch would overrun `minutes` of wall time, or end after `deadline`;
    fit `schedule`'s decay to the epochs that fit.

    Each epoch's duration is measured from the end of its first batch, scaled to all its steps: the first batch
    of a fit also traces the training step (on 2 cores the CNN-GRU's first captioner epoch took 98-114 s, later
    ones 72-91 s, and predicting 107 s from the first cut a run's captioner to one of its three epochs). The first epoch also reads every
    file once, so later ones predict the next: against the model's own budget (a share of the run) the median
    of them, which one slow epoch on a shared machine does not move; against `deadline` (a
    `time.perf_counter()` value, the run's hard limit, which leaves time for the evaluations after training)
    the slowest of them. `reserve_epochs` keeps time for that many more epochs of this fit's length after it
    (concept pretraining keeps the captioner's epochs, in pretraining epochs: `CAPTIONER_EPOCH_COST`).
    `schedule` (a `WarmupCosine` over this fit's epochs) is planned to end its decay with the last epoch that
    fits: a tenth into the first epoch (from its steps so far), then after each epoch. A fit cut short, even to
    one epoch, still ends annealed.
    """

    def __init__(self, minutes: float | None, deadline: float | None = None, start: float | None = None,
                 reserve_epochs: float = 0.0, schedule: WarmupCosine | None = None):
        super().__init__()
        self.seconds = (minutes or 0) * 60
        self.deadline = deadline
        self.started = start  # when the budget began (e.g. before concept pretraining); default: when fit() starts
        self.reserve_epochs = reserve_epochs
        self.schedule = schedule
        self.stopped_early = False

    def on_train_begin(self, logs=None):
        self.epoch_start = time.perf_counter()
        self.start = self.started if self.started is not None else self.epoch_start
        self.epoch_seconds = []
        steps = (self.params or {}).get("steps") or 0
        self.early_batch = max(1, steps // 10) if steps > 2 else None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch, self.epoch_start = epoch, time.perf_counter()
        self.first_batch_end = None

    def on_train_batch_end(self, batch, logs=None):
        if batch == 0:
            self.first_batch_end = time.perf_counter()
        elif batch == self.early_batch and not self.epoch_seconds and self.schedule is not None and self._budgeted():
            # A first plan a tenth into the first epoch, so that a fit cut to that one epoch still anneals.
            now, steps = time.perf_counter(), self.params["steps"]
            step_seconds = (now - self.first_batch_end) / batch
            self._plan(self.epoch, now + step_seconds * (steps - 1 - batch), [step_seconds * steps], within=True)

    def _budgeted(self) -> bool:
        return bool(self.seconds or self.deadline)

    def epochs_that_fit(self, now: float, epoch_seconds: list[float]) -> tuple[float, float]:
        """How many more epochs fit after `now` (model budget, run deadline), given the epochs' durations so far."""
        later = epoch_seconds[1:] or epoch_seconds
        typical, slowest = max(statistics.median(later), 1e-6), max(later)
        by_budget = by_deadline = math.inf
        if self.seconds:
            by_budget = max(0, math.floor((self.seconds - (now - self.start)) / typical - self.reserve_epochs))
        if self.deadline:
            left = self.deadline - now - slowest - typical * self.reserve_epochs
            by_deadline = 0 if left < 0 else 1 + math.floor(left / typical)
        return by_budget, by_deadline

    def _plan(self, epoch: int, end: float, epoch_seconds: list[float], within: bool) -> tuple[float, float]:
        """Plan `schedule` to end its decay with the last epoch that fits once epoch `epoch` ends at `end`.

        `within`: planned during that epoch (it may then be the last); otherwise at its end, where a fit that
        stops needs no new plan. Returns `epochs_that_fit`.
        """
        by_budget, by_deadline = self.epochs_that_fit(end, epoch_seconds)
        planned = self.params["epochs"]
        last = min(planned, epoch + 1 + min(by_budget, by_deadline))
        if self.schedule is not None and (within or last > epoch + 1) and last != self.schedule.planned_epochs:
            self.schedule.plan_epochs(last)
            print(f"\nTime budget: {'about ' if within else ''}{last} of {planned} epochs fit; "
                  f"the learning rate now decays to its floor by the end of epoch {last}.")
        return by_budget, by_deadline

    def on_epoch_end(self, epoch, logs=None):
        planned = (self.params or {}).get("epochs", math.inf)
        if not self._budgeted() or epoch + 1 >= planned:
            return  # no budget, or the run ends here anyway: nothing was cut short
        now = time.perf_counter()
        steps = (self.params or {}).get("steps") or 0
        if self.first_batch_end is not None and steps > 1:  # without the first batch's tracing
            self.epoch_seconds.append((now - self.first_batch_end) * steps / (steps - 1))
        else:
            self.epoch_seconds.append(now - self.epoch_start)
        by_budget, by_deadline = self._plan(epoch, now, self.epoch_seconds, within=False)
        if by_budget == 0:
            print(f"\nTime budget: stopping after epoch {epoch + 1} ({(now - self.start) / 60:.1f} of {self.seconds / 60:.1f} min).")
            self.stopped_early = True
            self.model.stop_training = True
        elif by_deadline == 0:
            print(f"\nRun time budget: stopping after epoch {epoch + 1}; another would leave too little time to evaluate.")
            self.stopped_early = True
            self.model.stop_training = True


def warmup_cosine(learning_rate: float, epochs: int, steps: int) -> WarmupCosine:
    """Warm up from a tenth of `learning_rate` over one epoch (at most 200 steps), then cosine decay to 5%
    at the end of epoch `epochs` (a `TimeBudget` may move that end earlier)."""
    return WarmupCosine(learning_rate, epochs, steps, warmup_steps=min(steps, 200), warmup_start=0.1, alpha=0.05)


def synthetic_dataset(cache_dir: Path, sizes: dict | None = None) -> Path:
    """The embedded synthetic set (the default split sizes unless `sizes`), rendered into `cache_dir` unless there."""
    from pipelines.synthetic import ensure_dataset

    return ensure_dataset(cache_dir / "synthetic", seed=0, **(sizes or {}))


def prepare_data(cfg, cache_dir: Path) -> tuple[Path | str, dict, dict]:
    """The dataset root, its validated splits (records, or shards of a TFRecord dataset) and their reports."""
    tfrecords = bool(cfg.dataset) and is_tfrecord_dataset(cfg.dataset)
    if tfrecords:
        root = cfg.dataset  # may be a bucket URL: no Path
    elif cfg.dataset:
        root = Path(cfg.dataset)
    else:
        root = synthetic_dataset(cache_dir, cfg.synthetic)
    splits, reports = {}, {}
    available = list_tfrecord_splits(root) if tfrecords else list_splits(root)
    if "train" not in available or "valid" not in available:
        raise SystemExit(f"{root} needs train and valid splits (found: {available or 'none'}).")
    for split in available:
        records, report = read_tfrecord_split(root, split) if tfrecords else read_split(root, split, strict=cfg.strict)
        splits[split], reports[split] = records, report
        print(f"{split}: {report.valid} of {report.total} records usable" + ("" if report.ok else f"\n{report.summary()}"))
    if cfg.max_train_examples:
        train = splits["train"]
        splits["train"] = train.head(cfg.max_train_examples) if tfrecords else train[: cfg.max_train_examples]
    return root, splits, reports


def prepare_tokenizer(cfg, run_dir: Path, train_records):
    """The run's WordPiece tokenizer: learned from training captions once, then reused from vocab.txt."""
    vocab_path = run_dir / "vocab.txt"
    if vocab_path.is_file():
        vocabulary = load_vocabulary(vocab_path)
    else:
        vocabulary = build_vocabulary([r.caption for r in train_records], cfg.vocabulary_size)
        if is_chief():  # atomically: other workers may be reading it
            os.replace(save_vocabulary(vocabulary, vocab_path.with_suffix(".txt.tmp")), vocab_path)
    print(f"vocabulary: {len(vocabulary)} WordPiece tokens -> {vocab_path}")
    return make_tokenizer(vocabulary)


def model_budget_minutes(asked: float | None, preset: float | None, whole_run_deadline: float | None = None) -> float | None:
    """A model's time budget in minutes: `--time-budget` if given (0 = none), else the preset's.

    With `whole_run_deadline` (a `time.perf_counter()` value; the model trains beside the others, see
    `pipelines.parallel_training`), a preset's budget extends to that deadline.
    """
    if asked is not None:
        return asked
    if preset and whole_run_deadline is not None:
        return max(preset, (whole_run_deadline - time.perf_counter()) / 60)
    return preset


def train_one(name: str, cfg, tokenizer, splits: dict, run_dir: Path, strategy: tf.distribute.Strategy | None = None,
              deadline: float | None = None, whole_run: bool = False) -> dict:
    """Fit one captioner with checkpoints, backup/restore, early stopping and a CSV log, on `strategy`'s replicas.

    Training stops after the epoch that would overrun the preset's time budget or end after `deadline`
    (a `time.perf_counter()` value). With `whole_run` (models trained side by side), a preset's budget
    extends to `deadline`; a `--time-budget` given on the command line still holds.
    """
    model_dir = run_dir / name
    model_path = model_dir / "model.keras"
    if (model_dir / DONE_MARKER).is_file():
        print(f"\n[{name}] already trained in this run; loading {model_path}")
        return {"model": keras.saving.load_model(model_path), **json.loads((model_dir / DONE_MARKER).read_text())}

    strategy = strategy or tf.distribute.get_strategy()
    chief, custom_loop = is_chief(), needs_custom_loop(strategy)
    out_dir = model_dir if chief else Path(tempfile.mkdtemp(prefix=f"medcap-{name}-"))  # other workers: scratch
    out_dir.mkdir(parents=True, exist_ok=True)
    preset = presets(name)[cfg.preset]
    train_cfg = dict(preset.get("train", {}))
    epochs = cfg.epochs or train_cfg.get("epochs", 10)
    batch_size = cfg.batch_size or train_cfg.get("batch_size", 32)
    learning_rate = cfg.learning_rate or train_cfg.get("learning_rate", 1e-3)
    budget = model_budget_minutes(cfg.time_budget_minutes, train_cfg.get("time_budget_minutes"),
                                  deadline if whole_run else None)
    augment = cfg.augment if cfg.augment is not None else train_cfg.get("augment", True)
    concept_epochs = cfg.concept_epochs if cfg.concept_epochs is not None else train_cfg.get("concept_epochs", 0)
    freeze_stem = cfg.freeze_stem if cfg.freeze_stem is not None else train_cfg.get("freeze_stem", False)
    if custom_loop and concept_epochs:
        print(f"[{name}] concept pretraining does not run under multi-worker training; skipping its {concept_epochs} epochs")
        concept_epochs = 0
    deadline = deadline if budget else None  # the run's budget binds only models with a time budget (0 = none)

    set_seed(cfg.seed)
    # the custom loop runs whole global batches from an endless stream; fit() runs one pass per epoch
    steps = max(1, len(splits["train"]) // batch_size) if custom_loop else -(-len(splits["train"]) // batch_size)
    schedule = warmup_cosine(learning_rate, epochs, steps)
    with strategy.scope():
        image_size = getattr(cfg, "image_size", None)
        model = build_captioner(name, cfg.preset, tokenizer, sequence_length=cfg.sequence_length,
                                **({"image_config": {"image_size": image_size}} if image_size else {}),
                                **(getattr(cfg, "backbone", None) or {}))
        model.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, clipnorm=1.0))
    if concept_epochs and model.backbone.concept_head is None:
        raise SystemExit(f"--concept-epochs {concept_epochs}: the {name} preset {cfg.preset!r} has no concept head "
                         "to pretrain (use a preset with one, e.g. small, or --concept-epochs 0).")
    overrides = ", ".join(f"{k}={v!r}" for k, v in (getattr(cfg, "backbone", None) or {}).items())
    print(f"\n[{name}] preset {cfg.preset}{f' with {overrides}' if overrides else ''}: {model.count_params():,} parameters; "
          f"images {model.image_config['image_size']} px; "
          f"{epochs} epochs max x {steps} steps of {batch_size}; lr {learning_rate:g}; "
          f"time budget {f'{budget:.3g} min' if budget else 'none'}{_deadline_note(deadline)}; "
          f"augmentation {'on' if augment else 'off'}; "
          f"concept pretraining {concept_epochs or 'off'}{' epochs' if concept_epochs else ''}; "
          f"{strategy.num_replicas_in_sync} replica(s) ({type(strategy).__name__})")
    start = time.perf_counter()
    # concept pretraining counts against the model's budget and leaves time for the captioner's epochs
    # (not under multi-worker training: each worker would plan its own learning rates from its own clock)
    budget_cb = TimeBudget(budget, deadline, start=start, schedule=None if custom_loop else schedule)
    backup = keras.callbacks.BackupAndRestore if chief else functools.partial(ResumeFromChief, str(model_dir / "backup"))
    callbacks = [
        backup(str(out_dir / "backup"), double_checkpoint=True),
        # The captions' own validation loss: `val_loss` also sums the concept head's word loss over the
        # vocabulary, which on small real sets overfits (and stopped training) while captions still improved.
        keras.callbacks.ModelCheckpoint(str(out_dir / "best.keras"), monitor="val_caption_loss", save_best_only=True),
        keras.callbacks.EarlyStopping(monitor="val_caption_loss", patience=3, restore_best_weights=True),
        keras.callbacks.CSVLogger(str(out_dir / "history.csv"), append=True),
        budget_cb,
    ]
    data_epoch = epoch_variable()  # the training order is the epoch's, also after --resume
    callbacks.append(EpochOrder(data_epoch, offset=concept_epochs))  # after the pretraining's passes
    pretraining, frozen = None, []
    if freeze_stem and not concept_epochs:
        print(f"[{name}] image stem not frozen: freezing applies only after concept pretraining, which this run skips")
    if custom_loop:
        def data(split: str, training: bool):
            return lambda ctx: make_dataset(splits[split], model.image_config, ctx.get_per_replica_batch_size(batch_size),
                                            training=training, seed=cfg.seed, repeat=training, input_context=ctx,
                                            epoch=data_epoch, augment=augment)

        history = fit_custom(model, strategy, data("train", True), data("valid", False), epochs, steps, callbacks)
    else:
        train_ds = make_dataset(splits["train"], model.image_config, batch_size, training=True, seed=cfg.seed,
                                epoch=data_epoch, augment=augment)
        valid_ds = make_dataset(splits["valid"], model.image_config, batch_size, training=False)
        if concept_epochs:
            # it stops where the captioner's planned epochs would no longer fit the budget or the run's deadline
            reserve = epochs * CAPTIONER_EPOCH_COST
            valid = splits["valid"]
            valid = valid.head(VALIDATION_IMAGES) if isinstance(valid, ShardedSplit) else valid[:VALIDATION_IMAGES]
            concept_schedule = warmup_cosine(learning_rate, concept_epochs, steps)
            concept_budget = TimeBudget(budget, deadline, start=start, reserve_epochs=reserve, schedule=concept_schedule)
            pretraining = pretrain_concepts(model, train_ds, make_dataset(valid, model.image_config, batch_size),
                                            concept_epochs, concept_schedule, out_dir, data_epoch, strategy,
                                            callbacks=[concept_budget])
            if freeze_stem:  # also on resume, so that the captioner's optimizer matches its backup
                frozen = model.backbone.freeze_image_stem()
                print(f"[{name}] image stem frozen for the captioner's epochs: {', '.join(frozen) or 'none in this encoder'}")
        history = model.fit(train_ds, validation_data=valid_ds, epochs=epochs, callbacks=callbacks, verbose=2,
                            shuffle=False)  # make_dataset shuffles; Keras would warn that it ignores shuffle=True
    seconds = time.perf_counter() - start
    model.save(out_dir / "model.keras")  # on every worker (it may read synchronised variables); only the chief's stays
    info = {
        "preset": cfg.preset,
        "image_size": int(model.image_config["image_size"]),
        "augment": bool(augment),
        "parameters": int(model.count_params()),
        "epochs_run": len(history.epoch),
        "train_seconds": round(seconds, 1),
        "stopped_by_time_budget": budget_cb.stopped_early,
        "concept_pretraining": pretraining,
        "frozen_stem_layers": frozen,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "replicas": strategy.num_replicas_in_sync,
        "weights_sha256": weights_digest(model),
        "final": {k: round(float(v[-1]), 4) for k, v in history.history.items() if v},
    }
    print(f"[{name}] final weights sha256 {info['weights_sha256']}")
    if chief:
        plot_history(model_dir / "history.csv", model_dir / "curves.png", f"{name} ({cfg.preset}) training")
        (model_dir / "DONE.json.tmp").write_text(json.dumps(info, indent=2))  # atomically: a kill may land here
        os.replace(model_dir / "DONE.json.tmp", model_dir / DONE_MARKER)
        (model_dir / PRETRAINED_WEIGHTS).unlink(missing_ok=True)  # the trained model now holds them
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"model": model, **info}


def _deadline_note(deadline: float | None) -> str:
    """' (N min left in the run's budget)' for the training log; '' without a deadline."""
    if deadline is None:
        return ""
    return f" ({max(0.0, deadline - time.perf_counter()) / 60:.1f} min left in the run's budget)"


def evaluate_one(name: str, model, records, model_dir: Path, context: dict) -> dict:
    """Caption the evaluation split; write predictions.csv, metrics.json and the model's evaluation report."""
    predictions = predict_captions(model, records)
    write_predictions(model_dir / "predictions.csv", records, predictions["captions"])
    metrics = score_predictions(records, predictions["captions"])
    metrics.update(context, model=f"{name}/model.keras", sampler="greedy",
                   caption_seconds=round(predictions["seconds"], 1),
                   images_per_second=round(predictions["images_per_second"], 1))
    metrics["examples"] = [
        {"id": r.id, "reference": r.caption, "prediction": c}
        for r, c in list(zip(records, predictions["captions"]))[:8]
    ]
    (model_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_evaluation_report(model_dir, records, predictions["captions"], metrics)
    return metrics, predictions["captions"]


def run_training(cfg, run_dir: Path, resumed: bool, cache_dir: Path) -> Path | None:
    """Train and evaluate every requested model; return the path of report.md (None on a non-chief worker)."""
    strategy = make_strategy(cfg.distribute)  # first: MultiWorkerMirroredStrategy must precede any other TF op
    started = time.perf_counter()
    run_deadline = started + cfg.run_time_budget_minutes * 60 if cfg.run_time_budget_minutes else None
    root, splits, reports = prepare_data(cfg, cache_dir)
    tokenizer = prepare_tokenizer(cfg, run_dir, splits["train"])
    eval_split = cfg.eval_split if cfg.eval_split in splits else "valid"
    names = MODELS if cfg.model == "all" else (cfg.model,)
    evaluation_seconds = EVALUATION_RESERVE_SECONDS

    def deadline(models_left: int) -> float | None:
        """When training must end so that the evaluations still to come (timed by the last one) fit the run's budget."""
        return run_deadline - 1.25 * evaluation_seconds * models_left if run_deadline else None

    if not is_chief():  # a worker only trains: the chief evaluates and reports
        for i, name in enumerate(names):
            train_one(name, cfg, tokenizer, splits, run_dir, strategy, deadline(len(names) - i))
        wait_for_all(strategy)  # until the chief is done: leaving early would abort its collectives
        return None
    eval_records = splits[eval_split]
    if isinstance(eval_records, ShardedSplit):  # evaluation and its plots read image files
        eval_records = eval_records.unpack(cache_dir / "tfrecords" / eval_records.checksum[:16] / eval_split)
    context = {"dataset": str(root), "split": eval_split, "images": len(splits[eval_split]),
               "skipped_rows": reports[eval_split].total - reports[eval_split].valid}
    results, captions = {}, {}
    to_train = [name for name in names if not (run_dir / name / DONE_MARKER).is_file()]  # a resumed run
    parallel = should_train_in_parallel(cfg.parallel, len(to_train), cfg.distribute)
    if parallel:  # each model in its own process, each evaluating its own; deadline(1): one evaluation each
        for name, (trained, captions[name]) in train_in_parallel(names, cfg, run_dir, splits, eval_records, context,
                                                                 deadline(1)).items():
            results[name] = trained
    else:
        for i, name in enumerate(names):
            trained = train_one(name, cfg, tokenizer, splits, run_dir, strategy, deadline(len(names) - i))
            model = trained.pop("model")
            print(f"\n[{name}] evaluating on {eval_split} ({len(eval_records)} images)")
            evaluation_started = time.perf_counter()
            trained["metrics"], captions[name] = evaluate_one(name, model, eval_records, run_dir / name, context)
            evaluation_seconds = time.perf_counter() - evaluation_started
            results[name] = trained
    fields = {n: r["metrics"]["fields"] for n, r in results.items()}
    plot_field_accuracy(fields, run_dir / "field_accuracy.png", f"Field accuracy on {eval_split}")
    plot_examples(eval_records, captions, run_dir / "examples.png")
    summary = {
        "dataset": str(root),
        "splits": {s: {"usable": r.valid, "total": r.total} for s, r in reports.items()},
        "eval_split": eval_split,
        "resumed": resumed,
        "parallel": parallel,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "models": results,
        "config": asdict(cfg),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    report = write_run_report(run_dir, summary)
    wait_for_all(strategy)  # release the workers
    return report
