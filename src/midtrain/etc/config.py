"""Config of ``midtrain etc``: which dataset, which generators, and where each needed field lives."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, Settings, StageConfig, option
from .generators import AXIS_WORDS, GENERATORS

# The seven capability domains of Rethinking VLA Initialization (Sec. 3.2): display name -> file slug.
DOMAINS: dict[str, str] = {
    "Spatial": "spatial",
    "Grounding": "grounding",
    "Plan & Reasoning": "plan_reasoning",
    "Camera Prediction": "camera_prediction",
    "Egocentric Understanding": "egocentric",
    "Temporal Understanding": "temporal",
    "Action-NTP": "action_ntp",
}
# The three ETC categories of etc-two-bridges (scene grounding -> task-oriented -> action-aligned planning).
CATEGORIES: tuple[str, ...] = ("scene_grounding", "task_oriented", "action_aligned")

_FIELD_SPEC = re.compile(r"^(?P<key>[^\[\]]+?)(\[(?P<lo>-?\d+)?(?P<colon>:)?(?P<hi>-?\d+)?\])?$")


def parse_field_spec(spec: str, key: str) -> tuple[str, Optional[slice]]:
    """``"feature"``, ``"feature[i]"`` or ``"feature[i:j]"`` -> (feature key, slice of its entries or None)."""
    m = _FIELD_SPEC.match(spec.strip())
    if not m or (m.group(0).endswith("]") and m.group("lo") is None and m.group("hi") is None):
        raise ConfigError(f"{key}: expected 'feature', 'feature[i]' or 'feature[i:j]', got {spec!r}")
    lo, hi = m.group("lo"), m.group("hi")
    if not m.group(0).endswith("]"):
        return m.group("key"), None
    if m.group("colon") is None:
        i = int(lo)
        return m.group("key"), slice(i, i + 1 if i != -1 else None)
    return m.group("key"), slice(None if lo is None else int(lo), None if hi is None else int(hi))


@dataclass
class EtcFields(Settings):
    """Where each quantity the generators use is found in the dataset: a feature key, optionally
    with entries (``observation.state[0:3]``). A missing feature disables only the generators
    that need it; ``""`` disables the quantity on purpose."""

    ee_pos: str = option("observation.ee_pos", "end-effector (tool centre) position [3], metres in the calibration's world frame")
    gripper_opening: str = option("observation.gripper_opening", "gripper opening [1], 1 = fully open, 0 = closed")
    gripper_command: str = option("action[3]", "gripper command [1]: its sign says close or open (see gripper_close_positive)")
    contact: str = option("observation.contact", "gripper touching an object [1], 0 or 1")
    objects: str = option("observation.object_pos", "task object positions [3K], metres, named by object_names")
    goal: str = option("observation.goal_pos", "task goal position [3], metres")

    def validate(self) -> None:
        for name in ("ee_pos", "gripper_opening", "gripper_command", "contact", "objects", "goal"):
            value = getattr(self, name)
            if value:
                parse_field_spec(value, f"fields.{name}")


@dataclass
class EtcConfig(StageConfig):
    """``midtrain etc``: trajectory-coupled VQA (ETC) from a LeRobot dataset, as LLaVA JSON per domain.

    Every generator yields questions about one recorded frame (the image) whose answers come from
    the recorded ground truth; each sample carries its ETC category and Rethinking domain.
    """

    name: str = option("etc", "stage folder in the run directory (e.g. etc_target for a target split's ETC; "
                              "references like etc_target:all name it)")
    dataset: Optional[Path] = option(None, "LeRobot dataset folder (default: <run>/sim_collect/lerobot)")
    camera: Optional[str] = option(None, "camera feature whose frames are the images (default: the first camera)")
    calibration: Optional[Path] = option(
        None, "camera calibration JSON (default: <dataset>/meta/calibration.json; see midtrain.data.calibration)"
    )
    object_names: Optional[Path] = option(None, "object names per task JSON (default: <dataset>/meta/objects.json)")
    generators: list[str] = option(factory=list, help="generators to run (default: all): " + ", ".join(GENERATORS))
    domains: dict[str, str] = option(factory=dict, help="generator -> Rethinking domain, overriding the default tag")
    episodes: Optional[list[int]] = option(None, "only these episode indices (default: all)")
    frame_stride: int = option(4, "ask about every k-th frame of an episode")
    fields: EtcFields = option(factory=EtcFields, help="where each quantity lives in the dataset")
    axes: list[str] = option(
        factory=lambda: ["right", "forward", "up"],
        help="what the world frame's +x, +y, +z mean from the robot's view (Meta-World: right, forward, up)",
    )
    gripper_close_positive: bool = option(True, "a positive gripper command closes the gripper (Meta-World, most datasets)")
    direction_threshold_m: float = option(0.02, "offsets below this (metres) are not named as a direction")
    distance_buckets_m: list[float] = option(
        factory=lambda: [0.05, 0.15, 0.3], help="distance bucket edges in metres (ascending)"
    )
    margin_m: float = option(0.02, "'nearest object' is asked only when the runner-up is this much further (metres)")
    trajectory_points: int = option(4, "future end-effector keypoints per planning answer")
    trajectory_stride: int = option(5, "steps between successive future keypoints")
    gripper_horizon: int = option(10, "steps ahead for 'will the gripper open or close'")
    action_horizon: int = option(8, "actions per Action-NTP answer")
    action_decimals: int = option(2, "decimals of actions written as text")
    min_stage_steps: int = option(3, "task-stage runs shorter than this many steps merge into the previous stage")
    frame_order_gap: int = option(10, "minimum steps between the two frames of a temporal-order question")
    image_format: Literal["png", "jpeg"] = option("png", "how decoded video frames are written (png: lossless)")

    def validate(self) -> None:
        if not re.fullmatch(r"etc(_[A-Za-z0-9_.-]+)?", self.name):
            raise ConfigError(f"name: {self.name!r} must be 'etc' or start with 'etc_' (a folder name; ETC references find it by that prefix)")
        unknown = [g for g in self.generators if g not in GENERATORS]
        if unknown:
            raise ConfigError(f"generators: unknown generator {unknown[0]!r}; known: {', '.join(GENERATORS)}")
        for gen, domain in self.domains.items():
            if gen not in GENERATORS:
                raise ConfigError(f"domains.{gen}: unknown generator; known: {', '.join(GENERATORS)}")
            if domain not in DOMAINS:
                raise ConfigError(f"domains.{gen}: unknown domain {domain!r}; domains: {', '.join(DOMAINS)}")
        if (len(self.axes) != 3 or not set(self.axes) <= set(AXIS_WORDS)
                or len({frozenset((a, AXIS_WORDS[a])) for a in self.axes}) != 3):  # fmt: skip
            raise ConfigError(
                f"axes: expected three words for +x, +y, +z, one from each pair right/left, forward/backward, up/down; got {self.axes}"
            )
        if any(b <= a for a, b in zip(self.distance_buckets_m, self.distance_buckets_m[1:])) or not self.distance_buckets_m:
            raise ConfigError(f"distance_buckets_m: expected ascending positive edges, got {self.distance_buckets_m}")
        for key in ("frame_stride", "trajectory_points", "trajectory_stride", "gripper_horizon", "action_horizon",
                    "min_stage_steps", "frame_order_gap"):  # fmt: skip
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("direction_threshold_m", "margin_m"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.action_decimals <= 6:
            raise ConfigError(f"action_decimals: must be in [0, 6], got {self.action_decimals}")
