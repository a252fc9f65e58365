"""Caption text in and out of a captioner: teacher-forcing batches and detokenization."""

from __future__ import annotations

import re

import keras
import keras_hub
from keras_hub.src.utils.tensor_utils import preprocessing_function

# How images must be prepared for a model; read by `pipelines.images.preprocess_image`.
DEFAULT_IMAGE_CONFIG = {
    "image_size": 128,  # square side in pixels
    "channels": 1,  # 1 (greyscale) or 3
    "resize": "pad",  # "pad" (keep aspect, letterbox) | "stretch" | "center_crop" (CLIP)
    "interpolation": "bilinear",
    "mean": [0.5],  # per channel, after scaling to [0, 1]
    "std": [0.5],
}


# Detokenized WordPiece spaces out punctuation ("portable ap chest x - ray , pa view : 3 . 5 cm ( arrow ) .");
# these rewrites (RE2 and Python `re` alike) write it back as text: "x-ray, pa view: 3.5 cm (arrow)."
# A caption that starts with a word-continuation piece (an undertrained model's "##ay") loses the "##".
_TIDY = (
    (r"^##", ""),
    (r"(\d) \. (\d)", r"\1.\2"),
    (r" ([-/]) ", r"\1"),
    (r" ([.,:;!?)\]])", r"\1"),
    (r"([(\[]) ", r"\1"),
)


@keras.saving.register_keras_serializable(package="medcap")
class CaptionTokenizer(keras_hub.models.BertTokenizer):
    """keras-hub's BERT WordPiece tokenizer whose `detokenize` gives readable text (see `_TIDY`).

    Token ids are exactly BertTokenizer's; only the spacing of the detokenized text differs, in the
    graph (`tf.strings.regex_replace`, a standard op that TF Serving runs) and in Python alike.
    """

    def detokenize(self, inputs):
        return _tidy(super().detokenize(inputs))


def _tidy(text):
    """`_TIDY` applied to what keras-hub's `detokenize` returns: a str, a list of them, or a string tensor (graph)."""
    if isinstance(text, list):
        return [_tidy(t) for t in text]
    if isinstance(text, str):
        for pattern, rewrite in _TIDY:
            text = re.sub(pattern, rewrite, text)
        return text
    import tensorflow as tf  # a string tensor: keras-hub tokenizers run on TensorFlow whatever the backend

    for pattern, rewrite in _TIDY:
        text = tf.strings.regex_replace(text, pattern, rewrite)
    return text


@keras.saving.register_keras_serializable(package="medcap")
class CaptionPreprocessor(keras_hub.models.CausalLMPreprocessor):
    """Turns `{"images", "captions"}` into teacher-forcing batches and ids back into text.

    The tokenizer is a `CaptionTokenizer`, keras-hub's BERT WordPiece (BERT-uncased special
    tokens: [PAD], [UNK], [CLS] starts a caption, [SEP] ends it), so a BERT
    vocabulary from a Hugging Face GIT checkpoint stands in for our own.
    `image_config` says how `pipelines.images.preprocess_image` prepares pixels
    for this model; the preprocessor passes images through untouched.
    """

    def __init__(self, tokenizer, sequence_length: int = 48, image_config: dict | None = None, **kwargs):
        super().__init__(tokenizer=tokenizer, sequence_length=sequence_length, **kwargs)
        self.image_config = dict(DEFAULT_IMAGE_CONFIG, **(image_config or {}))

    @preprocessing_function
    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        """`{"images", "captions"}` -> (`{"images", "token_ids", "padding_mask"}`, next ids, mask)."""
        if not self.built:
            self.build(None)
        sequence_length = sequence_length or self.sequence_length
        token_ids, padding_mask = self.packer(
            self.tokenizer(x["captions"]),
            sequence_length=sequence_length + 1,
            add_start_value=True,
            add_end_value=True,
        )
        inputs = {
            "images": x["images"],
            "token_ids": token_ids[..., :-1],
            "padding_mask": padding_mask[..., :-1],
        }
        return keras.utils.pack_x_y_sample_weight(inputs, token_ids[..., 1:], padding_mask[..., 1:])

    def generate_preprocess(self, x, sequence_length=None):
        """`{"images"}` -> model inputs whose prompt is one [CLS] per image (backend tensors)."""
        images = x["images"]
        length = sequence_length or self.sequence_length
        shape = (keras.ops.shape(images)[0], length)
        first = keras.ops.broadcast_to(keras.ops.arange(length) == 0, shape)
        token_ids = keras.ops.where(first, self.tokenizer.start_token_id, self.tokenizer.pad_token_id)
        return {"images": images, "token_ids": keras.ops.cast(token_ids, "int32"), "padding_mask": first}

    def get_config(self) -> dict:
        config = super().get_config()
        config["image_config"] = self.image_config
        return config
