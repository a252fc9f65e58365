"""GIT's functional backbone: CLIP ViT tokens and text embeddings through one BERT-style decoder."""

from __future__ import annotations

import keras
import keras_hub
from keras import ops

from keras_models.concepts import ConceptHead, check_concept_options
from keras_models.git.git_vision_encoder import GitVisionEncoder, get_activation
from keras_models.image_stem import FreezableImageStem


def _init():
    return keras.initializers.RandomNormal(stddev=0.02)


@keras.saving.register_keras_serializable(package="medcap")
class GitAttentionMask(keras.layers.Layer):
    """GIT's `[B, N+T, N+T]` mask over [image tokens; text tokens].

    Image rows see every image token and no text; text rows see every image
    token and the text up to and including themselves; padded text keys are hidden.
    """

    def __init__(self, num_image_tokens: int, **kwargs):
        super().__init__(**kwargs)
        self.num_image_tokens = num_image_tokens

    def call(self, padding_mask):
        n = self.num_image_tokens
        positions = ops.arange(n + ops.shape(padding_mask)[1]) - n  # text positions; negative for image tokens
        is_text = positions >= 0
        causal = ops.less_equal(positions[None, :], positions[:, None])
        allowed = ops.logical_or(ops.logical_not(is_text)[None, :], ops.logical_and(is_text[:, None], causal))
        keys = ops.pad(ops.cast(padding_mask, "int32"), [[0, 0], [n, 0]], constant_values=1)
        return ops.logical_and(allowed[None], ops.cast(keys, "bool")[:, None, :])

    def get_config(self) -> dict:
        return {**super().get_config(), "num_image_tokens": self.num_image_tokens}


