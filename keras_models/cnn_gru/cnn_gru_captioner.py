"""The CNN-GRU captioner task: next-token logits, cached decoding for `generate()`, attention maps."""

from __future__ import annotations

import keras
from keras import ops

from keras_models.captioner import ImageCaptioner
from keras_models.cnn_gru.cnn_gru_backbone import CNNGRUBackbone
from keras_models.preprocessor import CaptionPreprocessor


@keras.saving.register_keras_serializable(package="medcap")
class CNNGRUCaptioner(ImageCaptioner):
    """`{"images", "token_ids", "padding_mask"}` -> logits [B, T, vocab] from a `CNNGRUBackbone`.

    The decoding cache is `(features [B,N,D], attention keys [B,N,A], states [B,T+1,H])`, plus the
    concept vector [B,C] when the backbone has a concept head,
    where `states[:, t]` is the GRU state before text position t: the CNN runs once per
    image (beam search repeats the cache per beam), and feeding position t again, as the
    keras-hub sampler loop does with the last prompt token, gives the same result.
    """

    backbone_cls = CNNGRUBackbone
    preprocessor_cls = CaptionPreprocessor

    def __init__(self, backbone: CNNGRUBackbone, preprocessor: CaptionPreprocessor | None = None, **kwargs):
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        outputs = backbone(inputs)
        logits = backbone.next_token_logits(outputs["sequence_output"], outputs.get("concept_logits"))
        super().__init__(inputs=inputs, outputs=logits, **kwargs)

    def _build_cache(self, images, token_ids, padding_mask):
        """Encode the images once and run the prompt: (hidden states [B,T,H], cache)."""
        features = self.backbone.image_encoder(images)
        concepts, concept_logits = self.backbone.concepts(features)
        keys, state = self.backbone.decoder.start(features, concepts)
        embeddings = self.backbone.token_embedding(token_ids)
        _, hidden_states, _ = self.backbone.decoder.run(embeddings, features, keys, state, padding_mask, concepts)
        states = ops.concatenate([ops.expand_dims(state, 1), hidden_states], axis=1)
        return hidden_states, (features, keys, states) + (() if concepts is None else (concepts, concept_logits))

    def call_with_cache(self, token_ids, cache, cache_update_index):
        """One step for `token_ids` [B, 1] at text position `cache_update_index`: (logits, hidden, cache)."""
        features, keys, states, *concept_cache = cache
        concepts, concept_logits = concept_cache or (None, None)
        batch_size = ops.shape(states)[0]
        state = ops.slice(states, [0, cache_update_index, 0], [batch_size, 1, self.backbone.hidden_dim])
        embeddings = self.backbone.token_embedding(token_ids)
        state, context, _ = self.backbone.decoder.step(embeddings[:, 0], state[:, 0], features, keys)
        hidden, context = ops.expand_dims(state, 1), ops.expand_dims(context, 1)
        outputs = self.backbone.decoder.project(hidden, context, embeddings, concepts)
        logits = self.backbone.next_token_logits(outputs, concept_logits)
        states = ops.slice_update(states, [0, cache_update_index + 1, 0], hidden)
        return logits, hidden, (features, keys, states) + (() if concepts is None else (concepts, concept_logits))

    def attention_maps(self, images, token_ids, padding_mask=None):
        """Teacher-forced attention weights [B, T, h*w] (each row sums to 1); reshape with `backbone.feature_grid`."""
        token_ids = ops.convert_to_tensor(token_ids, dtype="int32")
        if padding_mask is None:
            padding_mask = ops.not_equal(token_ids, 0)  # [PAD] is id 0
        features = self.backbone.image_encoder(ops.convert_to_tensor(images, dtype="float32"))
        embeddings = self.backbone.token_embedding(token_ids)
        _, _, weights = self.backbone.decoder(embeddings, features, padding_mask, self.backbone.concepts(features)[0])
        return weights
