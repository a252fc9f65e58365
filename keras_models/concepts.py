"""A concept head: which words the caption will use, predicted from the image, fed back to the decoder.

Image captioners trained from scratch learn the language first and the image late: a finding that
decides one or two words of a caption gets a small share of the token loss, so the decoder writes the
most frequent finding for the region for a long time. Predicting the caption's words as a multi-label
target straight from pooled image features (as in "semantic attention", You et al. 2016, and the tag
classifier of Jing et al. 2018) gives the encoder a dense signal per finding, and feeding the predicted
probabilities to the decoder gives it a short path to them. The targets come from the caption's own
token ids, so it works on any dataset without extra labels.

With `gate_dim`, the head also adds a gated word bias to the decoder's next-token logits: a gate read from
the decoder's output at each step (sigmoid, one per word) times log sigmoid(word logits), a product of experts
that the decoder opens where a word is due. The concept vector alone tells the decoder which words are likely;
through one tanh layer it rarely turns that into the right side or size word at the right step.

`ConceptTagger` trains the image path and the head alone on that task ("concept pretraining", as
Jing et al. 2018 train their tag classifier), a few cheap epochs before the captioner: the decoder
costs more than the encoder and, early on, teaches it little.

With `grid`, the word logits also read the maximum over each quadrant of the feature map (a two-level
spatial pyramid, He et al. 2014): global mean and max forget where a lesion is and how much of the map
it covers, which is what side and size words need.
"""

from __future__ import annotations

import keras
from keras import layers, ops


def check_concept_options(concept_loss_weight: float, **options: bool) -> None:
    """Refuse backbone options (`concept_word_bias=True`, ...) that need a concept head when there is none."""
    used = [name for name, on in options.items() if on]
    if used and not concept_loss_weight:
        raise ValueError(f"{', '.join(used)} needs a concept head: set concept_loss_weight > 0.")


