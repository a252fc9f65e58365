"""CNN image encoders that keep the spatial feature map: images [B, S, S, C] -> features [B, h*w, D].

`"compact"` is a small conv net that trains from scratch on CPU; `"densenet121"` and
`"efficientnetb0"` are `keras.applications` networks built with `weights=None` or loaded
from a local weights file (never downloaded). The applications take 3 channels: a
1-channel (greyscale) input is repeated to 3 channels inside the encoder, so the image
function stays greyscale and 3-channel ImageNet weights still load.
"""

from __future__ import annotations

import os

import keras
import keras_hub
from keras import layers, ops

APPLICATIONS = {
    "densenet121": keras.applications.DenseNet121,
    "efficientnetb0": keras.applications.EfficientNetB0,
}
ENCODERS = ("compact", *APPLICATIONS)


def compact_cnn(image_size: int, channels: int, filters: tuple[int, ...]) -> keras.Model:
    """Conv blocks (3x3 stride 2, then 3x3 stride 1; BatchNorm + ReLU each): side / 2**len(filters)."""
    inputs = keras.Input((image_size, image_size, channels))
    x = inputs
    for block, width in enumerate(filters, start=1):
        for conv, stride in enumerate((2, 1), start=1):
            prefix = f"block{block}_conv{conv}"
            x = layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, name=prefix)(x)
            x = layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn")(x)
            x = layers.ReLU(name=f"{prefix}_relu")(x)
    return keras.Model(inputs, x, name="compact_cnn")


def check_weights_path(path: str | None) -> None:
    """Raise a clear error unless `path` is None or an existing local weights file."""
    if path is None:
        return
    if path == "imagenet":
        raise ValueError("encoder_weights='imagenet' would download; pass a local weights file path or None.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"encoder_weights file not found: {path!r} (pass a local weights file or None).")


def build_cnn(encoder: str, image_size: int, channels: int, filters, weights: str | None = None) -> keras.Model:
    """The named CNN without pooling or top, with weights from `weights` (a local file) if given."""
    check_weights_path(weights)
    if encoder == "compact":
        cnn = compact_cnn(image_size, channels, tuple(filters))
        if weights is not None:
            cnn.load_weights(weights)
        return cnn
    if encoder not in APPLICATIONS:
        raise ValueError(f"Unknown encoder {encoder!r}; choose one of {ENCODERS}.")
    return APPLICATIONS[encoder](include_top=False, weights=weights, input_shape=(image_size, image_size, 3))


@keras.saving.register_keras_serializable(package="medcap")
class ImageEncoder(keras.layers.Layer):
    """CNN feature map -> Dense projection + learned position embedding: [B, h*w, feature_dim].

    The position embedding tells the decoder where each cell is, so left and right
    stay distinguishable after attention pools the map. `train_encoder=False`
    freezes the CNN (its BatchNorm then runs in inference mode).
    """

    def __init__(
        self,
        encoder: str = "compact",
        image_size: int = 128,
        channels: int = 1,
        filters=(32, 64, 128, 256),
        feature_dim: int = 256,
        encoder_weights: str | None = None,
        train_encoder: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.encoder, self.image_size, self.channels = encoder, image_size, channels
        self.filters, self.feature_dim = tuple(filters), feature_dim
        self.encoder_weights, self.train_encoder = encoder_weights, train_encoder
        self.cnn = build_cnn(encoder, image_size, channels, self.filters, encoder_weights)
        self.cnn.trainable = train_encoder
        _, height, width, self.cnn_channels = self.cnn.output_shape
        self.grid = (height, width)
        self.projection = layers.Dense(feature_dim, name="projection", dtype=self.dtype_policy)
        self.position_embedding = keras_hub.layers.PositionEmbedding(
            height * width, name="position_embedding", dtype=self.dtype_policy
        )
        self.mixer = layers.Dense(feature_dim, name="position_mixer", dtype=self.dtype_policy)

    def build(self, input_shape):
        self.projection.build((None, self.grid[0] * self.grid[1], self.cnn_channels))
        self.position_embedding.build((None, self.grid[0] * self.grid[1], self.feature_dim))
        self.mixer.build((None, self.grid[0] * self.grid[1], self.feature_dim))
        self.built = True

    def call(self, images, training=None):
        if self.channels == 1 and self.cnn.input_shape[-1] == 3:
            images = ops.repeat(images, 3, axis=-1)
        x = self.cnn(images, training=training)
        x = self.projection(ops.reshape(x, (-1, self.grid[0] * self.grid[1], self.cnn_channels)))
        return self.mixer(ops.relu(x + self.position_embedding(x)))

    def stem_layers(self) -> list:
        """The compact CNN's convolution blocks, all of them; [] for the applications."""
        if self.encoder != "compact":
            return []
        blocks = tuple(f"block{i}_" for i in range(1, len(self.filters) + 1))
        return [layer for layer in self.cnn.layers if layer.name.startswith(blocks)]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.grid[0] * self.grid[1], self.feature_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            encoder=self.encoder,
            image_size=self.image_size,
            channels=self.channels,
            filters=list(self.filters),
            feature_dim=self.feature_dim,
            # The trained weights travel with the saved model, not with this path.
            encoder_weights=None,
            train_encoder=self.train_encoder,
        )
        return config
