"""medcap's captioning models in Keras 3 (backend-agnostic: keras.ops only)."""

from keras_models.captioner import ImageCaptioner, get_sampler
from keras_models.preprocessor import DEFAULT_IMAGE_CONFIG, CaptionPreprocessor
