"""CMYK JPEG -> RGB PNG on the client's side, before the bytes go to the model.

The model's graph decodes with TensorFlow's JPEG decoder, which reads greyscale and YCbCr/RGB JPEGs
only; figures prepared for print are often CMYK. The gRPC client and the app convert such files here
(losslessly from the decoded pixels), as they turn DICOM into PNG; training skips them with a reason
(`pipelines.rocov2.inspect_image`) and the SavedModel refuses them with a clear message.
"""

from __future__ import annotations

import io

from PIL import Image


def is_cmyk_jpeg(data: bytes) -> bool:
    """True for JPEG bytes with four colour components (CMYK or YCCK); False for anything else, unreadable too."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.format == "JPEG" and image.mode == "CMYK"
    except Exception:  # noqa: BLE001 - not for us to judge: the model's decoder reports bad bytes clearly
        return False


def cmyk_jpeg_to_png(data: bytes) -> bytes:
    """The RGB PNG of a CMYK JPEG's pixels (PIL undoes Adobe's inverted CMYK)."""
    with Image.open(io.BytesIO(data)) as image:
        rgb = image.convert("RGB")
    buffer = io.BytesIO()
    rgb.save(buffer, format="PNG")
    return buffer.getvalue()


def readable_by_the_model(data: bytes) -> bytes:
    """`data` unchanged, unless it is a CMYK JPEG: then its RGB PNG."""
    return cmyk_jpeg_to_png(data) if is_cmyk_jpeg(data) else data
