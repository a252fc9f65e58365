"""GIT's image encoder: a CLIP ViT that returns every token (class token + patches), nothing pooled."""

from __future__ import annotations

import keras
import keras_hub
from keras import ops


@keras.saving.register_keras_serializable(package="medcap")
def quick_gelu(x):
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * ops.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": keras.activations.gelu}  # Hugging Face names; gelu is exact (erf)


def get_activation(name: str):
    """The activation function for a Hugging Face `hidden_act` name."""
    if name not in ACTIVATIONS:
        raise ValueError(f"Unsupported activation {name!r}; GIT uses one of {sorted(ACTIVATIONS)}.")
    return ACTIVATIONS[name]


def conv_stem(patch_size: int, hidden_dim: int, extra_convs: int = 0, dtype=None) -> keras.Sequential:
    """A convolutional stem (Xiao et al. 2021, "Early convolutions help transformers see better").

    log2(patch_size) 3x3 stride-2 convolutions with batch norm and ReLU, then a 1x1
    projection: the same token grid as a patch convolution, but it trains far
    faster from scratch on small data. Imported CLIP checkpoints keep the patch conv.
    `extra_convs` adds a 3x3 stride-1 convolution (batch norm, ReLU) after each of the last
    that many stride-2 ones: more depth where the map is small and a convolution cheap.
    Batch norm momentum is 0.9, as in the CNN-GRU's compact CNN: with Keras's 0.99 the moving statistics
    still lagged after a 250-step epoch, and validation read a word loss of 39.1 where the same weights gave 23.4.
    """
    steps = patch_size.bit_length() - 1
    if 2**steps != patch_size:
        raise ValueError(f"The conv stem needs a power-of-two patch size, got {patch_size}.")
    if not 0 <= extra_convs <= steps:
        raise ValueError(f"extra_convs must be between 0 and {steps} (the stem's stages), got {extra_convs}.")
    layers = []
    for i in range(steps):
        width = max(16, hidden_dim // 2 ** (steps - 1 - i))
        for suffix, stride in [("", 2)] + ([("b", 1)] if i >= steps - extra_convs else []):
            layers += [
                keras.layers.Conv2D(width, 3, strides=stride, padding="same", use_bias=False, dtype=dtype,
                                    name=f"stem_conv_{i}{suffix}"),
                keras.layers.BatchNormalization(momentum=0.9, dtype=dtype, name=f"stem_norm_{i}{suffix}"),
                keras.layers.ReLU(dtype=dtype, name=f"stem_relu_{i}{suffix}"),
            ]
    layers.append(keras.layers.Conv2D(hidden_dim, 1, use_bias=False, dtype=dtype, name="stem_projection"))
    return keras.Sequential(layers, name="patch_embedding")


@keras.saving.register_keras_serializable(package="medcap")
class GitVisionEmbedding(keras.layers.Layer):
    """Patch convolution (no bias), a learned class token in front and learned positions added.

    `stem="patch"` is CLIP's (and every Hugging Face checkpoint's); `stem="conv"`
    swaps the patch convolution for `conv_stem` (with `stem_extra_convs`), for models trained from scratch.
    """

    def __init__(self, image_size: int, patch_size: int, hidden_dim: int, stem: str = "patch",
                 stem_extra_convs: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.image_size, self.patch_size, self.hidden_dim, self.stem = image_size, patch_size, hidden_dim, stem
        self.stem_extra_convs = stem_extra_convs
        if image_size % patch_size:
            raise ValueError(f"The image size ({image_size}) must be a multiple of the patch size ({patch_size}).")
        self.num_positions = (image_size // patch_size) ** 2 + 1
        if stem_extra_convs and stem != "conv":
            raise ValueError("stem_extra_convs needs stem='conv' (a patch convolution has no stages).")
        if stem == "conv":
            self.patch_embedding = conv_stem(patch_size, hidden_dim, stem_extra_convs, dtype=self.dtype_policy)
        elif stem == "patch":
            self.patch_embedding = keras.layers.Conv2D(
                hidden_dim,
                patch_size,
                strides=patch_size,
                padding="valid",
                use_bias=False,
                data_format="channels_last",
                dtype=self.dtype_policy,
                name="patch_embedding",
            )
        else:
            raise ValueError(f"Unknown stem {stem!r}: use 'patch' (CLIP) or 'conv'.")

    def build(self, input_shape):
        self.patch_embedding.build(input_shape)
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.class_embedding = self.add_weight(shape=(self.hidden_dim,), initializer=init, name="class_embedding")
        self.position_embedding = self.add_weight(
            shape=(self.num_positions, self.hidden_dim), initializer=init, name="position_embedding"
        )

    def call(self, images, training=None):
        patches = self.patch_embedding(images, training=training)  # [B, h, w, D], row-major like torch's flatten(2)
        patches = ops.reshape(patches, (ops.shape(patches)[0], -1, self.hidden_dim))
        cls = ops.broadcast_to(ops.cast(self.class_embedding, patches.dtype), (ops.shape(patches)[0], 1, self.hidden_dim))
        tokens = ops.concatenate([cls, patches], axis=1)
        return tokens + ops.cast(self.position_embedding, tokens.dtype)[None]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_positions, self.hidden_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(image_size=self.image_size, patch_size=self.patch_size, hidden_dim=self.hidden_dim, stem=self.stem,
                      stem_extra_convs=self.stem_extra_convs)
        return config


@keras.saving.register_keras_serializable(package="medcap")
class GitVisionEncoder(keras.layers.Layer):
    """CLIP ViT: embeddings -> pre-LayerNorm -> pre-LN transformer layers -> post-LayerNorm on all tokens.

    Input `[B, H, W, C]` (channels last), output `[B, (H/p)^2 + 1, hidden_dim]`.
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        activation: str = "quick_gelu",
        layer_norm_epsilon: float = 1e-5,
        stem: str = "patch",
        stem_extra_convs: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.stem, self.stem_extra_convs = stem, stem_extra_convs
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.num_layers, self.num_heads, self.intermediate_dim = num_layers, num_heads, intermediate_dim
        self.activation, self.layer_norm_epsilon = activation, layer_norm_epsilon
        self.num_tokens = (image_size // patch_size) ** 2 + 1
        dtype = self.dtype_policy
        self.embedding = GitVisionEmbedding(image_size, patch_size, hidden_dim, stem, stem_extra_convs, dtype=dtype,
                                            name="embedding")
        self.pre_layer_norm = keras.layers.LayerNormalization(epsilon=layer_norm_epsilon, dtype=dtype, name="pre_layer_norm")
        self.encoder_layers = [
            keras_hub.layers.TransformerEncoder(
                intermediate_dim,
                num_heads,
                activation=get_activation(activation),
                layer_norm_epsilon=layer_norm_epsilon,
                normalize_first=True,
                kernel_initializer=keras.initializers.RandomNormal(stddev=0.02),
                dtype=dtype,
                name=f"encoder_layer_{i}",
            )
            for i in range(num_layers)
        ]
        self.post_layer_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="post_layer_norm"
        )

    def build(self, input_shape):
        self.embedding.build(input_shape)
        tokens_shape = (input_shape[0], self.num_tokens, self.hidden_dim)
        self.pre_layer_norm.build(tokens_shape)
        for layer in self.encoder_layers:
            layer.build(tokens_shape)
        self.post_layer_norm.build(tokens_shape)

    def call(self, images, training=None):
        x = self.pre_layer_norm(self.embedding(images, training=training))
        for layer in self.encoder_layers:
            x = layer(x, training=training)
        return self.post_layer_norm(x)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tokens, self.hidden_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            image_size=self.image_size,
            patch_size=self.patch_size,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            activation=self.activation,
            layer_norm_epsilon=self.layer_norm_epsilon,
            stem=self.stem,
            stem_extra_convs=self.stem_extra_convs,
        )
        return config
