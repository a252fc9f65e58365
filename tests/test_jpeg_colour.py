"""CMYK JPEGs become RGB PNGs on the client's side (`pipelines/jpeg_colour.py`); everything else passes unchanged."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.jpeg_colour import is_cmyk_jpeg, readable_by_the_model


def _jpeg(mode: str, colour) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (24, 16), colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_a_cmyk_jpeg_becomes_the_rgb_png_of_its_pixels():
    data = _jpeg("CMYK", (0, 160, 255, 0))  # no black, full yellow, some magenta: an orange
    assert is_cmyk_jpeg(data)
    png = readable_by_the_model(data)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        assert image.mode == "RGB" and image.size == (24, 16)
        red, green, blue = np.asarray(image).reshape(-1, 3).mean(0)
    assert red > 240 and 80 < green < 110 and blue < 15


def test_other_bytes_pass_unchanged():
    for data in (_jpeg("RGB", (10, 20, 30)), _jpeg("L", 128), b"\xff\xd8\xff truncated", b""):
        assert not is_cmyk_jpeg(data)
        assert readable_by_the_model(data) is data
