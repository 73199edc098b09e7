"""Image references in the catalog: ``{"path": str | None, "bytes": bytes | None}``.

This is the Hugging Face ``datasets.Image`` encoding, so catalog Parquet files are
readable as HF datasets. Decoding errors become ``SampleError`` naming the sample.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..runs import SampleError


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


def load_image(ref: dict, where: str = "", sample_id: str | None = None) -> Image.Image:
    """Decode one image reference to an RGB PIL image, or raise SampleError saying why."""
    data, path = ref.get("bytes"), ref.get("path")
    try:
        if data is not None:
            img = Image.open(io.BytesIO(data))
        elif path:
            if not Path(path).exists():
                raise SampleError("missing image file", where, str(path), sample_id)
            img = Image.open(path)
        else:
            raise SampleError("empty image reference", where, "", sample_id)
        img.load()
    except SampleError:
        raise
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SampleError("undecodable image", where, f"{path or 'embedded bytes'}: {exc}", sample_id) from None
    return img.convert("RGB")
