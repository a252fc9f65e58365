"""GIT (Generative Image-to-text Transformer) in Keras 3, with a Hugging Face weight converter."""

from keras_models.git.git_backbone import GitBackbone
from keras_models.git.git_causal_lm import GitCaptioner, build_git_captioner
from keras_models.git.git_presets import CLIP_IMAGE_CONFIG, PRESETS

__all__ = ["GitBackbone", "GitCaptioner", "PRESETS", "CLIP_IMAGE_CONFIG", "build_git_captioner"]