@keras.saving.register_keras_serializable(package="medcap")
class ConceptHead(keras.layers.Layer):
    """Image features `[B, N, D]` -> concept vector `[B, output_dim]` = tanh(Dense(sigmoid(word logits))).

    Word logits come from the mean and max of the features over N. Given the captions' `token_ids`
    in `fit()` or `evaluate()` (which pass `training`), it adds `loss_weight` x (binary cross-entropy
    summed over the vocabulary, averaged over the batch; target: the word occurs in the caption) via
    `add_loss`, so `loss` and `val_loss` measure the same sum. Captioning passes no captions: no loss.
    `gate_dim` (the width of the decoder output that `word_bias` reads) enables the gated word bias.
    `grid` `(h, w)` says that the last h*w of the N features form a row-major h x w map (rows before it,
    such as a class token, only join the global pooling); the logits then also read each quadrant's max.
    """

    def __init__(self, vocabulary_size: int, output_dim: int, loss_weight: float = 1.0, gate_dim: int = 0,
                 grid: tuple[int, int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.vocabulary_size, self.output_dim, self.loss_weight = vocabulary_size, output_dim, loss_weight
        self.gate_dim = gate_dim
        self.grid = tuple(grid) if grid else None
        if self.grid and min(self.grid) < 2:
            raise ValueError(f"Quadrant pooling needs a feature map of at least 2 x 2, got {self.grid}.")
        self.word_logits = layers.Dense(vocabulary_size, name="word_logits", dtype=self.dtype_policy)
        self.embed = layers.Dense(output_dim, activation="tanh", name="embed", dtype=self.dtype_policy)
        # Starts nearly closed (sigmoid(-2) = 0.12): the decoder first learns the language on its own.
        self.gate = (
            layers.Dense(vocabulary_size, bias_initializer=keras.initializers.Constant(-2.0), name="gate",
                         dtype=self.dtype_policy)
            if gate_dim else None
        )

    def build(self, features_shape, token_ids_shape=None, padding_mask_shape=None):
        pooled_parts = 2 + (4 if self.grid else 0)
        self.word_logits.build((None, pooled_parts * features_shape[-1]))
        self.embed.build((None, self.vocabulary_size))
        if self.gate is not None:
            self.gate.build((None, None, self.gate_dim))
        self.built = True

    def logits(self, features):
        """Multi-label word logits `[B, vocabulary_size]`."""
        pooled = [ops.mean(features, axis=1), ops.max(features, axis=1)]
        if self.grid:
            pooled += self.quadrant_max(features)
        return self.word_logits(ops.concatenate(pooled, axis=-1))

    def quadrant_max(self, features):
        """Max over each quadrant of the h x w map (the middle row/column joins both halves when odd): 4 x `[B, D]`."""
        h, w = self.grid
        if features.shape[1] != h * w:  # leading rows such as a class token
            features = features[:, -h * w:, :]
        depth = features.shape[-1]
        if h % 2 == 0 and w % 2 == 0:  # one reduction over a [B, 2, h/2, 2, w/2, D] view: cheaper to differentiate
            maxima = ops.max(ops.reshape(features, (-1, 2, h // 2, 2, w // 2, depth)), axis=(2, 4))
            return [maxima[:, row, col] for row in (0, 1) for col in (0, 1)]
        grid = ops.reshape(features, (-1, h, w, depth))
        rows = (grid[:, : (h + 1) // 2], grid[:, h // 2:])
        return [ops.max(half[:, :, cols], axis=(1, 2))
                for half in rows for cols in (slice(0, (w + 1) // 2), slice(w // 2, w))]

    def call(self, features, token_ids=None, padding_mask=None, training=None, return_logits=False):
        """The concept vector `[B, output_dim]`; with `return_logits`, also the word logits `[B, vocabulary_size]`."""
        logits = self.logits(features)
        if training is not None and token_ids is not None and self.loss_weight:
            self.add_loss(self.loss_weight * self.word_loss(logits, token_ids, padding_mask))
        concepts = self.embed(ops.sigmoid(logits))
        return (concepts, logits) if return_logits else concepts

    def word_bias(self, decoder_outputs, logits):
        """`[B, T, vocabulary_size]` to add to next-token logits: gate(decoder_outputs) x log sigmoid(logits)."""
        gate = ops.sigmoid(self.gate(decoder_outputs))
        return gate * ops.expand_dims(ops.cast(ops.log_sigmoid(logits), gate.dtype), 1)

    def word_loss(self, logits, token_ids, padding_mask=None):
        """Sum over the vocabulary of BCE(logits, words present in the caption), averaged over the batch."""
        if padding_mask is None:
            padding_mask = ops.not_equal(token_ids, 0)
        ids = ops.where(ops.cast(padding_mask, "bool"), token_ids, 0)
        present = ops.max(ops.one_hot(ids, self.vocabulary_size, dtype="float32"), axis=1)
        never_pad = ops.concatenate([ops.zeros_like(present[:, :1]), ops.ones_like(present[:, 1:])], axis=-1)
        target = present * never_pad  # id 0 ([PAD]) is no word
        logits = ops.cast(logits, "float32")
        bce = ops.binary_crossentropy(target, logits, from_logits=True)
        return ops.mean(ops.sum(bce, axis=-1))

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(vocabulary_size=self.vocabulary_size, output_dim=self.output_dim, loss_weight=self.loss_weight,
                      gate_dim=self.gate_dim, grid=list(self.grid) if self.grid else None)
        return config


@keras.saving.register_keras_serializable(package="medcap")
class ConceptTagger(keras.Model):
    """A captioner backbone's image path and concept head alone: `{"images", ...}` -> word logits `[B, vocab]`.

    It shares the backbone's layers, so fitting it trains them. It takes the captioner preprocessor's
    inputs (`images`, `token_ids`, `padding_mask`); its loss is the head's word loss on those captions,
    and no part of the decoder runs. The backbone must have a concept head, `concept_features(images)` and
    `concept_feature_layers()`.
    """

    def __init__(self, backbone: keras.Model, **kwargs):
        super().__init__(**kwargs)
        if getattr(backbone, "concept_head", None) is None:
            raise ValueError("Concept pretraining needs a backbone with a concept head (concept_loss_weight > 0).")
        self.backbone = backbone
        self.built = backbone.built  # no weights of its own

    @property
    def trainable_weights(self) -> list:
        """Only what the word logits depend on: the feature layers and the head's `word_logits` (no decoder)."""
        if not self.trainable:
            return []
        layers_used = [*self.backbone.concept_feature_layers(), self.backbone.concept_head.word_logits]
        return [v for layer in layers_used for v in layer.trainable_weights]

    @property
    def trainable_variables(self) -> list:
        return self.trainable_weights

    def call(self, inputs, training=None):
        return self.backbone.concept_head.logits(self.backbone.concept_features(inputs["images"]))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return self.backbone.concept_head.word_loss(y_pred, x["token_ids"], x["padding_mask"])

    def get_config(self) -> dict:
        return {"name": self.name, "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config: dict) -> "ConceptTagger":
        config = dict(config, backbone=keras.saving.deserialize_keras_object(config["backbone"]))
        return cls(**config)
