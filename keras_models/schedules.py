"""A learning-rate schedule whose end can move while it runs: a linear warm-up, then cosine decay to a floor.

Training under a wall-clock budget (`pipelines.training.TimeBudget`) learns only once it runs how many
epochs fit. A cosine schedule planned for more epochs than then run stops with the rate still
high: the model is never annealed. Decaying to the floor by the end of the budget is what matters
("Budgeted training", Li, Yumer and Ramanan, ICLR 2020). `WarmupCosine.plan_epochs(n)` moves the end of
the decay to the end of epoch n; the rate then continues from where the new curve is at the current step.
"""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="medcap")
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """`warmup_start` x `learning_rate` rising linearly to `learning_rate` over `warmup_steps`, then cosine
    decay to `alpha` x `learning_rate` at the end of epoch `epochs` (and flat after it).

    `epochs` is held in a variable, so `plan_epochs` takes effect in an already traced training step. It is
    not an optimizer variable: a checkpoint restores the step count, not the plan.
    """

    def __init__(self, learning_rate: float, epochs: float, steps_per_epoch: int, warmup_steps: int = 0,
                 warmup_start: float = 0.1, alpha: float = 0.05):
        super().__init__()
        if epochs <= 0 or steps_per_epoch <= 0:
            raise ValueError(f"WarmupCosine needs epochs > 0 and steps_per_epoch > 0, got {epochs} and {steps_per_epoch}.")
        self.learning_rate, self.steps_per_epoch = float(learning_rate), int(steps_per_epoch)
        self.warmup_steps, self.warmup_start, self.alpha = int(warmup_steps), float(warmup_start), float(alpha)
        self.epochs = keras.Variable(float(epochs), dtype="float32", trainable=False, name="planned_epochs")

    @property
    def planned_epochs(self) -> float:
        return float(ops.convert_to_numpy(self.epochs))

    def plan_epochs(self, epochs: float) -> None:
        """End the decay at the end of epoch `epochs` (counted from the schedule's first step)."""
        self.epochs.assign(float(max(epochs, 1)))

    def __call__(self, step):
        step = ops.cast(step, "float32")
        peak, warmup = self.learning_rate, float(self.warmup_steps)
        warming = peak * (self.warmup_start + (1.0 - self.warmup_start) * step / max(warmup, 1.0))
        decay_steps = ops.maximum(self.epochs * self.steps_per_epoch - warmup, 1.0)
        progress = ops.clip((step - warmup) / decay_steps, 0.0, 1.0)
        cosine = peak * (self.alpha + (1.0 - self.alpha) * 0.5 * (1.0 + ops.cos(math.pi * progress)))
        return ops.where(step < warmup, warming, cosine)

    def get_config(self) -> dict:
        return {"learning_rate": self.learning_rate, "epochs": self.planned_epochs,
                "steps_per_epoch": self.steps_per_epoch, "warmup_steps": self.warmup_steps,
                "warmup_start": self.warmup_start, "alpha": self.alpha}
