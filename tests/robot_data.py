"""Small robot datasets for policy tests: in-memory VLA catalog rows and LeRobot v3.0 directories.

A plain module (not ``conftest``), importable from any test folder: ``from robot_data import robot_rows``.
Frames show a bright square whose position moves with the episode's actions, so a policy has
something to read; actions are 4-D like Meta-World's (xyz delta + a +-1 gripper).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper_effort"]
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_opening"]
CAMERA = "observation.images.corner"
INSTRUCTIONS = ["pick up the red block", "open the top drawer", "push the green button"]


def episode(e: int, length: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(frames uint8 [T, size, size, 3], state [T, 4], action [T, 4])`` of episode ``e``."""
    rng = np.random.default_rng(seed * 1000 + e)
    action = np.concatenate([rng.uniform(-1, 1, (length, 3)), np.where(np.arange(length) >= length // 2, 1.0, -1.0)[:, None]], 1)
    state = np.concatenate([np.cumsum(action[:, :3], 0) * 0.1, (action[:, 3:] + 1) / 2], 1)
    frames = np.full((length, size, size, 3), 30, dtype=np.uint8)
    for t in range(length):
        x, y = (np.clip((state[t, :2] + 1) / 2, 0, 0.8) * size).astype(int)
        frames[t, y : y + size // 5, x : x + size // 5] = (255, 200 * (e % 2), 60)
    return frames, state.astype(np.float32), action.astype(np.float32)


def robot_rows(episodes: int = 2, length: int = 6, chunk: int = 4, size: int = 32, seed: int = 0, source: str = "robot") -> list[dict]:
    """VLA catalog rows (PNG images, chunks padded at the episode end with the mask False)."""
    from midtrain.data.images import encode_image
    from midtrain.data.lerobot import action_chunks

    rows = []
    for e in range(episodes):
        frames, state, action = episode(e, length, size, seed)
        chunks, mask = action_chunks(action, np.arange(length), chunk)
        for t in range(length):
            rows.append({
                "id": f"{source}/{e}/{t}", "source": source, "kind": "vla",
                "image_refs": [{"path": None, "bytes": encode_image(frames[t])}], "instruction": INSTRUCTIONS[e % 3],
                "episode": e, "frame": t, "state": state[t].tolist(), "action": chunks[t].tolist(),
                "action_mask": mask[t].tolist(), "origin": f"{source} episode {e} frame {t}",
            })  # fmt: skip
    return rows


def write_lerobot(root: Path, episodes: int = 4, length: int = 8, size: int = 32, seed: int = 0,
                  nan_action: tuple[int, int] | None = None) -> Path:  # fmt: skip
    """A LeRobot v3.0 dataset (H.264 at crf 10); ``nan_action=(episode, frame)`` puts a NaN there."""
    from midtrain.data.lerobot import LeRobotDatasetWriter

    with LeRobotDatasetWriter(root, fps=10, robot_type="sawyer", cameras={CAMERA: (size, size)}, state_dim=4, action_dim=4,
                              state_names=STATE_NAMES, action_names=ACTION_NAMES, crf=10) as w:  # fmt: skip
        for e in range(episodes):
            frames, state, action = episode(e, length, size, seed)
            if nan_action is not None and nan_action[0] == e:
                action[nan_action[1], 1] = np.nan
            w.add_episode(frames={CAMERA: frames}, state=state, action=action, task=INSTRUCTIONS[e % 3])
    return root


def policy_config(head: str, rows: list[dict], chunk: int = 4, n_action_steps: int | None = None, **settings):
    """A :class:`midtrain.policy.PolicyConfig` for ``rows`` (statistics from their valid steps)."""
    from midtrain.policy import PolicyConfig, PolicySettings, compute_stats

    steps = np.concatenate([np.asarray(r["action"])[np.asarray(r["action_mask"])] for r in rows])
    stats = {"action": compute_stats(steps), "state": compute_stats(np.asarray([r["state"] for r in rows]))}
    s = PolicySettings(head=head, chunk_size=chunk, n_action_steps=n_action_steps, **settings)
    return PolicyConfig(settings=s, action_dim=4, action_names=ACTION_NAMES, state_dim=4, state_names=STATE_NAMES,
                        camera_keys=[CAMERA], image_size=[32, 32], gripper_dims=[3], normalization_stats=stats)  # fmt: skip


def observation(t: int = 0, e: int = 0, size: int = 32) -> dict:
    """One live observation in the evaluator's format."""
    frames, state, _ = episode(e, max(t + 1, 2), size)
    return {CAMERA: frames[t], "observation.state": state[t], "task": INSTRUCTIONS[e % 3]}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """One torch thread per test module: the suite shares a small, busy machine, where two OpenMP
    threads per process mostly wait for each other. (Imported by the policy and vla conftests.)"""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
