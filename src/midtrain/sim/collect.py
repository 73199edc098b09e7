"""``midtrain sim collect``: a robot (VLA) corpus from Meta-World scripted experts, written as
a LeRobot v3.0 dataset in ``<run>/sim_collect/lerobot/``.

For every task, ``episodes_per_task`` episodes start from seeded random initial states and
run the task's scripted policy until Meta-World reports success or ``max_steps`` pass. Every
step records the upright camera frame, the proprioceptive state (hand xyz, gripper opening),
the executed action and the simulator's ground truth (extra LeRobot features, see
``metaworld_env.ground_truth_features``: end-effector position, gripper opening, gripper-object
contact, the task's object and goal positions, the camera's intrinsics and extrinsics); the
calibration and the names of each task's objects also go to ``meta/calibration.json`` and
``meta/objects.json``. Only successful episodes are written, and the per-task success
rate goes into the manifest.

Frames are stored losslessly by default (H.264 ``libx264rgb`` at crf 0: decoded frames equal
the renders bit for bit), because a policy trained on lossy decoded frames fails on raw renders
(CALIBRATION.md: H.264 crf 23 took success from 0.49 to 0.04); ``benchmarks/sim_codec.py``
measures the options. Episodes are rendered in parallel worker processes; each
episode's seed depends only on (seed, task, episode index), so the dataset is the same
whatever the number of workers. An interrupted run starts the dataset over (a LeRobot
dataset is written in one pass).
"""

from __future__ import annotations

import contextlib
import difflib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np

from ..config import ConfigError, StageConfig, option
from ..runs import RunDir, StageError, stage_run
from .metaworld_env import (
    ACTION_NAMES, CAMERAS, DEFAULT_TASKS, MAX_EPISODE_STEPS, STATE_NAMES, TASK_INSTRUCTIONS, TASK_OBJECTS,
    WORLD_FRAME, CameraView, Episode, ensure_gl_backend, episode_seed, ground_truth_features, make_env, make_policy,
    run_episode,
)  # fmt: skip
from .parallel import map_in_workers

STAGE = "sim_collect"
DATASET_DIR = "lerobot"


