"""The one image function: formats, bit depths, resize policies and every bad-input case."""

import io
import struct
import zlib

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipelines.images import (
    PNG_MAGIC,
    decode_image,
    image_shape,
    preprocess_image,
    preprocess_images,
    resize_image,
)

CFG = {"image_size": 32, "channels": 1, "resize": "pad", "interpolation": "bilinear", "mean": [0.5], "std": [0.25]}


def encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, fmt)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG that claims huge dimensions (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture
def grey() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (40, 60), dtype=np.uint8)


def test_png_and_jpeg_decode_to_unit_floats(grey):
    png = decode_image(encode(grey), channels=1).numpy()
    assert png.shape == (40, 60, 1) and png.dtype == np.float32
    np.testing.assert_allclose(png[..., 0], grey / 255.0, atol=1e-6)
    jpeg = decode_image(encode(grey, "JPEG"), channels=1).numpy()
    assert jpeg.shape == (40, 60, 1) and np.abs(jpeg[..., 0] - grey / 255.0).mean() < 0.05


def test_sixteen_bit_png_keeps_its_precision():
    deep = np.array([[0, 1000, 40000, 65535]], dtype=np.uint16)
    out = decode_image(encode(deep), channels=1).numpy()[0, :, 0]
    np.testing.assert_allclose(out, deep[0] / 65535.0, atol=1e-6)


def test_grey_and_colour_convert_to_the_requested_channels(grey):
    rgb = np.stack([grey, grey // 2, 255 - grey], -1)
    assert decode_image(encode(grey), channels=3).shape == (40, 60, 3)
    assert decode_image(encode(rgb), channels=1).shape == (40, 60, 1)


@pytest.mark.parametrize("mode", ["pad", "stretch", "center_crop"])
def test_resize_policies_give_the_model_size(grey, mode):
    image = decode_image(encode(grey), channels=1)
    out = resize_image(image, 32, mode, "bicubic").numpy()
    assert out.shape == (32, 32, 1) and out.min() >= 0 and out.max() <= 1


def test_pad_keeps_aspect_with_black_bars():
    wide = np.full((20, 80), 255, np.uint8)
    out = resize_image(decode_image(encode(wide)), 40, "pad").numpy()[..., 0]
    assert out[0].max() == 0 and out[-1].max() == 0  # letterbox bars top and bottom
    assert out[20].min() > 0.99


@pytest.mark.parametrize("height, width", [(50, 4000), (4000, 50), (1, 10_000), (37, 1000), (384, 366), (97, 129)])
def test_pad_keeps_a_pixel_of_the_short_side_and_otherwise_matches_tensorflows(height, width):
    image = tf.constant(np.random.default_rng(height).random((height, width, 1), dtype=np.float32))
    out = resize_image(image, 32, "pad")
    assert out.shape == (32, 32, 1)
    if min(height, width) * 32 >= max(height, width):  # where tf.image.resize_with_pad works: the same pixels
        expected = tf.image.resize_with_pad(image, 32, 32, method="bilinear", antialias=True)
        assert np.array_equal(out.numpy(), expected.numpy())
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="output dimensions must be positive"):
            tf.image.resize_with_pad(image, 32, 32, antialias=True)
        assert out.numpy().max() > 0  # the image's line is there, not only padding


def test_a_cmyk_jpeg_decodes_to_rgb_and_to_grey_by_way_of_rgb():
    buffer = io.BytesIO()
    Image.new("CMYK", (16, 12), (0, 160, 255, 0)).save(buffer, format="JPEG", quality=95)  # orange
    with pytest.raises(tf.errors.InvalidArgumentError):  # what libjpeg alone does: no CMYK -> grey
        tf.io.decode_jpeg(buffer.getvalue(), channels=1)
    rgb = decode_image(buffer.getvalue(), channels=3).numpy()
    red, green, blue = rgb.reshape(-1, 3).mean(0)
    assert rgb.shape == (12, 16, 3) and red > 0.9 and 0.3 < green < 0.45 and blue < 0.06
    grey = decode_image(buffer.getvalue(), channels=1).numpy()
    assert grey.shape == (12, 16, 1)
    np.testing.assert_allclose(grey, tf.image.rgb_to_grayscale(rgb).numpy(), atol=1e-6)
    assert preprocess_image(buffer.getvalue(), CFG).shape == (32, 32, 1)


def test_normalisation_matches_config(grey):
    out = preprocess_image(encode(grey), CFG).numpy()
    assert out.shape == (32, 32, 1)
    assert out.min() >= (0 - 0.5) / 0.25 - 1e-6 and out.max() <= (1 - 0.5) / 0.25 + 1e-6


def test_header_shape_without_decoding(grey):
    assert image_shape(tf.constant(encode(grey))).numpy().tolist() == [40, 60]
    assert image_shape(tf.constant(encode(grey, "JPEG"))).numpy().tolist() == [40, 60]
    assert image_shape(tf.constant(png_header_only(30000, 20000))).numpy().tolist() == [20000, 30000]


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "Empty image"),
        (b"just some text, not an image", "Not a PNG or JPEG"),
        (b"DICM" + b"\0" * 200, "Not a PNG or JPEG"),
        (png_header_only(30000, 20000), "Image too large"),
        (png_header_only(0, 10), "zero width or height"),
    ],
)
def test_bad_bytes_raise_clear_invalid_argument(data, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        preprocess_image(data, CFG)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_images_raise_invalid_argument(grey, fmt):
    data = encode(grey, fmt)
    with pytest.raises(tf.errors.InvalidArgumentError):
        preprocess_image(data[: len(data) // 2], CFG)


def test_batch_function_in_a_graph_and_its_error(grey):
    fn = tf.function(lambda b: preprocess_images(b, CFG), input_signature=[tf.TensorSpec([None], tf.string)])
    assert fn(tf.constant([encode(grey), encode(grey, "JPEG")])).shape == (2, 32, 32, 1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="Not a PNG or JPEG"):
        fn(tf.constant([encode(grey), b"junk"]))
