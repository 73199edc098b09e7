"""Settings of a closed-loop evaluation (light imports: ``midtrain eval --help`` reads them).

:class:`EvalSettings` is the protocol - the same for every policy compared: benchmark, tasks,
episodes per task, step limit, seed of the initial states, how observation frames are made.
:class:`EvalConfig` is the ``midtrain eval`` stage: those settings plus the checkpoint to run.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, Settings, StageConfig, option
from ..ray_cluster import Backend, RaySettings

BENCHMARKS = ("metaworld", "libero")
METAWORLD_DEFAULT_MAX_STEPS = 200  # what sim collect records with (CALIBRATION's protocol)
LIBERO_DEFAULT_SIZE = 256  # LeRobot's LIBERO environment and the HuggingFaceVLA/libero datasets
METAWORLD_DEFAULT_SIZE = 128  # sim collect's default frame size


def closest(name: str, known, what: str, key: str) -> ConfigError:
    """The one-line error for an unknown name, with the closest known names suggested."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
    listing = ", ".join(known) if len(known) <= 60 else ", ".join(known[:60]) + f", ... ({len(known)} in all)"
    return ConfigError(f"{key}: unknown {what} {name!r}; {hint}known: {listing}")


@dataclass
class CodecSettings(Settings):
    """The video codec round trip applied to each observation frame when ``frames: codec``."""

    name: Optional[str] = option(
        None, "PyAV encoder (libx264, libx264rgb, libx265, libsvtav1, ffv1, ...); default: the corpus's, else "
        "the LeRobot writer's default (libx264)")  # fmt: skip
    crf: Optional[int] = option(None, "constant rate factor; default: the corpus's, else the writer's default for the codec")
    pix_fmt: Optional[str] = option(None, "pixel format (yuv420p, yuv444p, ...); default: the corpus's, else yuv420p")
    gop: int = option(2, "keyframe interval, as the corpus was encoded (the LeRobot writer uses 2)")

    def validate(self) -> None:
        if self.crf is not None and not 0 <= self.crf <= 63:
            raise ConfigError(f"codec.crf: must be in [0, 63], got {self.crf}")
        if self.gop < 1:
            raise ConfigError(f"codec.gop: must be >= 1, got {self.gop}")


@dataclass
class EvalSettings(Settings):
    """The evaluation protocol. Every policy compared in a study runs under the same settings."""

    benchmark: Literal["metaworld", "libero"] = option("metaworld", "simulator benchmark: Meta-World v3 or LIBERO")
    tasks: list[str] = option(
        factory=list, help="task names: Meta-World v3 tasks (default: the 10 corpus tasks of sim collect) or tasks of "
        "the LIBERO suite (default: all of it)")  # fmt: skip
    suite: str = option("libero_10", "LIBERO suite (libero_10, libero_spatial, libero_object, libero_goal, libero_90, PRO variants)")
    episodes_per_task: int = option(10, "closed-loop episodes per task")
    max_steps: Optional[int] = option(
        None, "step limit per episode; default: 200 on Meta-World (as sim collect records), the suite's standard "
        "horizon on LIBERO (520 for libero_10)")  # fmt: skip
    seed: int = option(
        0, "seed of the episodes' initial states; Meta-World seeds are disjoint from every seed sim collect uses")
    corpus: Optional[Path] = option(
        None, "the LeRobot dataset the policy was trained on (or a run directory with sim_collect/): its camera "
        "keys, frame size and video codec define the observations; default: the policy directory's record of its "
        "training frames (training_frames.json)")  # fmt: skip
    camera: Optional[str] = option(
        None, "camera rendered when neither the policy nor the corpus names one (and for videos); default: "
        "corner (Meta-World), image = agentview (LIBERO)")  # fmt: skip
    height: Optional[int] = option(None, "frame height in pixels; default: the corpus's, else 128 (Meta-World) / 256 (LIBERO)")
    width: Optional[int] = option(None, "frame width in pixels; default: the corpus's, else 128 (Meta-World) / 256 (LIBERO)")
    frames: Optional[Literal["codec", "raw"]] = option(
        None, "codec: each frame goes through the corpus's video encode/decode, as the policy saw frames in "
        "training; raw: rendered pixels; default: as the policy directory records its training frames "
        "(training_frames.json), else codec")  # fmt: skip
    codec: CodecSettings = option(factory=CodecSettings, help="the frame codec round trip")
    videos_per_task: int = option(2, "MP4 videos of the first k episodes of each task")
    workers: int = option(2, "episode worker processes (0 or 1: this process); backend: ray: the groups of episodes "
                          "run as Ray tasks", throughput=True)  # fmt: skip
    backend: Backend = option("local", "where episodes run: local (this process or workers spawned processes) or "
                              "ray (workers groups as Ray tasks on a cluster; see ray)", throughput=True)  # fmt: skip
    ray: RaySettings = option(factory=RaySettings, help="backend: ray - the cluster; cpus_per_stage / gpus_per_stage: "
                              "what each group of episodes asks for (null: 1 CPU, 0 GPU)", throughput=True)  # fmt: skip
    fast_path: bool = option(
        True, "make a frame only when the policy reads it and drop the codec round trip once it decodes real frames "
        "unchanged (same frames, same outcomes); false: every camera through the codec at every step (the baseline "
        "of benchmarks/eval.py)", throughput=True)  # fmt: skip

    def validate(self) -> None:
        if self.benchmark == "metaworld":
            from ..sim.metaworld_env import MAX_EPISODE_STEPS, TASK_INSTRUCTIONS

            for task in self.tasks:
                if task not in TASK_INSTRUCTIONS:
                    raise closest(task, TASK_INSTRUCTIONS, "Meta-World v3 task", "tasks")
            if self.max_steps is not None and not 1 <= self.max_steps <= MAX_EPISODE_STEPS:
                raise ConfigError(
                    f"max_steps: must be in [1, {MAX_EPISODE_STEPS}] (Meta-World's episode limit), got {self.max_steps}"
                )
        elif self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"max_steps: must be >= 1, got {self.max_steps}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"tasks: listed more than once: {sorted({t for t in self.tasks if self.tasks.count(t) > 1})}")
        if self.episodes_per_task < 1:
            raise ConfigError(f"episodes_per_task: must be >= 1, got {self.episodes_per_task}")
        if self.videos_per_task < 0:
            raise ConfigError(f"videos_per_task: must be >= 0, got {self.videos_per_task}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0 (0 or 1 runs episodes in this process), got {self.workers}")
        if (self.height is None) != (self.width is None):
            raise ConfigError("height, width: give both or neither (the frame size)")
        for key in ("height", "width"):
            value = getattr(self, key)
            if value is not None and (not 16 <= value <= 1024 or value % 2):
                raise ConfigError(f"{key}: must be an even number of pixels in [16, 1024] (video is yuv420p), got {value}")


@dataclass
class EvalConfig(EvalSettings, StageConfig):
    """``midtrain eval``: run a policy checkpoint in closed loop under :class:`EvalSettings`.

    Episodes that raise or whose worker process dies are recorded as failed with the reason
    (``episodes.parquet``: ``failure``) whatever ``on_error`` says; the stage fails only when
    no episode ran at all.
    """

    policy: Optional[Path] = option(
        None, "policy checkpoint directory (a VLAPolicy save, or a scripted policy: see midtrain.eval.policies)")

    def validate(self) -> None:
        super().validate()
        if self.policy is None:
            raise ConfigError("policy: required - the checkpoint directory to evaluate (policy=DIR)")