@dataclass
class SimCollectConfig(StageConfig):
    """Which Meta-World tasks to record, how many episodes, and how frames are rendered.
    ``random`` and ``zero`` policies are baselines that (almost) never succeed."""

    tasks: list[str] = option(factory=lambda: list(DEFAULT_TASKS), help="Meta-World v3 tasks to record")
    episodes_per_task: int = option(4, "episodes recorded per task")
    max_steps: int = option(200, "most steps per episode (Meta-World's limit at most)")
    camera: str = option("corner", "the Meta-World camera the frames are rendered from")
    width: int = option(128, "frame width, pixels (even)")
    height: int = option(128, "frame height, pixels (even)")
    policy: Literal["expert", "random", "zero"] = option("expert", "who acts: the scripted expert (a corpus), or a random / zero baseline")
    workers: int = option(2, "rendering processes (0 or 1: this process; more: spawned, see midtrain.sim.parallel)", throughput=True)
    video_codec: str = option(
        "libx264rgb", "a video encoder PyAV has: libx264rgb (lossless H.264, decoded == rendered), libx264, libsvtav1, ..."
    )
    crf: Optional[int] = option(None, "the encoder's quality (null: the codec's default; 0 = lossless for libx264rgb)")

    def validate(self) -> None:
        if not self.tasks:
            raise ConfigError("tasks: at least one Meta-World task is needed")
        unknown = [t for t in self.tasks if t not in TASK_INSTRUCTIONS]
        if unknown:
            close = difflib.get_close_matches(unknown[0], TASK_INSTRUCTIONS, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            known = ", ".join(sorted(TASK_INSTRUCTIONS))
            raise ConfigError(f"tasks: unknown Meta-World v3 task {unknown[0]!r}; {hint}known tasks: {known}")
        if len(set(self.tasks)) != len(self.tasks):
            repeated = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            raise ConfigError(f"tasks: listed more than once: {repeated}")
        if self.episodes_per_task < 1:
            raise ConfigError(f"episodes_per_task: must be >= 1, got {self.episodes_per_task}")
        if not 1 <= self.max_steps <= MAX_EPISODE_STEPS:
            raise ConfigError(
                f"max_steps: must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's episode limit), got {self.max_steps}"
            )
        if self.camera not in CAMERAS:
            raise ConfigError(f"camera: {self.camera!r} is not a Meta-World camera; choose one of {', '.join(CAMERAS)}")
        for key in ("width", "height"):
            value = getattr(self, key)
            if not 16 <= value <= 1024 or value % 2:
                raise ConfigError(
                    f"{key}: must be an even number of pixels in [16, 1024] (video is yuv420p), got {value}"
                )
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0 (0 or 1 renders in this process), got {self.workers}")


@dataclass(frozen=True)
class EpisodeJob:
    task: str
    index: int
    seed: int
    camera: str
    width: int
    height: int
    policy: str
    max_steps: int


_worker_env: dict = {}  # the current task's env and camera in this process (jobs arrive grouped by task)


def record_episode(job: EpisodeJob) -> Episode:
    """Run one episode job (in a worker process or in this one)."""
    key = (job.task, job.camera, job.width, job.height)
    if _worker_env.get("key") != key:
        if "view" in _worker_env:
            _worker_env["view"].close()
        env = make_env(job.task)
        _worker_env.update(key=key, env=env, view=CameraView(env.model, job.camera, job.width, job.height))
    policy = make_policy(job.task, job.policy, job.seed)
    return run_episode(_worker_env["env"], _worker_env["view"], policy, job.seed, job.max_steps, job.task, job.index)


def _close_worker_env() -> None:
    if "view" in _worker_env:
        _worker_env["view"].close()
    _worker_env.clear()


def collect_robot_corpus(config: SimCollectConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Record the episodes and write ``<run>/sim_collect/lerobot/``; returns the stage folder."""
    with stage_run(run_dir, STAGE, config, inputs=[], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        backend = ensure_gl_backend()
        jobs = [
            EpisodeJob(task, i, episode_seed(config.seed, task, i), config.camera, config.width, config.height,
                       config.policy, config.max_steps)
            for task in config.tasks
            for i in range(config.episodes_per_task)
        ]  # fmt: skip
        camera_key = f"observation.images.{config.camera}"
        dataset_dir = st.dir / DATASET_DIR
        if dataset_dir.exists():  # an interrupted attempt: the writer cannot append, so start over
            st.log.info("removing the incomplete dataset of an interrupted run: %s", dataset_dir)
            shutil.rmtree(dataset_dir)
        per_task = {t: {"episodes": 0, "succeeded": 0, "steps_of_successes": []} for t in config.tasks}
        frames_rendered, render_seconds, fps = 0, 0.0, None
        st.log.info(
            "recording %d episodes (%d tasks x %d) with %d worker(s), MUJOCO_GL=%s",
            len(jobs), len(config.tasks), config.episodes_per_task, config.workers, backend,
        )  # fmt: skip
        started = time.perf_counter()
        try:
            with contextlib.ExitStack() as stack:
                writer = None
                episodes = map_in_workers(record_episode, jobs, config.workers)
                for ep in st.progress(episodes, total=len(jobs), desc="sim collect", unit="episode"):
                    stats = per_task[ep.task]
                    stats["episodes"] += 1
                    st.counts["episodes_attempted"] += 1
                    frames_rendered += len(ep.frames)
                    render_seconds += ep.render_seconds
                    if not ep.success:
                        st.counts["episodes_failed"] += 1
                        st.log.info("dropped %s episode %d (seed %d): no success within %d steps",
                                    ep.task, ep.index, ep.seed, len(ep.frames))  # fmt: skip
                        continue
                    stats["succeeded"] += 1
                    stats["steps_of_successes"].append(len(ep.frames))
                    if writer is None:
                        from ..data.lerobot import LeRobotDatasetWriter

                        fps = ep.fps
                        writer = stack.enter_context(LeRobotDatasetWriter(
                            dataset_dir, fps=fps, robot_type="sawyer",
                            cameras={camera_key: (config.height, config.width)}, state_dim=len(STATE_NAMES),
                            action_dim=len(ACTION_NAMES), state_names=STATE_NAMES, action_names=ACTION_NAMES,
                            video_codec=config.video_codec, crf=config.crf,
                            extra_features=ground_truth_features(config.camera),
                            meta=dataset_meta(config, camera_key, ep),
                        ))  # fmt: skip
                    with st.timed("write"):
                        writer.add_episode(frames={camera_key: ep.frames}, state=ep.state, action=ep.action,
                                           task=TASK_INSTRUCTIONS[ep.task], extra=ep.ground_truth)  # fmt: skip
                    st.counts["episodes_kept"] += 1
                    st.counts["written"] += len(ep.frames)
                st.extra.update(_summary(per_task, frames_rendered, render_seconds, time.perf_counter() - started,
                                         backend, camera_key, fps, config))  # fmt: skip
                if writer is None:
                    raise StageError(
                        f"no episode succeeded (policy {config.policy!r}, max_steps {config.max_steps}); success per "
                        "task: " + ", ".join(f"{t} 0/{s['episodes']}" for t, s in per_task.items())
                        + ". Nothing was written; use policy=expert or raise max_steps."
                    )
        finally:
            if config.workers <= 1:
                _close_worker_env()
        for task, stats in per_task.items():
            st.log.info("%s: %d/%d episodes succeeded", task, stats["succeeded"], stats["episodes"])
    return st.dir


def dataset_meta(config: SimCollectConfig, camera_key: str, episode: Episode) -> dict:
    """``meta/calibration.json`` (the camera is fixed: its calibration at the first frame, and the
    per-frame features) and ``meta/objects.json`` (per task instruction: what its objects are called)."""
    from ..data.calibration import CameraCalibration, calibration_json

    truth = episode.ground_truth
    intrinsics_key, extrinsics_key = f"observation.cameras.{config.camera}.intrinsics", f"observation.cameras.{config.camera}.extrinsics"
    camera = CameraCalibration(
        camera_key, config.width, config.height, truth[intrinsics_key][0].astype(np.float64),
        truth[extrinsics_key][0].astype(np.float64).reshape(3, 4), intrinsics_key, extrinsics_key,
    )  # fmt: skip
    objects = {
        TASK_INSTRUCTIONS[task]: {"task": task, "objects": list(TASK_OBJECTS[task].objects), "goal": TASK_OBJECTS[task].goal,
                                  "verb": TASK_OBJECTS[task].verb, "target": TASK_OBJECTS[task].target}
        for task in config.tasks
    }  # fmt: skip
    return {
        "calibration.json": calibration_json([camera], WORLD_FRAME),
        "objects.json": {
            "description": "per task instruction: names of the observation.object_pos slots (object1, object2), "
            "what the goal position is (null: not a thing to point at), the verb at the interaction point and "
            "which point that is (object: object1; goal: the goal position)",
            "object_feature": "observation.object_pos", "goal_feature": "observation.goal_pos", "tasks": objects,
        },
    }  # fmt: skip


def _summary(per_task, frames, render_s, wall_s, backend, camera_key, fps, config) -> dict:
    """Manifest fields: success per task and overall, render speed, dataset layout."""
    success = {
        task: {
            "episodes": s["episodes"], "succeeded": s["succeeded"],
            "rate": round(s["succeeded"] / s["episodes"], 4) if s["episodes"] else 0.0,
            "mean_steps": round(float(np.mean(s["steps_of_successes"])), 1) if s["steps_of_successes"] else None,
            "instruction": TASK_INSTRUCTIONS[task],
        }
        for task, s in per_task.items()
    }  # fmt: skip
    attempted = sum(s["episodes"] for s in per_task.values())
    kept = sum(s["succeeded"] for s in per_task.values())
    return {
        "success": success,
        "success_rate": round(kept / attempted, 4) if attempted else 0.0,
        "render": {
            "gl_backend": backend, "camera": config.camera, "width": config.width, "height": config.height,
            "frames": frames, "render_s": round(render_s, 3),
            "fps_per_process": round(frames / render_s, 1) if render_s else None,
            "frames_per_wall_s": round(frames / wall_s, 1) if wall_s else None, "workers": config.workers,
        },
        "dataset": {"path": DATASET_DIR, "format": "lerobot v3.0", "fps": fps, "camera_key": camera_key,
                    "state_names": STATE_NAMES, "action_names": ACTION_NAMES, "video_codec": config.video_codec,
                    "ground_truth": list(ground_truth_features(config.camera))},
    }  # fmt: skip
