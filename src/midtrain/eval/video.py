"""Episode videos: H.264 MP4 (yuv420p, moov atom first) that browsers play inline."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np

from ..runs import atomic_path

VIDEO_CRF = 20  # a little better than the corpus's 23: these are for people to look at


def write_mp4(path: Path | str, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Write uint8 [H, W, 3] frames as an MP4 at ``fps``, atomically. Odd sizes are padded by
    one pixel (yuv420p needs even sizes)."""
    import av

    path = Path(path)
    height, width = frames[0].shape[:2]
    pad_h, pad_w = height % 2, width % 2
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_path(path) as tmp:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "faststart"}) as container:
            stream = container.add_stream("libx264", rate=rate)
            stream.width, stream.height, stream.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
            stream.options = {"crf": str(VIDEO_CRF)}
            for frame in frames:
                if pad_h or pad_w:
                    frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
                for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    return path
