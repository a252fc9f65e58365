"""Concept pretraining: a few epochs that train a captioner's image path alone, before the captioner.

`keras_models.concepts.ConceptTagger` fits the image encoder and the concept head to predict which
words each training caption uses. An epoch of it costs about half a captioner epoch on CPU (no decoder
runs), and on the synthetic set 3 such epochs before 4 captioner epochs beat 5 captioner epochs
(all fields 87.2% -> 90.6%, `benchmarks/default_runs.md`). The captioner then starts from the trained encoder and head
of the pretraining epoch with the lowest validation word loss.

Resuming loses at most one epoch: the tagger has its own backup while it trains, and its weights are
kept once it has finished until the captioner's own backup takes over.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import keras
import tensorflow as tf

from keras_models.concepts import ConceptTagger
from pipelines.dataset import EpochOrder

PRETRAINED_WEIGHTS = "concepts_pretrained.weights.h5"
VALIDATION_IMAGES = 256  # enough to see the word loss turn; the full synthetic valid split would add ~30 s a run


def _epochs_logged(out_dir: Path) -> int:
    """Pretraining epochs that `concept_history.csv` records (one row each after the header)."""
    log = out_dir / "concept_history.csv"
    return max(0, len(log.read_text().splitlines()) - 1) if log.is_file() else 0


def pretrain_concepts(model, train_ds: tf.data.Dataset, valid_ds: tf.data.Dataset, epochs: int,
                      schedule: keras.optimizers.schedules.LearningRateSchedule, out_dir: Path, data_epoch: tf.Variable,
                      strategy: tf.distribute.Strategy, callbacks: list | None = None) -> dict:
    """Fit `model`'s image path and concept head for `epochs` on the captions' words; return what happened.

    `train_ds` and `valid_ds` yield the `{"images", "captions"}` batches the captioner trains and validates
    on (tokenized here by its preprocessor; `pipelines.training` validates on the first `VALIDATION_IMAGES`
    images); `schedule` is the learning rate over its `epochs`. It stops once the validation word loss
    has not fallen for two epochs and keeps the best epoch's weights, a guard against an encoder pretrained
    into overfitting (on the synthetic set and the ROCO sample the loss falls epoch after epoch; with one
    epoch's patience a single noisy rise at a learning rate of 2e-3 had ended GIT small's pretraining after 5
    epochs where 8 fitted). Skipped when `out_dir` already holds the
    captioner's backup (a resumed run restores those weights); reloaded from `out_dir` when an earlier
    attempt finished it. `callbacks` join the fit (`pipelines.training.TimeBudget` stops it on a machine
    too slow for the model's budget).
    """
    weights = out_dir / PRETRAINED_WEIGHTS
    if (out_dir / "backup").exists():
        return {"epochs": _epochs_logged(out_dir), "seconds": 0.0, "status": "restored with the captioner's backup"}
    if weights.is_file():
        model.load_weights(weights)
        return {"epochs": _epochs_logged(out_dir), "seconds": 0.0, "status": f"loaded from {weights.name}"}
    with strategy.scope():
        tagger = ConceptTagger(model.backbone, name="concept_tagger")
        tagger.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=1e-4, clipnorm=1.0))

    def inputs(ds: tf.data.Dataset) -> tf.data.Dataset:
        return ds.map(lambda batch: (model.preprocessor(batch)[0],), num_parallel_calls=tf.data.AUTOTUNE)

    best = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    print(f"concept pretraining: {epochs} epochs of the image encoder and concept head alone (no decoder)")
    start = time.perf_counter()
    history = tagger.fit(
        inputs(train_ds),
        validation_data=inputs(valid_ds),
        epochs=epochs,
        verbose=2,
        shuffle=False,  # the dataset shuffles itself; Keras would warn that it ignores shuffle=True
        callbacks=[
            keras.callbacks.BackupAndRestore(str(out_dir / "backup_concepts")),
            keras.callbacks.CSVLogger(str(out_dir / "concept_history.csv"), append=True),
            EpochOrder(data_epoch),
            best,
            *(callbacks or []),
        ],
    )
    seconds = time.perf_counter() - start
    partial = weights.with_name("partial." + weights.name)  # atomically: a kill may land while it is written
    model.save_weights(partial)
    os.replace(partial, weights)
    done = history.epoch[-1] + 1 if history.epoch else 0  # a resumed fit numbers its epochs from where it resumed
    kept = best.best_epoch + 1 if history.epoch else 0
    print(f"concept pretraining: {done} epochs, {seconds / 60:.1f} min; keeping epoch {kept} "
          f"(validation word loss {best.best:.3f})")
    cut = any(getattr(callback, "stopped_early", False) for callback in callbacks or [])
    return {"epochs": done, "best_epoch": kept, "seconds": round(seconds, 1), "status": "trained",
            "stopped_by_time_budget": cut,
            **({"val_word_loss": round(float(best.best), 4)} if history.epoch else {})}
