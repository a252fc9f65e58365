"""medcap's captioning models in Keras 3 (backend-agnostic: keras.ops only).

Importing the package registers every medcap layer, so `keras.saving.load_model`
reads any `.keras` file that medcap wrote.
"""

from keras_models.captioner import ImageCaptioner, get_sampler
from keras_models.preprocessor import DEFAULT_IMAGE_CONFIG, CaptionPreprocessor
from keras_models import cnn_gru, git  # noqa: E402,F401  (registers the model classes)
from keras_models.registry import MODELS, build_captioner, presets
from keras_models.schedules import WarmupCosine

__all__ = [
    "CaptionPreprocessor",
    "DEFAULT_IMAGE_CONFIG",
    "ImageCaptioner",
    "MODELS",
    "WarmupCosine",
    "build_captioner",
    "get_sampler",
    "presets",
]
