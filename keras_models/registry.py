"""Build either captioner by name: the one place that knows both model families."""

from __future__ import annotations

import inspect

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


def _backbone_class(model: str) -> type:
    """The backbone class of family `model`."""
    if model == "cnn_gru":
        from keras_models.cnn_gru import CNNGRUBackbone as backbone
    elif model == "git":
        from keras_models.git import GitBackbone as backbone
    else:
        raise ValueError(f"Unknown model {model!r}; choose one of {MODELS}.")
    return backbone


def backbone_arguments(model: str) -> list[str]:
    """The backbone settings a preset (or `build_captioner`'s overrides) may set for family `model`.

    The vocabulary size, image size and channels are not among them: the tokenizer and `image_config` give those;
    nor is `image_stem_frozen`, which `--freeze-stem` sets after concept pretraining.
    """
    given = {"self", "vocabulary_size", "image_size", "channels", "num_channels", "image_stem_frozen", "dtype"}
    return [name for name, parameter in inspect.signature(_backbone_class(model).__init__).parameters.items()
            if name not in given and parameter.kind is parameter.POSITIONAL_OR_KEYWORD]


def backbone_values(model: str, preset: str) -> dict:
    """The backbone settings family `model`'s `preset` builds with: the backbone's defaults, then the preset's."""
    parameters = inspect.signature(_backbone_class(model).__init__).parameters
    values = {name: parameters[name].default for name in backbone_arguments(model)
              if parameters[name].default is not inspect.Parameter.empty}
    return {**values, **presets(model).get(preset, {}).get("backbone", {})}


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
