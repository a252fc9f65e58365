"""JPEGs that the model's decoder would misread, made readable on the client's side: PNG of what a viewer shows.

The model's graph decodes with TensorFlow's JPEG decoder, which reads greyscale and YCbCr/RGB JPEGs
only and ignores the EXIF orientation that every viewer applies. So a CMYK JPEG (common in figures
prepared for print) fails, and a phone photo of a film stored sideways with an EXIF rotation would be
captioned sideways. The gRPC client and the app send such files as the PNG of their upright RGB pixels,
as they turn DICOM into PNG; training skips them with a reason (`pipelines.rocov2.inspect_image`) and
the SavedModel refuses CMYK with a clear message.
"""

from __future__ import annotations

import io

from PIL import Image, ImageOps

EXIF_ORIENTATION = 0x0112  # 1: as stored; 2-8: mirror and/or rotate for display


def jpeg_problem(data: bytes) -> str:
    """'' for bytes the decoder reads as a viewer shows them; else 'CMYK' and/or 'EXIF orientation N'.

    Anything unreadable is '' too: the model's decoder reports bad bytes clearly itself.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG":
                return ""
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
            problems = ["CMYK"] if image.mode == "CMYK" else []
    except Exception:  # noqa: BLE001 - not for us to judge
        return ""
    if orientation not in (None, 1):
        problems.append(f"EXIF orientation {orientation}")
    return " and ".join(problems)


def upright_png(data: bytes) -> bytes:
    """The PNG of a JPEG's pixels as a viewer shows them: EXIF orientation applied, CMYK as RGB."""
    with Image.open(io.BytesIO(data)) as image:
        shown = ImageOps.exif_transpose(image)
        if shown.mode == "CMYK":
            shown = shown.convert("RGB")  # PIL undoes Adobe's inverted CMYK
        buffer = io.BytesIO()
        shown.save(buffer, format="PNG")
    return buffer.getvalue()


def readable_by_the_model(data: bytes) -> tuple[bytes, str]:
    """(`data`, '') unchanged, or (its `upright_png`, what was wrong) for a CMYK or EXIF-rotated JPEG."""
    problem = jpeg_problem(data)
    return (upright_png(data), problem) if problem else (data, "")
