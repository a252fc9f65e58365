"""Build either captioner by name: the one place that knows both model families."""

from __future__ import annotations

MODELS = ("cnn_gru", "git")


def presets(model: str) -> dict:
    """The preset table of a model family."""
    if model == "cnn_gru":
        from keras_models.cnn_gru import PRESETS
    elif model == "git":
        from keras_models.git import PRESETS
    else:
        raise ValueError(f"Unknown model {model!r}; choose one of {MODELS}.")
    return PRESETS


def build_captioner(model: str, preset: str, tokenizer, sequence_length: int | None = None, **overrides):
    """A compiled captioner of family `model` ('cnn_gru' | 'git') from a preset name."""
    table = presets(model)
    if preset not in table:
        raise ValueError(f"Unknown {model} preset {preset!r}; choose one of {sorted(table)}.")
    if model == "cnn_gru":
        from keras_models.cnn_gru import build_cnn_gru_captioner as build
    else:
        from keras_models.git import build_git_captioner as build
    return build(preset, tokenizer, sequence_length=sequence_length, **overrides)
