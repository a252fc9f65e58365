"""EXIF-rotated JPEGs made upright on the client's side: the PNG of what a viewer shows.

The model's graph decodes with TensorFlow's JPEG decoder, which ignores the EXIF orientation that
every viewer applies: a phone photo of a film stored sideways would be captioned sideways, and the
app's attention overlay would disagree with the image on screen. The gRPC client and the app send
such files as the PNG of their upright pixels, as they turn DICOM into PNG; training skips them with
a reason (`pipelines.rocov2.inspect_image`), since the decoder would show the model other pixels than
the caption's author saw.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112  # 1: as stored; 2-8: mirror and/or rotate for display
MAX_PIXELS = 50_000_000  # as pipelines.images allows (that module imports TensorFlow; the client must not)


def exif_rotation(image: Image.Image) -> int:
    """The EXIF orientation (2-8) that a viewer would apply to an opened JPEG, else 0."""
    if image.format != "JPEG":
        return 0
    value = image.getexif().get(EXIF_ORIENTATION)
    return value if isinstance(value, int) and 2 <= value <= 8 else 0


def readable_by_the_model(data: bytes) -> tuple[bytes, int]:
    """(`data`, 0) unchanged, or (the upright PNG, its EXIF orientation) for an EXIF-rotated JPEG.

    Bytes that do not open, are too large or do not decode fully pass unchanged: the model's decoder
    refuses them with a clear message of its own.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            rotation = exif_rotation(image)
            if not rotation or image.width * image.height > MAX_PIXELS:
                return data, 0
            upright = ImageOps.exif_transpose(image)
            buffer = io.BytesIO()
            upright.save(buffer, format="PNG")
    except Exception:  # noqa: BLE001 - truncated, corrupt, a decompression bomb: not for us to judge
        return data, 0
    return buffer.getvalue(), rotation
