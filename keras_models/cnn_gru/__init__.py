"""The CNN + attention-GRU captioner (Show, Attend and Tell) in Keras 3."""

from __future__ import annotations

import copy

import keras

from keras_models.cnn_gru.cnn_gru_backbone import CNNGRUBackbone
from keras_models.cnn_gru.cnn_gru_captioner import CNNGRUCaptioner
from keras_models.cnn_gru.presets import PRESETS
from keras_models.preprocessor import CaptionPreprocessor

__all__ = ["CNNGRUBackbone", "CNNGRUCaptioner", "PRESETS", "build_cnn_gru_captioner"]


def build_cnn_gru_captioner(preset: str, tokenizer, sequence_length: int | None = None, **overrides) -> CNNGRUCaptioner:
    """A compiled captioner from a preset; `overrides` replace backbone kwargs, `image_config` entries merge."""
    if preset not in PRESETS:
        raise ValueError(f"Unknown CNN-GRU preset {preset!r}; choose one of {sorted(PRESETS)}.")
    config = copy.deepcopy(PRESETS[preset])
    image_config = {**config["image_config"], **overrides.pop("image_config", {})}
    backbone = CNNGRUBackbone(
        vocabulary_size=tokenizer.vocabulary_size(),
        image_size=image_config["image_size"],
        channels=image_config["channels"],
        **{**config["backbone"], **overrides},
    )
    preprocessor = CaptionPreprocessor(tokenizer, sequence_length or config["sequence_length"], image_config)
    captioner = CNNGRUCaptioner(backbone=backbone, preprocessor=preprocessor)
    captioner.compile(optimizer=keras.optimizers.Adam(config["train"]["learning_rate"], global_clipnorm=5.0))
    return captioner
