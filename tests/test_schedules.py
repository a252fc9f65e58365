"""The learning-rate schedule that a time budget can shorten while training runs (`keras_models/schedules.py`)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from keras_models.cnn_gru import build_cnn_gru_captioner
from keras_models.schedules import WarmupCosine
from pipelines.text import build_vocabulary, make_tokenizer
from pipelines.training import warmup_cosine


def rate(schedule: WarmupCosine, step: int) -> float:
    return float(ops.convert_to_numpy(schedule(step)))


def test_warms_up_then_decays_to_the_floor_at_the_end_of_the_planned_epochs():
    schedule = warmup_cosine(1e-3, epochs=4, steps=100)  # warm-up: one epoch, at most 200 steps
    assert rate(schedule, 0) == pytest.approx(1e-4)
    assert rate(schedule, 50) == pytest.approx(1e-4 + 0.5 * 9e-4)
    assert rate(schedule, 100) == pytest.approx(1e-3)
    decay = [rate(schedule, s) for s in range(100, 401, 50)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly falling after the warm-up
    assert rate(schedule, 400) == pytest.approx(5e-5)  # 5% at the end of epoch 4 ...
    assert rate(schedule, 1000) == pytest.approx(5e-5)  # ... and flat after it


def test_a_shorter_plan_reaches_the_floor_earlier_also_in_an_already_traced_step():
    schedule = warmup_cosine(1e-3, epochs=4, steps=100)
    traced = tf.function(lambda step: schedule(step))
    at_epoch_2 = float(traced(tf.constant(200)))
    assert at_epoch_2 > 0.5e-3
    schedule.plan_epochs(2)
    assert schedule.planned_epochs == 2
    assert float(traced(tf.constant(200))) == pytest.approx(5e-5)  # the same graph reads the new plan
    assert float(traced(tf.constant(150))) < at_epoch_2
    schedule.plan_epochs(0)  # never shorter than one epoch
    assert schedule.planned_epochs == 1


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="epochs > 0"):
        WarmupCosine(1e-3, epochs=0, steps_per_epoch=10)


def test_the_current_plan_travels_with_a_saved_captioner(tmp_path):
    tokenizer = make_tokenizer(build_vocabulary(["ct chest left nodule", "mri brain right mass"], 100))
    model = build_cnn_gru_captioner("tiny", tokenizer)
    schedule = warmup_cosine(1e-3, epochs=5, steps=10)
    model.compile(optimizer=keras.optimizers.AdamW(schedule))
    schedule.plan_epochs(3)
    clone = WarmupCosine.from_config(schedule.get_config())
    assert [rate(clone, s) for s in (0, 15, 30)] == [rate(schedule, s) for s in (0, 15, 30)]

    images = np.zeros((2, 32, 32, 1), "float32")
    model.fit({"images": images, "captions": ["ct chest left nodule", "mri brain right mass"]}, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    saved = loaded.optimizer.get_config()["learning_rate"]
    assert saved["class_name"] == "WarmupCosine" and saved["config"]["epochs"] == 3
