"""A GRU caption decoder with additive (Bahdanau) attention over a CNN feature map.

As in Show, Attend and Tell: at step t the previous state h_{t-1} attends over the
features, and the context is fed with the word embedding into a plain GRU cell; the
initial state is tanh(Dense([mean, max] of the features)) (the max carries small findings
that the mean dilutes); the output is a deep output tanh(Dense([h_t, context_t, embedding_t]))
that the backbone's output embedding turns into logits. Padding tokens leave the state unchanged. No randomness inside the step,
so the teacher-forced pass and the cached one-step pass compute the same thing. With `concept_dim`, a concept vector
[B, concept_dim] (`keras_models.concepts.ConceptHead`) joins the initial state's input and every deep output.
"""

from __future__ import annotations

import keras
from keras import layers, ops


@keras.saving.register_keras_serializable(package="medcap")
class AttentionGRUCell(keras.layers.Layer):
    """One decoding step: attend with h_{t-1}, then GRU([embedding, context]) -> h_t."""

    def __init__(self, hidden_dim: int, attention_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim, self.attention_dim = hidden_dim, attention_dim
        policy = self.dtype_policy
        self.key_dense = layers.Dense(attention_dim, name="attention_keys", dtype=policy)
        self.query_dense = layers.Dense(attention_dim, use_bias=False, name="attention_query", dtype=policy)
        self.score_dense = layers.Dense(1, use_bias=False, name="attention_score", dtype=policy)
        self.gru = layers.GRUCell(hidden_dim, name="gru", dtype=policy)

    def build(self, embedding_shape, state_shape, features_shape, keys_shape=None, mask_shape=None):
        self.key_dense.build(features_shape)
        self.query_dense.build((None, self.hidden_dim))
        self.score_dense.build((None, None, self.attention_dim))
        self.gru.build((None, embedding_shape[-1] + features_shape[-1]))
        self.built = True

    def keys(self, features):
        """Attention keys of the feature map, computed once per image: [B, N, attention_dim]."""
        return self.key_dense(features)

    def attend(self, state, features, keys):
        """Context [B, D] and weights [B, N] of additive attention with `state` as the query."""
        energy = ops.tanh(keys + ops.expand_dims(self.query_dense(state), 1))
        weights = ops.softmax(ops.squeeze(self.score_dense(energy), -1), axis=-1)
        context = ops.squeeze(ops.matmul(ops.expand_dims(weights, 1), features), 1)
        return context, weights

    def call(self, embedding, state, features, keys, mask=None):
        """(h_t, context_t, weights_t); where `mask` is False the state stays h_{t-1}."""
        context, weights = self.attend(state, features, keys)
        new_state, _ = self.gru(ops.concatenate([embedding, context], axis=-1), [state])
        if mask is not None:
            new_state = ops.where(ops.expand_dims(mask, -1), new_state, state)
        return new_state, context, weights

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(hidden_dim=self.hidden_dim, attention_dim=self.attention_dim)
        return config


@keras.saving.register_keras_serializable(package="medcap")
class AttentionGRUDecoder(keras.layers.Layer):
    """Teacher-forced decoder: (embeddings [B,T,E], features [B,N,D]) -> (outputs [B,T,output_dim],
    states [B,T,hidden_dim], attention weights [B,T,N])."""

    def __init__(self, hidden_dim: int, attention_dim: int, output_dim: int, dropout: float = 0.0,
                 concept_dim: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.hidden_dim, self.attention_dim = hidden_dim, attention_dim
        self.output_dim, self.dropout, self.concept_dim = output_dim, dropout, concept_dim
        policy = self.dtype_policy
        self.cell = AttentionGRUCell(hidden_dim, attention_dim, name="cell", dtype=policy)
        self.initial_state = layers.Dense(hidden_dim, activation="tanh", name="initial_state", dtype=policy)
        self.deep_output = layers.Dense(output_dim, activation="tanh", name="deep_output", dtype=policy)
        self.embedding_dropout = layers.Dropout(dropout, name="embedding_dropout")
        self.output_dropout = layers.Dropout(dropout, name="output_dropout")

    def build(self, embeddings_shape, features_shape, padding_mask_shape=None, concepts_shape=None):
        embedding_dim, feature_dim = embeddings_shape[-1], features_shape[-1]
        self.cell.build((None, embedding_dim), (None, self.hidden_dim), features_shape)
        self.initial_state.build((None, 2 * feature_dim + self.concept_dim))
        self.deep_output.build((None, None, self.hidden_dim + feature_dim + embedding_dim + self.concept_dim))
        self.built = True

    def start(self, features, concepts=None):
        """Attention keys and the initial state tanh(Dense([mean, max] of the features (, concepts))), once per image."""
        pooled = [ops.mean(features, axis=1), ops.max(features, axis=1)] + ([concepts] if self.concept_dim else [])
        return self.cell.keys(features), self.initial_state(ops.concatenate(pooled, axis=-1))

    def step(self, embedding, state, features, keys, mask=None):
        """One step for embedding [B, E]: (h_t, context_t, weights_t)."""
        return self.cell(embedding, state, features, keys, mask)

    def project(self, states, contexts, embeddings, concepts=None, training=None):
        """Deep output tanh(Dense([h, context, embedding(, concepts)])) for [B, T, ...] inputs."""
        parts = [states, contexts, embeddings]
        if self.concept_dim:  # the same concept vector at every position
            parts.append(ops.expand_dims(concepts, 1) + ops.zeros_like(states[..., :1]))
        x = ops.concatenate(parts, axis=-1)
        return self.deep_output(self.output_dropout(x, training=training))

    def run(self, embeddings, features, keys, state, padding_mask=None, concepts=None, training=None):
        """Scan the cell over time from `state`: (outputs, states, weights), batch-major."""
        embeddings = self.embedding_dropout(embeddings, training=training)
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(embeddings)[:2], dtype="bool")
        time_major = (ops.moveaxis(embeddings, 1, 0), ops.moveaxis(ops.cast(padding_mask, "bool"), 1, 0))

        def scan_step(carry, inputs):
            carry = self.step(inputs[0], carry[0], features, keys, inputs[1])
            return carry, carry

        # Per-step outputs are carried too: TensorFlow's scan wants them shaped like the carry.
        init = (state, ops.zeros_like(features[:, 0, :]), ops.zeros_like(features[:, :, 0]))
        length = embeddings.shape[1]
        if length is None:  # symbolic shapes only
            # One packed input: Keras' TensorFlow scan fails on several inputs of unknown length.
            packed = ops.concatenate([time_major[0], ops.cast(time_major[1], time_major[0].dtype)[..., None]], -1)
            _, outputs = ops.scan(lambda c, x: scan_step(c, (x[..., :-1], x[..., -1] > 0.5)), init, packed)
        else:
            # A Python loop over a known length: TensorFlow's scan cannot be differentiated under XLA
            # (which Keras uses on GPU); on CPU both cost the same.
            # Unstacked once, not indexed per step: each index's gradient is a full-size tensor.
            carry, outputs = init, []
            for step_inputs in zip(ops.unstack(time_major[0], axis=0), ops.unstack(time_major[1], axis=0)):
                carry, _ = scan_step(carry, step_inputs)
                outputs.append(carry)
            outputs = [ops.stack(list(x), axis=0) for x in zip(*outputs)]
        states, contexts, weights = (ops.moveaxis(x, 0, 1) for x in outputs)
        return self.project(states, contexts, embeddings, concepts, training=training), states, weights

    def call(self, embeddings, features, padding_mask=None, concepts=None, training=None):
        keys, state = self.start(features, concepts)
        return self.run(embeddings, features, keys, state, padding_mask, concepts, training=training)

    def compute_output_shape(self, embeddings_shape, features_shape, padding_mask_shape=None, concepts_shape=None):
        batch, length = embeddings_shape[:2]
        return (batch, length, self.output_dim), (batch, length, self.hidden_dim), (batch, length, features_shape[1])

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            attention_dim=self.attention_dim,
            output_dim=self.output_dim,
            dropout=self.dropout,
            concept_dim=self.concept_dim,
        )
        return config
