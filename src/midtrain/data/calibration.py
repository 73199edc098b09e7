"""Camera calibration of a robot dataset: how world points map to image pixels.

One convention for every writer and reader in midtrain (``sim collect`` records it,
``midtrain etc`` projects with it)::

    intrinsics  (fx, fy, cx, cy)      pixels
    extrinsics  [R | t]  3 x 4        world -> camera, row-major; camera axes as OpenCV's:
                                      x right, y down, z forward (along the view), in metres
    X_c = R X_w + t ;  u = fx X_c/Z_c + cx ;  v = fy Y_c/Z_c + cy   (Z_c = depth, metres)

Pixel coordinates are continuous in the image as stored (upright): ``(0, 0)`` is the top-left
corner of the top-left pixel and pixel (row i, column j) covers ``[j, j+1) x [i, i+1)``, so the
image centre is ``(W/2, H/2)`` and a point lies in the image iff ``0 <= u < W`` and ``0 <= v < H``.

In a LeRobot dataset the calibration is ``meta/calibration.json``::

    {"convention": "...", "world_frame": "...",
     "cameras": {"observation.images.corner": {
         "width": 128, "height": 128,
         "intrinsics": [fx, fy, cx, cy], "extrinsics": [[...4], [...4], [...4]],   # frame 0 / static
         "intrinsics_feature": "observation.cameras.corner.intrinsics",           # per frame, [4]
         "extrinsics_feature": "observation.cameras.corner.extrinsics",           # per frame, [12]
         "static": true}}}

Per-frame features (moving cameras: wrist views, a pan-tilt head) take precedence over the
static values; a dataset recorded elsewhere can supply the same JSON for a calibrated static
camera.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..runs import StageError

CALIBRATION_FILE = "meta/calibration.json"
CONVENTION = (
    "intrinsics (fx, fy, cx, cy) in pixels; extrinsics [R|t] 3x4 row-major, world -> camera, OpenCV axes "
    "(x right, y down, z forward), metres; pixel (row i, col j) covers [j, j+1) x [i, i+1) of the upright image"
)
INTRINSICS_NAMES = ["fx", "fy", "cx", "cy"]
EXTRINSICS_NAMES = [f"{'r' if c < 3 else 't'}{r}{c if c < 3 else ''}" for r in range(3) for c in range(4)]


# Image points in answers: (u/W, v/H) with three decimals, the RoboPoint / RefSpatial format.
SHORT_POINT_FORMAT = "Answer with points (x, y) normalized to [0, 1]."
POINT_FORMAT = (
    "Your answer should be formatted as a list of tuples, i.e. [(x1, y1), (x2, y2), ...], where each tuple "
    "contains the x and y coordinates of a point satisfying the conditions above. The coordinates should be "
    "between 0 and 1, indicating the normalized pixel locations of the points in the image."
)


def format_points(pixels, width: int, height: int) -> str:
    """``[(u, v), ...]`` pixels -> ``"[(0.123, 0.456), ...]"`` normalised by the image size."""
    return "[" + ", ".join(f"({x / width:.3f}, {y / height:.3f})" for x, y in pixels) + "]"


def project_points(points: np.ndarray, intrinsics: np.ndarray, extrinsics: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """World points -> (pixels ``[..., 2]`` (u, v), depth ``[...]`` metres along the view).

    ``points`` ``[..., 3]``; ``intrinsics`` ``[4]`` or broadcastable ``[..., 4]``; ``extrinsics``
    ``[3, 4]`` or ``[..., 3, 4]`` (one per point, for per-frame calibration). Points at or behind
    the camera (depth <= 0) get NaN pixels.
    """
    points = np.asarray(points, dtype=np.float64)
    ext = np.asarray(extrinsics, dtype=np.float64)
    k = np.asarray(intrinsics, dtype=np.float64)
    cam = np.einsum("...ij,...j->...i", ext[..., :3], points) + ext[..., 3]
    depth = cam[..., 2]
    safe = np.where(depth > 1e-9, depth, np.nan)
    u = k[..., 0] * cam[..., 0] / safe + k[..., 2]
    v = k[..., 1] * cam[..., 1] / safe + k[..., 3]
    return np.stack([u, v], axis=-1), depth


def inside_image(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Boolean ``[...]``: the pixel lies in the image (NaN - behind the camera - does not)."""
    u, v = pixels[..., 0], pixels[..., 1]
    return (u >= 0) & (u < width) & (v >= 0) & (v < height)


@dataclass
class CameraCalibration:
    """One camera's calibration: image size, static values and the per-frame feature names (if any)."""

    camera: str
    width: int
    height: int
    intrinsics: Optional[np.ndarray] = None  # [4]
    extrinsics: Optional[np.ndarray] = None  # [3, 4]
    intrinsics_feature: Optional[str] = None
    extrinsics_feature: Optional[str] = None
    static: bool = True  # the camera does not move: the static values hold for every frame

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width, "height": self.height,
            "intrinsics": None if self.intrinsics is None else np.asarray(self.intrinsics).tolist(),
            "extrinsics": None if self.extrinsics is None else np.asarray(self.extrinsics).reshape(3, 4).tolist(),
            "intrinsics_feature": self.intrinsics_feature, "extrinsics_feature": self.extrinsics_feature,
            "static": self.static,
        }  # fmt: skip


def calibration_json(cameras: list[CameraCalibration], world_frame: str) -> dict[str, Any]:
    """The ``meta/calibration.json`` document for ``cameras``."""
    return {"convention": CONVENTION, "world_frame": world_frame, "cameras": {c.camera: c.to_json() for c in cameras}}


def load_calibration(path: Path) -> dict[str, CameraCalibration]:
    """Cameras of a calibration JSON (``meta/calibration.json`` or one supplied for a dataset)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise StageError(f"{path}: calibration file not found") from None
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: malformed JSON ({exc})") from None
    cameras = doc.get("cameras") if isinstance(doc, dict) else None
    if not isinstance(cameras, dict):
        raise StageError(f"{path}: expected an object with 'cameras' (camera feature -> calibration)")
    out = {}
    for name, cam in cameras.items():
        try:
            intr = cam.get("intrinsics")
            extr = cam.get("extrinsics")
            out[name] = CameraCalibration(
                camera=name, width=int(cam["width"]), height=int(cam["height"]),
                intrinsics=None if intr is None else np.asarray(intr, dtype=np.float64).reshape(4),
                extrinsics=None if extr is None else np.asarray(extr, dtype=np.float64).reshape(3, 4),
                intrinsics_feature=cam.get("intrinsics_feature"), extrinsics_feature=cam.get("extrinsics_feature"),
                static=bool(cam.get("static", True)),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise StageError(
                f"{path}: cameras.{name}: expected width, height, intrinsics [fx, fy, cx, cy] and extrinsics "
                f"3x4 (or their per-frame feature names): {type(exc).__name__}: {exc}"
            ) from None
    return out
