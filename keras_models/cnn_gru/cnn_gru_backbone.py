"""The CNN + attention-GRU network as a functional keras-hub Backbone."""

from __future__ import annotations

import keras
import keras_hub

from keras_models.cnn_gru.attention_decoder import AttentionGRUDecoder
from keras_models.concepts import ConceptHead, check_concept_options
from keras_models.cnn_gru.encoders import ImageEncoder
from keras_models.image_stem import FreezableImageStem


@keras.saving.register_keras_serializable(package="medcap")
class CNNGRUBackbone(FreezableImageStem, keras_hub.models.Backbone):
    """`{"images", "token_ids", "padding_mask"}` -> deep-output features [B, T, embedding_dim].

    Layers: `image_encoder` (CNN feature map [B, h*w, feature_dim]), `token_embedding`
    (an untied `ReversibleEmbedding`: `token_embedding(x, reverse=True)` gives logits) and
    `decoder` (attention GRU). `encoder_weights` (a local file) is read when the backbone
    is first built; `get_config` drops it because the trained weights are saved with the model.
    `concept_loss_weight` > 0 adds a `concept_head` (`keras_models.concepts`) that the decoder reads;
    `concept_word_bias` also adds its gated word bias to the next-token logits (`next_token_logits`);
    `concept_quadrants` lets the head also pool each quadrant of the feature map (where and how large).
    `image_stem_frozen` freezes the compact CNN (`FreezableImageStem`; set by `freeze_image_stem()`).
    Outputs `{"sequence_output": [B, T, embedding_dim]}`, plus `"concept_logits"` `[B, vocab]` with a concept head.
    """

    def __init__(
        self,
        vocabulary_size: int,
        image_size: int = 128,
        channels: int = 1,
        encoder: str = "compact",
        encoder_filters=(32, 64, 128, 256),
        encoder_weights: str | None = None,
        train_encoder: bool = True,
        feature_dim: int = 256,
        embedding_dim: int = 128,
        hidden_dim: int = 256,
        attention_dim: int = 256,
        dropout: float = 0.1,
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
        self.image_encoder = ImageEncoder(
            encoder=encoder,
            image_size=image_size,
            channels=channels,
            filters=encoder_filters,
            feature_dim=feature_dim,
            encoder_weights=encoder_weights,
            train_encoder=train_encoder,
            name="image_encoder",
            dtype=dtype,
        )
        self.token_embedding = keras_hub.layers.ReversibleEmbedding(
            vocabulary_size, embedding_dim, tie_weights=False, name="token_embedding", dtype=dtype
        )
        self.concept_head = (
            ConceptHead(vocabulary_size, embedding_dim, concept_loss_weight,
                        gate_dim=embedding_dim if concept_word_bias else 0,
                        grid=self.image_encoder.grid if concept_quadrants else None, name="concept_head", dtype=dtype)
            if concept_loss_weight else None
        )
        self.decoder = AttentionGRUDecoder(hidden_dim, attention_dim, embedding_dim, dropout,
                                           concept_dim=embedding_dim if concept_loss_weight else 0,
                                           name="decoder", dtype=dtype)

        # === Functional model ===
        images = keras.Input((image_size, image_size, channels), name="images")
        token_ids = keras.Input((None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input((None,), dtype="bool", name="padding_mask")
        features = self.image_encoder(images)
        concepts, concept_logits = (
            self.concept_head(features, token_ids, padding_mask, return_logits=True) if self.concept_head else (None, None)
        )
        outputs, _, _ = self.decoder(self.token_embedding(token_ids), features, padding_mask, concepts)
        super().__init__(
            inputs={"images": images, "token_ids": token_ids, "padding_mask": padding_mask},
            outputs={"sequence_output": outputs, **({"concept_logits": concept_logits} if self.concept_head else {})},
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size, self.image_size, self.channels = vocabulary_size, image_size, channels
        self.encoder, self.encoder_filters = encoder, tuple(encoder_filters)
        self.train_encoder = train_encoder
        self.feature_dim, self.embedding_dim = feature_dim, embedding_dim
        self.hidden_dim, self.attention_dim, self.dropout = hidden_dim, attention_dim, dropout
        self.concept_loss_weight, self.concept_word_bias = concept_loss_weight, concept_word_bias
        self.concept_quadrants = concept_quadrants
        if image_stem_frozen:
            self.freeze_image_stem()

    def concept_features(self, images):
        """What the concept head reads: the image encoder's feature map `[B, h*w, feature_dim]`."""
        return self.image_encoder(images)

    def concept_feature_layers(self) -> list:
        """The layers `concept_features` runs (what concept pretraining trains, with the head)."""
        return [self.image_encoder]

    def image_stem_layers(self) -> list:
        """The compact CNN's convolution blocks; [] for keras.applications encoders.

        `pipelines.training` freezes them after concept pretraining (the projection and mixer above keep
        training): their backward pass is most of the encoder's cost in a captioner step, and after the 8-9
        pretraining epochs the small preset gets, training them further did not help the captions.
        """
        return self.image_encoder.stem_layers()

    def concepts(self, features):
        """(concept vector, word logits) for image features; (None, None) without a concept head."""
        return self.concept_head(features, return_logits=True) if self.concept_head else (None, None)

    def next_token_logits(self, sequence_output, concept_logits=None):
        """Logits `[B, T, vocab]` from decoder outputs, with the concept head's gated word bias if it has one."""
        logits = self.token_embedding(sequence_output, reverse=True)
        if self.concept_word_bias:
            logits = logits + self.concept_head.word_bias(sequence_output, concept_logits)
        return logits

    @property
    def feature_grid(self) -> tuple[int, int]:
        """(h, w) of the feature map the decoder attends over."""
        return self.image_encoder.grid

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            vocabulary_size=self.vocabulary_size,
            image_size=self.image_size,
            channels=self.channels,
            encoder=self.encoder,
            encoder_filters=list(self.encoder_filters),
            encoder_weights=None,
            train_encoder=self.train_encoder,
            feature_dim=self.feature_dim,
            embedding_dim=self.embedding_dim,
            hidden_dim=self.hidden_dim,
            attention_dim=self.attention_dim,
            dropout=self.dropout,
            concept_loss_weight=self.concept_loss_weight,
            concept_word_bias=self.concept_word_bias,
            concept_quadrants=self.concept_quadrants,
            image_stem_frozen=self.image_stem_frozen,
        )
        return config
