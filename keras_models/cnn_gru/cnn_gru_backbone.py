"""The CNN + attention-GRU network as a functional keras-hub Backbone."""

from __future__ import annotations

import keras
import keras_hub

from keras_models.cnn_gru.attention_decoder import AttentionGRUDecoder
from keras_models.concepts import ConceptHead
from keras_models.cnn_gru.encoders import ImageEncoder


@keras.saving.register_keras_serializable(package="medcap")
class CNNGRUBackbone(keras_hub.models.Backbone):
    """`{"images", "token_ids", "padding_mask"}` -> deep-output features [B, T, embedding_dim].

    Layers: `image_encoder` (CNN feature map [B, h*w, feature_dim]), `token_embedding`
    (an untied `ReversibleEmbedding`: `token_embedding(x, reverse=True)` gives logits) and
    `decoder` (attention GRU). `encoder_weights` (a local file) is read when the backbone
    is first built; `get_config` drops it because the trained weights are saved with the model.
    `concept_loss_weight` > 0 adds a `concept_head` (`keras_models.concepts`) that the decoder reads.
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
        dtype=None,
        **kwargs,
    ):
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
            ConceptHead(vocabulary_size, embedding_dim, concept_loss_weight, name="concept_head", dtype=dtype)
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
        concepts = self.concept_head(features, token_ids, padding_mask) if self.concept_head else None
        outputs, _, _ = self.decoder(self.token_embedding(token_ids), features, padding_mask, concepts)
        super().__init__(
            inputs={"images": images, "token_ids": token_ids, "padding_mask": padding_mask},
            outputs=outputs,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size, self.image_size, self.channels = vocabulary_size, image_size, channels
        self.encoder, self.encoder_filters = encoder, tuple(encoder_filters)
        self.train_encoder = train_encoder
        self.feature_dim, self.embedding_dim = feature_dim, embedding_dim
        self.hidden_dim, self.attention_dim, self.dropout = hidden_dim, attention_dim, dropout
        self.concept_loss_weight = concept_loss_weight

    def concepts(self, features):
        """The concept vector for image features (None without a concept head)."""
        return self.concept_head(features) if self.concept_head else None

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
        )
        return config
