"""Freezing a backbone's image stem so that `.keras` files remember it."""

from __future__ import annotations


class FreezableImageStem:
    """Backbone mixin: `freeze_image_stem()` freezes `image_stem_layers()`; `image_stem_frozen` says whether they are.

    Keras saves a layer's `trainable` flag in the layer's config, but our backbones rebuild their layers from
    their arguments, so without `image_stem_frozen` in the config a reloaded model's stem would train again:
    its optimizer would then have more variables than the saved one, and Keras skips loading it with a
    warning ("Skipping variable loading for optimizer ..."). A backbone takes `image_stem_frozen` as an argument,
    calls `freeze_image_stem()` at the end of `__init__` when it is set, and returns it from `get_config`.
    """

    @property
    def image_stem_frozen(self) -> bool:
        """Whether the backbone has a stem and none of its layers trains (read from the layers, never stale)."""
        layers = self.image_stem_layers()
        return bool(layers) and not any(layer.trainable for layer in layers)

    def freeze_image_stem(self) -> list[str]:
        """Freeze the stem (weights and batch-norm statistics); returns the frozen layers' names.

        `pipelines.training` calls it after concept pretraining (`--freeze-stem`): the captioner's steps then
        skip the stem's backward pass, the costliest part of the image encoder's, and its batch norm keeps the
        pretrained statistics.
        """
        layers = self.image_stem_layers()
        for layer in layers:
            layer.trainable = False
        return [layer.name for layer in layers]
