"""Image references in the catalog: ``{"path": str | None, "bytes": bytes | None}``.

This is the Hugging Face ``datasets.Image`` encoding, so catalog Parquet files are
readable as HF datasets. Decoding errors become ``SampleError`` naming the sample.

Every image is opened through :func:`open_image`, which refuses images over a pixel
limit (``max_pixels``, default PIL's own warning threshold of 89,478,485 pixels: about
9459 x 9459) from the header alone, before any pixel is decoded, so a 20000 x 20000
"decompression bomb" PNG of a few kilobytes is one bad sample, not an exhausted machine.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from ..runs import SampleError

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as shipped: 1024 * 1024 * 1024 // 4 // 3


def ref_from_path(path: Path | str) -> dict:
    return {"path": str(Path(path).resolve()), "bytes": None}


def ref_from_bytes(data: bytes) -> dict:
    return {"path": None, "bytes": bytes(data)}


def encode_image(image: np.ndarray | Image.Image, format: str = "PNG", quality: int = 95) -> bytes:
    """Encode an HxWx3 uint8 array or PIL image (PNG is lossless; JPEG is smaller)."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    kwargs = {"quality": quality} if format.upper() in ("JPEG", "JPG") else {}
    image.save(buf, format=format, **kwargs)
    return buf.getvalue()


def open_image(file: Path | str | BinaryIO, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> Image.Image:
    """``PIL.Image.open`` (header only, nothing decoded) that refuses more than ``max_pixels`` pixels.

    Raises ``ImageTooLarge`` (a ``ValueError``) for an oversized image; any other failure is
    PIL's. ``max_pixels=None`` means no limit. PIL's own guard (a warning above
    ``Image.MAX_IMAGE_PIXELS``, an error above twice that) is replaced by this check: a limit
    above PIL's raises PIL's process-wide, and its warning is silenced here.
    """
    if max_pixels is None or max_pixels > 2 * (Image.MAX_IMAGE_PIXELS or 0):
        if Image.MAX_IMAGE_PIXELS is not None:
            Image.MAX_IMAGE_PIXELS = None if max_pixels is None else max_pixels // 2 + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(file)
        except Image.DecompressionBombError as exc:  # PIL's own limit is lower than ours
            raise ImageTooLarge(f"over the limit of {max_pixels:,} pixels (max_image_pixels; PIL: {exc})") from None
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        img.close()
        raise ImageTooLarge(
            f"{width}x{height} = {width * height:,} pixels is over the limit of {max_pixels:,} "
            "(max_image_pixels; a decompression bomb, or raise the limit)"
        )
    return img


class ImageTooLarge(ValueError):
    """An image's header declares more pixels than the configured limit."""


def load_image(
    ref: dict, where: str = "", sample_id: str | None = None, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
) -> Image.Image:
    """Decode one image reference to an RGB PIL image, or raise SampleError saying why.

    ``image too large`` when the header declares more than ``max_pixels`` pixels (checked
    before decoding); ``undecodable image`` for anything PIL cannot decode (truncated,
    corrupt or not an image: PIL raises OSError, SyntaxError, ValueError, EOFError, ...
    depending on the format, so any exception from PIL counts).
    """
    data, path = ref.get("bytes"), ref.get("path")
    label = path or "embedded bytes"
    if data is None and not path:
        raise SampleError("empty image reference", where, "", sample_id)
    if data is None and not Path(path).exists():
        raise SampleError("missing image file", where, str(path), sample_id)
    try:
        img = open_image(io.BytesIO(data) if data is not None else path, max_pixels)
        img.load()
        return img.convert("RGB")
    except ImageTooLarge as exc:
        raise SampleError("image too large", where, f"{label}: {exc}", sample_id) from None
    except Exception as exc:  # a hostile or broken file: whatever PIL raises is this sample's problem
        raise SampleError("undecodable image", where, f"{label}: {type(exc).__name__}: {exc}", sample_id) from None
