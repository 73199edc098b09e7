"""Builders for the ETC tests: a synthetic episode with a known camera, and LeRobot datasets
without simulator ground truth. (A uniquely named module, importable from the tests.)"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from midtrain.data.calibration import CameraCalibration, calibration_json

W = H = 64
FOCAL = 50.0
# A camera 1 m above the world origin looking straight down: image right = world +x, image up = world +y.
INTRINSICS = np.array([FOCAL, FOCAL, W / 2, H / 2])
EXTRINSICS = np.array([[1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, -1.0, 1.0]])


def pixel_of(point) -> tuple[float, float]:
    """The independent pinhole oracle for the overhead camera: (u, v) of a world point."""
    x, y, z = point
    depth = 1.0 - z
    return W / 2 + FOCAL * x / depth, H / 2 - FOCAL * y / depth


def episode(T: int = 40, names=("puck",), goal_name="goal position", verb="grasp", target="object", **fields):
    """An :class:`EpisodeFields` with the overhead camera; ``fields`` override the defaults."""
    from midtrain.etc.fields import EpisodeFields, TaskNames

    t = np.arange(T)
    base = {
        "action": np.stack([np.sin(t / 5), np.cos(t / 5), -t / T, np.where(t >= T // 2, 1.0, -1.0)], axis=1),
        "ee_pos": np.stack([0.1 - 0.005 * t, 0.05 + 0.0 * t, 0.3 - 0.005 * t], axis=1),
        "gripper_opening": np.where(t < T // 2, 1.0, np.maximum(0.3, 1.0 - 0.1 * (t - T // 2))),
        "gripper_command": np.where(t >= T // 2, 1.0, -1.0),
        "contact": t >= T // 2 + 8,
        "objects": np.tile(np.array([[[-0.1, 0.05, 0.0]]]), (T, 1, 1)),
        "goal": np.tile(np.array([[0.2, -0.1, 0.1]]), (T, 1)),
        "intrinsics": np.tile(INTRINSICS, (T, 1)),
        "extrinsics": np.tile(EXTRINSICS, (T, 1, 1)),
    }
    base.update(fields)
    base = {k: v for k, v in base.items() if v is not None}
    return EpisodeFields(0, "pick up the puck", t, t / 10.0, base, TaskNames(list(names), goal_name, verb, target))


def context(config=None, seed: int = 0):
    from midtrain.etc.config import EtcConfig
    from midtrain.etc.generators import Context

    return Context(config or EtcConfig(), W, H, np.random.default_rng(seed), Counter())


def plain_dataset(root: Path, episodes: int = 2, T: int = 30, ee_in_state: bool = True) -> None:
    """A LeRobot dataset as a lab might have it: frames, a state whose first three entries are the
    end effector (metres) and a gripper command in the action - no objects, no calibration."""
    from midtrain.data.lerobot import LeRobotDatasetWriter

    cam = "observation.images.top"
    with LeRobotDatasetWriter(root, fps=10, robot_type="arm", cameras={cam: (H, W)}, state_dim=4, action_dim=4,
                              state_names=["x", "y", "z", "gripper"], action_names=["dx", "dy", "dz", "grip"]) as w:  # fmt: skip
        for e in range(episodes):
            t = np.arange(T)
            frames = np.zeros((T, H, W, 3), dtype=np.uint8)
            frames[..., 0] = (t * 8)[:, None, None]
            # the end effector sweeps along x; with the overhead camera it leaves the image (x >= 0.64) at t >= 22
            ee = np.stack([-0.2 + 0.04 * t, 0.0 * t + 0.1 * e, 0.0 * t], axis=1)
            state = np.concatenate([ee, np.ones((T, 1))], axis=1)
            action = np.stack([np.full(T, 0.03), np.zeros(T), np.zeros(T), np.where(t > T // 2, 1.0, -1.0)], axis=1)
            w.add_episode({cam: frames}, state, action, f"sweep the table {e}")


def write_calibration(path: Path, camera: str = "observation.images.top") -> Path:
    cal = CameraCalibration(camera, W, H, INTRINSICS, EXTRINSICS)
    path.write_text(json.dumps(calibration_json([cal], "test world: metres")))
    return path
