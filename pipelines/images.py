"""Encoded image bytes -> model-ready float tensor: the one function shared by tf.data and the SavedModel.

Every check happens in the TensorFlow graph, before any pixel is decoded where
possible, and fails with `tf.errors.InvalidArgumentError` and a clear message:
empty input, bytes that are neither PNG nor JPEG, zero-size images, and images over the pixel cap
(a decompression bomb is refused from its header). CMYK JPEGs (print figures) decode too: libjpeg
turns them into RGB, and into grey by way of RGB.
Only standard TensorFlow ops are used, so TF Serving runs it unchanged.
"""

from __future__ import annotations

import tensorflow as tf

MAX_PIXELS = 50_000_000  # 50 megapixels
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"


def _fail_unless(condition: tf.Tensor, message: str) -> tf.Operation:
    """An assertion op that raises InvalidArgumentError(message) when `condition` is false."""
    return tf.debugging.Assert(condition, [tf.constant(message)], name="check")


def _big_endian_uint32(data: tf.Tensor, offset: int) -> tf.Tensor:
    """The 4-byte big-endian unsigned integer at `offset` of a string tensor, as int64."""
    raw = tf.io.decode_raw(tf.strings.substr(data, offset, 4), tf.uint8)
    raw = tf.cast(raw, tf.int64)
    return raw[0] * 16777216 + raw[1] * 65536 + raw[2] * 256 + raw[3]


def image_format(image_bytes: tf.Tensor) -> tf.Tensor:
    """'png', 'jpeg' or '' from the magic bytes of a scalar string tensor."""
    head = tf.strings.substr(image_bytes, 0, 8)
    is_png = tf.equal(head, PNG_MAGIC)
    is_jpeg = tf.equal(tf.strings.substr(image_bytes, 0, 3), JPEG_MAGIC)
    return tf.where(is_png, "png", tf.where(is_jpeg, "jpeg", ""))


def image_shape(image_bytes: tf.Tensor) -> tf.Tensor:
    """(height, width) as int64 read from the PNG or JPEG header, without decoding pixels."""
    fmt = image_format(image_bytes)

    def png_shape() -> tf.Tensor:
        enough = _fail_unless(tf.strings.length(image_bytes) >= 24, "Truncated PNG: no IHDR header.")
        with tf.control_dependencies([enough]):
            return tf.stack([_big_endian_uint32(image_bytes, 20), _big_endian_uint32(image_bytes, 16)])

    def jpeg_shape() -> tf.Tensor:
        return tf.cast(tf.image.extract_jpeg_shape(image_bytes)[:2], tf.int64)

    return tf.cond(tf.equal(fmt, "png"), png_shape, jpeg_shape)


def _jpeg_components(image_bytes: tf.Tensor) -> tf.Tensor:
    """Colour components a JPEG's frame header declares (1 grey, 3 YCbCr/RGB, 4 CMYK); 0 for a PNG."""
    return tf.cond(tf.equal(image_format(image_bytes), "jpeg"),
                   lambda: tf.image.extract_jpeg_shape(image_bytes)[2], lambda: tf.constant(0, tf.int32))


def _decode(image_bytes: tf.Tensor, channels: int) -> tf.Tensor:
    """PNG or JPEG bytes -> float32 [H, W, channels] in [0, 1], unchecked."""
    return tf.io.decode_image(image_bytes, channels=channels, dtype=tf.float32, expand_animations=False)