@keras.saving.register_keras_serializable(package="medcap")
class GitBackbone(FreezableImageStem, keras_hub.models.Backbone):
    """GIT (Generative Image-to-text Transformer) without its LM head.

    ViT tokens -> Linear + LayerNorm projection; text -> word + learned position
    embeddings (text positions only) + LayerNorm; [image; text] -> BERT post-LN
    decoder layers under `GitAttentionMask`. Inputs `{"images", "token_ids",
    "padding_mask"}`; outputs `{"sequence_output"}`: hidden states of the text positions
    `[B, T, hidden_dim]`, plus `"concept_logits"` `[B, vocab]` with a concept head.

    `vision_*` arguments size the ViT (Hugging Face's `vision_config`), the
    others the text decoder; activations take Hugging Face names
    ("quick_gelu", "gelu" = exact erf gelu). `dropout` applies to the text side
    only (CLIP has none). `max_sequence_length` is the number of learned text positions.
    `vision_stem="conv"` replaces the patch convolution by a convolutional stem
    for training from scratch (see `conv_stem`, deepened by `vision_stem_extra_convs`); checkpoints use "patch".
    `concept_loss_weight` > 0 appends one image token from a `ConceptHead` (`keras_models.concepts`),
    trained to predict the caption's words; checkpoints have none, so imported models match GIT exactly.
    `concept_word_bias` also adds the head's gated word bias to the next-token logits (`GitCaptioner`);
    `concept_quadrants` lets the head also pool each quadrant of the image-token grid.
    `image_stem_frozen` freezes the conv stem (`FreezableImageStem`; set by `freeze_image_stem()`).
    """

    def __init__(
        self,
        vocabulary_size: int,
        image_size: int,
        patch_size: int,
        vision_hidden_dim: int,
        vision_num_layers: int,
        vision_num_heads: int,
        vision_intermediate_dim: int,
        hidden_dim: int,
        num_layers: int,
        num_heads: int,
        intermediate_dim: int,
        max_sequence_length: int = 1024,
        num_channels: int = 3,
        vision_activation: str = "quick_gelu",
        activation: str = "gelu",
        vision_layer_norm_epsilon: float = 1e-5,
        layer_norm_epsilon: float = 1e-12,
        dropout: float = 0.1,
        vision_stem: str = "patch",
        vision_stem_extra_convs: int = 0,
        concept_loss_weight: float = 0.0,
        concept_word_bias: bool = False,
        concept_quadrants: bool = False,
        image_stem_frozen: bool = False,
        dtype=None,
        **kwargs,
    ):
        check_concept_options(concept_loss_weight, concept_word_bias=concept_word_bias,
                              concept_quadrants=concept_quadrants)
        # === Layers ===
        self.vision_encoder = GitVisionEncoder(
            image_size,
            patch_size,
            vision_hidden_dim,
            vision_num_layers,
            vision_num_heads,
            vision_intermediate_dim,
            activation=vision_activation,
            layer_norm_epsilon=vision_layer_norm_epsilon,
            stem=vision_stem,
            stem_extra_convs=vision_stem_extra_convs,
            dtype=dtype,
            name="vision_encoder",
        )
        self.image_projection = keras.layers.Dense(
            hidden_dim, kernel_initializer=_init(), dtype=dtype, name="image_projection"
        )
        self.image_projection_norm = keras.layers.LayerNormalization(
            epsilon=vision_layer_norm_epsilon, dtype=dtype, name="image_projection_norm"
        )
        self.token_embedding = keras.layers.Embedding(
            vocabulary_size, hidden_dim, embeddings_initializer=_init(), dtype=dtype, name="token_embedding"
        )
        self.position_embedding = keras_hub.layers.PositionEmbedding(
            max_sequence_length, initializer=_init(), dtype=dtype, name="position_embedding"
        )
        self.text_embedding_norm = keras.layers.LayerNormalization(
            epsilon=layer_norm_epsilon, dtype=dtype, name="text_embedding_norm"
        )
        self.text_embedding_dropout = keras.layers.Dropout(dropout, dtype=dtype, name="text_embedding_dropout")
        self.concept_head = (
            ConceptHead(vocabulary_size, hidden_dim, concept_loss_weight, gate_dim=hidden_dim if concept_word_bias else 0,
                        grid=(image_size // patch_size,) * 2 if concept_quadrants else None,
                        dtype=dtype, name="concept_head")
            if concept_loss_weight else None
        )
        self.num_image_tokens = self.vision_encoder.num_tokens + (1 if self.concept_head else 0)
        self.attention_mask = GitAttentionMask(self.num_image_tokens, dtype=dtype, name="attention_mask")
        self.transformer_layers = [
            keras_hub.layers.TransformerDecoder(
                intermediate_dim,
                num_heads,
                dropout=dropout,
                activation=get_activation(activation),
                layer_norm_epsilon=layer_norm_epsilon,
                kernel_initializer=_init(),
                dtype=dtype,
                name=f"transformer_layer_{i}",
            )
            for i in range(num_layers)
        ]

        # === Functional model ===
        images = keras.Input((image_size, image_size, num_channels), name="images")
        token_ids = keras.Input((None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input((None,), dtype="int32", name="padding_mask")
        image_tokens, concept_logits = self.encode_images(images, token_ids, padding_mask, return_concept_logits=True)
        x = ops.concatenate([image_tokens, self.embed_text(token_ids)], axis=1)
        mask = self.attention_mask(padding_mask)
        for layer in self.transformer_layers:
            x = layer(x, decoder_attention_mask=mask, use_causal_mask=False)
        outputs = {"sequence_output": x[:, self.num_image_tokens :, :]}
        if self.concept_head is not None:
            outputs["concept_logits"] = concept_logits
        super().__init__(
            inputs={"images": images, "token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.image_size = image_size
        self.patch_size = patch_size
        self.vision_hidden_dim = vision_hidden_dim
        self.vision_num_layers = vision_num_layers
        self.vision_num_heads = vision_num_heads
        self.vision_intermediate_dim = vision_intermediate_dim
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_dim = intermediate_dim
        self.max_sequence_length = max_sequence_length
        self.num_channels = num_channels
        self.vision_activation = vision_activation
        self.activation = activation
        self.vision_layer_norm_epsilon = vision_layer_norm_epsilon
        self.layer_norm_epsilon = layer_norm_epsilon
        self.dropout = dropout
        self.vision_stem, self.vision_stem_extra_convs = vision_stem, vision_stem_extra_convs
        self.concept_loss_weight, self.concept_word_bias = concept_loss_weight, concept_word_bias
        self.concept_quadrants = concept_quadrants
        if image_stem_frozen:
            self.freeze_image_stem()

    def encode_images(self, images, token_ids=None, padding_mask=None, return_concept_logits=False):
        """Images `[B, H, W, C]` -> projected image tokens `[B, N, hidden_dim]` (the concept token last).

        `token_ids` and `padding_mask` are the captions the concept head learns from in training.
        With `return_concept_logits`: (tokens, the concept head's word logits `[B, vocab]` or None).
        """
        tokens = self.concept_features(images)
        concept_logits = None
        if self.concept_head is not None:
            concepts, concept_logits = self.concept_head(tokens, token_ids, padding_mask, return_logits=True)
            tokens = ops.concatenate([tokens, ops.expand_dims(concepts, 1)], axis=1)
        return (tokens, concept_logits) if return_concept_logits else tokens

    def concept_features(self, images):
        """Projected image tokens `[B, N, hidden_dim]` without the concept token: what the concept head reads."""
        return self.image_projection_norm(self.image_projection(self.vision_encoder(images)))

    def concept_feature_layers(self) -> list:
        """The layers `concept_features` runs (what concept pretraining trains, with the head)."""
        return [self.vision_encoder, self.image_projection, self.image_projection_norm]

    def image_stem_layers(self) -> list:
        """The vision encoder's convolutional stem (`vision_stem="conv"`); [] with CLIP's patch convolution.

        With `--freeze-stem`, `pipelines.training` freezes it after concept pretraining and trains the transformer
        layers above it, as the `small` preset does (after 7-8 pretraining epochs on 8,000 images, or 4-8 on 16,000,
        the stem has learned its part).
        """
        return [self.vision_encoder.embedding.patch_embedding] if self.vision_stem == "conv" else []

    def embed_text(self, token_ids, start_index=0):
        """Token ids `[B, T]` at text positions `start_index...` -> normalised embeddings `[B, T, hidden_dim]`."""
        x = self.token_embedding(token_ids)
        x = x + self.position_embedding(x, start_index=start_index)
        return self.text_embedding_dropout(self.text_embedding_norm(x))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size,
            image_size=self.image_size,
            patch_size=self.patch_size,
            vision_hidden_dim=self.vision_hidden_dim,
            vision_num_layers=self.vision_num_layers,
            vision_num_heads=self.vision_num_heads,
            vision_intermediate_dim=self.vision_intermediate_dim,
            hidden_dim=self.hidden_dim,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_dim=self.intermediate_dim,
            max_sequence_length=self.max_sequence_length,
            num_channels=self.num_channels,
            vision_activation=self.vision_activation,
            activation=self.activation,
            vision_layer_norm_epsilon=self.vision_layer_norm_epsilon,
            layer_norm_epsilon=self.layer_norm_epsilon,
            dropout=self.dropout,
            vision_stem=self.vision_stem,
            vision_stem_extra_convs=self.vision_stem_extra_convs,
            concept_loss_weight=self.concept_loss_weight,
            concept_word_bias=self.concept_word_bias,
            concept_quadrants=self.concept_quadrants,
            image_stem_frozen=self.image_stem_frozen,
        )
        return config
