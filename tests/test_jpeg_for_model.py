"""EXIF-rotated JPEGs become the upright PNG a viewer shows (`pipelines/jpeg_for_model.py`); the rest pass unchanged."""

from __future__ import annotations

import io
import struct

import numpy as np
from PIL import Image

from pipelines.jpeg_for_model import readable_by_the_model


def _jpeg(pixels: np.ndarray | None = None, orientation: int | None = None, mode: str = "L") -> bytes:
    buffer, exif = io.BytesIO(), Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image = Image.fromarray(pixels) if pixels is not None else Image.new(mode, (24, 16), 128)
    image.save(buffer, format="JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_an_exif_rotated_jpeg_becomes_the_upright_png():
    stored = np.zeros((16, 24), np.uint8)
    stored[:, :8] = 255  # a bright band on the stored image's left
    png, rotation = readable_by_the_model(_jpeg(stored, orientation=6))  # "rotate 90 degrees clockwise to show"
    assert rotation == 6 and png.startswith(b"\x89PNG\r\n\x1a\n")
    upright = np.asarray(Image.open(io.BytesIO(png)))
    assert upright.shape == (24, 16)  # portrait, as viewers show it
    assert upright[:8].mean() > 200 and upright[-8:].mean() < 50  # the band now runs along the top


def test_other_bytes_pass_unchanged():
    cases = [_jpeg(orientation=1), _jpeg(orientation=0), _jpeg(orientation=9), _jpeg(mode="CMYK"), b"", b"\xff\xd8\xff"]
    for data in cases:  # as stored, a camera's 0, an invalid value, CMYK (the graph decodes it), junk
        assert readable_by_the_model(data) == (data, 0)


def test_a_truncated_or_huge_rotated_jpeg_is_left_to_the_models_decoder():
    rotated = _jpeg(np.random.default_rng(0).integers(0, 256, (64, 64), np.uint8), orientation=6)
    truncated = rotated[: len(rotated) // 2]
    assert readable_by_the_model(truncated) == (truncated, 0)  # no OSError: the server says what is wrong
    sof = rotated.index(b"\xff\xc0")  # claim 10000 x 10000 pixels in the frame header, over the 50 MP limit
    huge = rotated[: sof + 5] + struct.pack(">HH", 10000, 10000) + rotated[sof + 9:]
    assert readable_by_the_model(huge) == (huge, 0)
