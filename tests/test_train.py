"""`python pipelines/train.py` options: what the command line decides and what it leaves to the preset."""

from __future__ import annotations

import time

import keras

from keras_models.registry import presets
from pipelines.train import parse_args
from pipelines.training import TimeBudget


def test_augmentation_follows_the_flag_else_the_preset():
    assert parse_args([])[0].augment is None  # the preset decides
    assert parse_args(["--augment"])[0].augment is True
    assert parse_args(["--no-augment"])[0].augment is False
    # the CPU presets train a few epochs, where augmentation only slowed learning; the others keep it
    assert presets("cnn_gru")["small"]["train"]["augment"] is False
    assert presets("cnn_gru")["densenet121"]["train"].get("augment", True) is True


def test_time_budget_stops_only_an_epoch_that_would_overrun_and_reports_only_real_cuts():
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])

    def run(minutes: float, epochs: int, epoch_seconds: float | list[float]) -> tuple[bool, bool]:
        budget = TimeBudget(minutes)
        budget.set_model(model)
        budget.set_params({"epochs": epochs})
        model.stop_training = False
        budget.on_train_begin()
        for epoch in range(epochs):
            budget.on_epoch_begin(epoch)
            time.sleep(epoch_seconds[epoch] if isinstance(epoch_seconds, list) else epoch_seconds)
            budget.on_epoch_end(epoch)
            if model.stop_training:
                return True, budget.stopped_early
        return False, budget.stopped_early

    assert run(0.5 / 60, 3, 0.2) == (True, True)  # 0.5 s budget, 0.2 s epochs: the third would overrun
    assert run(0.5 / 60, 2, 0.2) == (False, False)  # the last planned epoch is not "stopped by the budget"
    assert run(0, 2, 0.0) == (False, False)  # 0 = no budget
    # The next epoch is expected to be as slow as the slowest after the first (which also traces):
    # after 0.4 + 0.3 + 0.05 s, a 0.3 s epoch would overrun 1 s, although the last one took 0.05 s.
    assert run(1 / 60, 4, [0.4, 0.3, 0.05, 0.05]) == (True, True)
    assert run(0.9 / 60, 8, [0.4] + [0.02] * 7) == (False, False)  # a slow first epoch (tracing) is not the estimate
