"""CMYK and EXIF-rotated JPEGs become the PNG a viewer shows (`pipelines/jpeg_for_model.py`); the rest pass unchanged."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pipelines.jpeg_for_model import jpeg_problem, readable_by_the_model


def _jpeg(mode: str, colour, size=(24, 16), orientation: int | None = None) -> bytes:
    buffer, exif = io.BytesIO(), Image.Exif()
    if orientation:
        exif[0x0112] = orientation
    Image.new(mode, size, colour).save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def _pixels(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image)


def test_a_cmyk_jpeg_becomes_the_rgb_png_of_its_pixels():
    png, problem = readable_by_the_model(_jpeg("CMYK", (0, 160, 255, 0)))  # no black, full yellow, some magenta
    assert problem == "CMYK"
    pixels = _pixels(png)
    assert pixels.shape == (16, 24, 3)
    red, green, blue = pixels.reshape(-1, 3).mean(0)
    assert red > 240 and 80 < green < 110 and blue < 15  # orange


def test_an_exif_rotated_jpeg_becomes_the_upright_png():
    stored = np.zeros((16, 24), np.uint8)
    stored[:, :8] = 255  # a bright band on the stored image's left
    buffer, exif = io.BytesIO(), Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95, exif=exif)
    png, problem = readable_by_the_model(buffer.getvalue())
    assert problem == "EXIF orientation 6"
    upright = _pixels(png)
    assert upright.shape == (24, 16)  # portrait, as viewers show it
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the band now runs along the top


def test_other_bytes_pass_unchanged():
    for data in (_jpeg("RGB", (10, 20, 30)), _jpeg("L", 128, orientation=1), b"\xff\xd8\xff truncated", b""):
        assert jpeg_problem(data) == ""
        assert readable_by_the_model(data)[0] is data