def decode_image(image_bytes: tf.Tensor, channels: int = 1, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """Checked decode of PNG/JPEG (8- or 16-bit, grey or colour) to float32 [H, W, channels] in [0, 1]."""
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    not_empty = _fail_unless(tf.strings.length(image_bytes) > 0, "Empty image: the upload has no bytes.")
    with tf.control_dependencies([not_empty]):
        known = _fail_unless(
            tf.not_equal(image_format(image_bytes), ""),
            "Not a PNG or JPEG image (convert DICOM with pipelines.dicom.dicom_to_png first).",
        )
    with tf.control_dependencies([known]):
        shape = image_shape(image_bytes)
    non_zero = _fail_unless(tf.reduce_all(shape > 0), "Image has zero width or height.")
    small_enough = _fail_unless(
        shape[0] * shape[1] <= max_pixels,
        f"Image too large: more than {max_pixels:,} pixels (the limit guards against decompression bombs).",
    )
    with tf.control_dependencies([non_zero, small_enough]):
        if channels == 1:  # libjpeg converts CMYK to RGB but not to grey: those go by way of RGB
            image = tf.cond(tf.equal(_jpeg_components(image_bytes), 4),
                            lambda: tf.image.rgb_to_grayscale(_decode(image_bytes, 3)),
                            lambda: _decode(image_bytes, 1))
        else:
            image = _decode(image_bytes, channels)
    image.set_shape([None, None, channels])
    return image


def resize_image(image: tf.Tensor, size: int, mode: str = "pad", interpolation: str = "bilinear") -> tf.Tensor:
    """Resize [H, W, C] to [size, size, C]: letterbox ('pad'), 'stretch', or CLIP's 'center_crop'."""
    if mode == "pad":
        image = _resize_with_pad(image, size, interpolation)
    elif mode == "stretch":
        image = tf.image.resize(image, [size, size], method=interpolation, antialias=True)
    elif mode == "center_crop":
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = size / tf.reduce_min(shape)
        new_shape = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
        image = tf.image.resize(image, new_shape, method=interpolation, antialias=True)
        top = (new_shape[0] - size) // 2
        left = (new_shape[1] - size) // 2
        image = image[top : top + size, left : left + size, :]
    else:
        raise ValueError(f"Unknown resize mode {mode!r}: use 'pad', 'stretch' or 'center_crop'.")
    image = tf.clip_by_value(image, 0.0, 1.0)  # bicubic overshoots
    return tf.ensure_shape(image, [size, size, image.shape[-1]])


def _resize_with_pad(image: tf.Tensor, size: int, interpolation: str) -> tf.Tensor:
    """`tf.image.resize_with_pad` to [size, size], but the short side keeps at least one pixel.

    The same arithmetic (scale the long side to `size`, floor, centre), so ordinary images come out
    identical; TensorFlow's own version fails on images more than 2 * size times wider than tall.
    """
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scaled = shape / tf.reduce_max(shape / size)
    resized = tf.image.resize(image, tf.maximum(tf.cast(tf.floor(scaled), tf.int32), 1), method=interpolation,
                              antialias=True)
    top, left = tf.unstack(tf.maximum(tf.cast(tf.floor((size - scaled) / 2), tf.int32), 0))
    return tf.image.pad_to_bounding_box(resized, top, left, size, size)


def normalize_image(image: tf.Tensor, mean, std) -> tf.Tensor:
    """(image - mean) / std per channel, on images scaled to [0, 1]."""
    mean = tf.constant(mean, tf.float32)
    std = tf.constant(std, tf.float32)
    return (image - mean) / std


def load_image(image_bytes: tf.Tensor, image_config: dict, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """Decode and resize to the model's size, values still in [0, 1] (augmentation goes here)."""
    image = decode_image(image_bytes, channels=image_config["channels"], max_pixels=max_pixels)
    return resize_image(
        image, image_config["image_size"], image_config["resize"], image_config.get("interpolation", "bilinear")
    )


def preprocess_image(image_bytes: tf.Tensor, image_config: dict, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """Encoded bytes -> the model's normalised float32 [size, size, channels] tensor."""
    image = load_image(image_bytes, image_config, max_pixels)
    return normalize_image(image, image_config["mean"], image_config["std"])


def preprocess_images(images_bytes: tf.Tensor, image_config: dict, max_pixels: int = MAX_PIXELS) -> tf.Tensor:
    """A batch of encoded images (string [B]) -> float32 [B, size, size, channels]."""
    size, channels = image_config["image_size"], image_config["channels"]
    return tf.map_fn(
        lambda b: preprocess_image(b, image_config, max_pixels),
        images_bytes,
        fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32),
    )


def preprocess_files(paths: list[str], image_config: dict) -> tf.Tensor:
    """Read and preprocess image files into a batch (handy for notebooks and `generate()`)."""
    return tf.stack([preprocess_image(tf.io.read_file(str(p)), image_config) for p in paths])
