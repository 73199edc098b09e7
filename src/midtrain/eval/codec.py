"""Observation frames through the corpus's video codec: encode, decode, hand the decoded frame on.

Why: a policy trained on a LeRobot corpus saw its frames after the video codec. CALIBRATION.md
measured that at 128 px H.264 crf 23 moves pixels by ~4.8/255 on average and that a policy
trained on decoded frames and evaluated on raw renders fell from 0.49 to 0.04 success.

How: each episode is one video stream, encoded frame by frame with the corpus's codec, crf,
pixel format and keyframe interval (the LeRobot writer's gop 2), and each packet is decoded at
once. The corpus encoder looked ahead (x264's rc-lookahead and mb-tree); a closed loop cannot
see future frames, so the stream runs with the codec's zero-latency tuning. Measured on three
expert episodes at 128 px (libx264 crf 23 yuv420p g 2): raw vs corpus-decoded differ by 4.2-4.4
mean / 31-32 99th-percentile absolute error; raw vs this round trip 3.9-4.2 / 28-29; round trip
vs corpus-decoded 2.6-2.7 / 20 (single-frame intra encodes at the same crf: 5.4 / 40 vs raw).
Codecs without a zero-latency mode (no packet after a frame) fall back to encoding each frame
alone as a keyframe (``mode: intra``). Frames are bitwise reproducible for a given episode.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..runs import StageError

TRAINING_FRAMES_FILE = "training_frames.json"  # in a policy directory: how its training frames were made (midtrain vla)
# LeRobot's info.json names the codec (``video.codec``); the encoder that writes it here.
ENCODER_OF = {"h264": "libx264", "avc1": "libx264", "hevc": "libx265", "av1": "libsvtav1", "vp9": "libvpx-vp9",
              "ffv1": "ffv1"}  # fmt: skip
RGB_PIX_FMTS = ("rgb24", "bgr24", "bgr0")
LOW_LATENCY = {"libx264": {"tune": "zerolatency"}, "libx264rgb": {"tune": "zerolatency"},
               "libx265": {"tune": "zerolatency", "x265-params": "log-level=error"}}
DECODERS = {"av1": ("libdav1d", "libaom-av1", "av1")}


@dataclass(frozen=True)
class CodecSpec:
    """A resolved codec round trip: encoder, crf (None: the encoder's own rate control), pixel
    format, keyframe interval, frame rate, and where the values came from."""

    encoder: str
    crf: Optional[int]
    pix_fmt: str
    gop: int
    fps: float
    source: str

    def to_dict(self) -> dict:
        return {"encoder": self.encoder, "crf": self.crf, "pix_fmt": self.pix_fmt, "gop": self.gop, "fps": self.fps,
                "source": self.source}  # fmt: skip


def resolve_codec(settings: Any, corpus_video: Optional[dict], fps: float) -> CodecSpec:
    """Codec settings: explicit ``codec.*`` settings, else the corpus's ``info.json`` video info
    (``corpus_video``), else the LeRobot writer's defaults (libx264, its crf, yuv420p)."""
    from ..data.lerobot import DEFAULT_CRF, DEFAULT_PIX_FMT, STORED_PIX_FMT, WRITER_DEFAULT_ENCODER, encoder_problem

    info = corpus_video or {}
    encoder = settings.name
    source = "settings" if encoder else "writer defaults"
    pix_fmt = settings.pix_fmt or info.get("video.pix_fmt") or "yuv420p"
    if not encoder and info.get("video.codec"):
        codec = str(info["video.codec"]).lower()
        encoder = ENCODER_OF.get(codec)
        if codec == "h264" and (pix_fmt in RGB_PIX_FMTS or pix_fmt == STORED_PIX_FMT["libx264rgb"]):
            encoder = "libx264rgb"
        if encoder is None:
            raise StageError(f"corpus video codec {codec!r} has no known encoder here; set codec.name (e.g. libx264)")
        if not settings.pix_fmt and STORED_PIX_FMT.get(encoder) == pix_fmt:
            pix_fmt = DEFAULT_PIX_FMT[encoder]  # info.json records the stored format (planar GBR); encode from RGB
        source = "corpus"
    encoder = encoder or WRITER_DEFAULT_ENCODER
    crf = settings.crf if settings.crf is not None else info.get("video.crf", DEFAULT_CRF.get(encoder))
    problem = encoder_problem(encoder, pix_fmt)
    if problem:
        raise StageError(f"codec.{'name' if problem[0] == 'encoder' else 'pix_fmt'}: {problem[1]}")
    return CodecSpec(encoder, None if crf is None else int(crf), pix_fmt, int(settings.gop), float(fps), source)


def corpus_video_info(corpus: Path) -> tuple[Path, dict]:
    """``(info.json path, info)`` of a LeRobot dataset folder, a run directory (its
    ``sim_collect/lerobot``) or a ``sim_collect`` stage folder."""
    corpus = Path(corpus)
    for candidate in (corpus, corpus / "lerobot", corpus / "sim_collect" / "lerobot"):
        path = candidate / "meta" / "info.json"
        if path.is_file():
            try:
                return path, json.loads(path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise StageError(f"{path}: not readable JSON ({exc})") from None
    raise StageError(
        f"corpus: {corpus} has no meta/info.json (nor lerobot/ or sim_collect/lerobot/ under it); pass a LeRobot "
        "dataset folder or the run directory of `midtrain sim collect`"
    )


def is_lossless(spec: CodecSpec) -> bool:
    """Whether the codec settings are lossless by construction (ffv1; libx264rgb at crf 0)."""
    from ..data.lerobot import NO_CRF

    return spec.encoder in NO_CRF or (spec.encoder == "libx264rgb" and spec.crf == 0)


def describe(spec: Optional[CodecSpec]) -> str:
    if spec is None:
        return "raw renders"
    return f"{spec.encoder} crf {spec.crf} {spec.pix_fmt}" + (" (lossless)" if is_lossless(spec) else "")


def read_training_frames(policy_dir: Path | str) -> Optional[dict]:
    """A policy directory's record of how its training frames were made (written by ``midtrain
    vla``; :func:`midtrain.vla.data.training_frames_record`), or None when it has none."""
    path = Path(policy_dir) / TRAINING_FRAMES_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: not readable JSON ({exc}); delete it to evaluate with corpus= instead") from None
    if not isinstance(record, dict) or not isinstance(record.get("sources"), list):
        raise StageError(f"{path}: expected {{camera_keys, image_size, sources: [...]}}; delete it to evaluate with corpus= instead")
    return {**record, "file": str(path)}


def recorded_video(record: dict, keys: list[str]) -> tuple[Optional[dict], Optional[float], Optional[str]]:
    """``(video info, fps, corpus path)`` of the first camera in ``keys`` whose training frames came
    from a LeRobot video (the first source that has it), else ``(None, None, None)``."""
    for key in keys:
        for source in record["sources"]:
            info = (source.get("video") or {}).get(key)
            if info is not None:
                return info, source.get("fps"), source.get("path")
    return None, None, None


class FrameCodec:
    """Per-episode frame round trip: ``reset()`` starts a new stream; ``codec(frame)`` returns
    the decoded uint8 [H, W, 3] frame. ``mode`` is ``stream`` or ``intra`` (see module docstring)."""

    def __init__(self, spec: CodecSpec, height: int, width: int):
        self.spec, self.height, self.width = spec, int(height), int(width)
        self.mode = "stream"
        self._encoder = self._decoder = None
        self._pts = 0

    def _contexts(self):
        import os

        import av

        os.environ.setdefault("SVT_LOG", "2")  # SVT-AV1 prints its configuration banner otherwise

        enc = av.CodecContext.create(self.spec.encoder, "w")
        enc.width, enc.height, enc.pix_fmt = self.width, self.height, self.spec.pix_fmt
        enc.time_base = 1 / Fraction(self.spec.fps).limit_denominator(1001)
        enc.framerate = Fraction(self.spec.fps).limit_denominator(1001)
        options = {"g": str(self.spec.gop), **LOW_LATENCY.get(self.spec.encoder, {})}
        if self.spec.crf is not None:
            options["crf"] = str(self.spec.crf)
        enc.options = options
        dec = None
        name = av.codec.Codec(self.spec.encoder, "w").canonical_name
        for candidate in DECODERS.get(name, (name,)):
            try:
                dec = av.CodecContext.create(candidate, "r")
                dec.width, dec.height = self.width, self.height  # some decoders (ffv1) need the size up front
                break
            except Exception:
                continue
        if dec is None:
            raise StageError(f"PyAV has no decoder for {name} (the output of {self.spec.encoder})")
        return enc, dec

    def reset(self) -> None:
        self._encoder, self._decoder = self._contexts() if self.mode == "stream" else (None, None)
        self._pts = 0

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        import av

        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if self.mode == "stream":
            if self._encoder is None:
                self.reset()
            vf.pts = self._pts
            self._pts += 1
            packets = self._encoder.encode(vf)
            if len(packets) == 1:
                if self._pts == 1 and self._encoder.extradata:  # codec configuration (ffv1, ...)
                    self._decoder.extradata = self._encoder.extradata
                decoded = self._decoder.decode(packets[0])
                if len(decoded) == 1:
                    return decoded[0].to_ndarray(format="rgb24")
            if self._pts > 1:
                raise StageError(f"{self.spec.encoder}: the stream stopped returning one packet per frame")
            self.mode = "intra"  # this encoder buffers frames: encode each frame alone from now on
            self._encoder = self._decoder = None
        enc, dec = self._contexts()
        vf.pts = 0
        packets = list(enc.encode(vf)) + list(enc.encode(None))
        if enc.extradata:
            dec.extradata = enc.extradata
        frames = [f for p in packets for f in dec.decode(p)] + list(dec.decode(None))
        if not frames:
            raise StageError(f"{self.spec.encoder}: a single frame encoded to nothing decodable")
        return frames[0].to_ndarray(format="rgb24")
