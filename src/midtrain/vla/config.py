"""``VLAConfig``: the config of ``midtrain vla`` (a light import, for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, Device, Settings, StageConfig, option
from ..eval.config import EvalSettings
from ..policy.configuration import LoraSettings, PolicySettings
from ..train.settings import TrainSettings


@dataclass
class VLADataSettings(Settings):
    """Where the robot data comes from and how it is split.

    Either ``lerobot`` (a LeRobot v3.0 / v2.1 dataset directory, read natively) or the catalog
    (``catalog``, default ``<run>/catalog``) with its VLA ``sources``. Episodes, not frames, are
    held out for validation.
    """

    lerobot: Optional[Path] = option(None, "a LeRobot dataset directory (v3.0 or v2.1) to train on")
    catalog: Optional[Path] = option(None, "a catalog directory (default: <run>/catalog) when lerobot is not given")
    sources: list[str] = option(factory=list, help="catalog VLA sources to train on (empty: every VLA source)")
    cameras: Optional[list[str]] = option(None, "camera keys, in the order the model sees them (null: every camera of the data)")
    episodes: Optional[list[int]] = option(None, "lerobot: only these episode indices")
    frame_stride: int = option(1, "lerobot: keep every k-th frame of each episode")
    val_fraction: float = option(0.1, "fraction of episodes held out for validation (at least one when > 0)")
    min_episode_length: Optional[int] = option(
        None, "episodes with fewer frames are bad input (null: the policy's chunk_size)"
    )

    def validate(self) -> None:
        if self.lerobot is not None and (self.catalog is not None or self.sources):
            raise ConfigError("data.lerobot: give a LeRobot dataset or catalog/sources, not both")
        if self.lerobot is None and (self.episodes is not None or self.frame_stride != 1):
            raise ConfigError("data.episodes / data.frame_stride: only apply to data.lerobot (the catalog fixed them)")
        if self.frame_stride < 1:
            raise ConfigError(f"data.frame_stride: must be >= 1, got {self.frame_stride}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"data.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.cameras is not None and not self.cameras:
            raise ConfigError("data.cameras: at least one camera (or null for every camera)")
        if self.min_episode_length is not None and self.min_episode_length < 1:
            raise ConfigError(f"data.min_episode_length: must be >= 1, got {self.min_episode_length}")


@dataclass
class BackboneSettings(Settings):
    """Which parts of the VLM train, and how it is loaded."""

    trainable: Literal["full", "lora", "frozen"] = option(
        "lora", "full fine-tuning, LoRA adapters on the language model, or frozen (a head-only probe; features computed once per sample)"
    )
    vision: Literal["frozen", "trainable"] = option("frozen", "the vision tower trains (full and lora) or stays frozen")
    lora: LoraSettings = option(factory=LoraSettings, help="LoRA settings (trainable: lora)")
    dtype: Literal["float32", "bfloat16", "float16"] = option(
        "float32", "dtype the backbone's weights are loaded in (training autocasts per train.precision)"
    )
    attn_implementation: str = option("sdpa", "attention kernel (sdpa, eager, flash_attention_2, ...)", throughput=True)
    trust_remote_code: bool = option(False, "allow custom model code from the checkpoint's repository")

    def validate(self) -> None:
        if self.trainable == "frozen" and self.vision == "trainable":
            raise ConfigError("backbone.vision: trainable contradicts backbone.trainable: frozen")


@dataclass
class VLAConfig(StageConfig):
    """Config of ``midtrain vla``: train a VLA policy (VLM backbone + action head) on robot data.

    The backbone is ``model`` (any ``AutoModelForImageTextToText`` checkpoint: a hub id, a local
    directory, the demo VLM, or an ``sft`` output), or the policy checkpoint ``init_policy`` to
    continue from: its ``policy`` settings (head, chunking), normalisation statistics, cameras and
    dimensions are kept, and the data must match them.
    """

    name: str = option("vla", "stage folder in the run directory (several policies can share a run)")
    model: str = option("", "backbone VLM: hub id, local directory or an sft output (required unless init_policy)")
    init_policy: Optional[Path] = option(None, "a VLA policy checkpoint to continue training from")
    data: VLADataSettings = option(factory=VLADataSettings, help="robot data and the validation split")
    policy: PolicySettings = option(factory=PolicySettings, help="head, chunking, normalisation")
    backbone: BackboneSettings = option(factory=BackboneSettings, help="trainable parts of the VLM")
    train: TrainSettings = option(factory=TrainSettings, help="optimisation settings")
    closed_loop_every: int = option(
        0, "closed-loop success rate (midtrain eval's protocol, closed_loop.*) every N steps and after the last; 0: off"
    )
    closed_loop: EvalSettings = option(
        factory=EvalSettings, help="closed-loop evaluation during training (closed_loop.corpus defaults to data.lerobot)"
    )
    device: Device = option("auto", "auto (GPU if visible), cpu or cuda; under accelerate launch, one GPU per process", throughput=True)
    feature_batch_size: int = option(16, "samples per backbone pass when a frozen backbone's features are precomputed", throughput=True)

    def validate(self) -> None:
        if not self.model and self.init_policy is None:
            raise ConfigError("model: required (a VLM hub id or directory), or init_policy: a policy checkpoint to continue")
        if self.model and self.init_policy is not None:
            raise ConfigError("init_policy: give a backbone model or a policy to continue, not both")
        if not self.name or "/" in self.name or self.name.startswith(".") or self.name != self.name.strip():
            raise ConfigError(f"name: {self.name!r} must be a folder name without '/' or a leading '.'")
        if self.closed_loop_every < 0:
            raise ConfigError(f"closed_loop_every: must be >= 0, got {self.closed_loop_every}")
        if self.feature_batch_size < 1:
            raise ConfigError(f"feature_batch_size: must be >= 1, got {self.feature_batch_size}")
        if self.policy.head == "tokens" and self.backbone.trainable == "frozen":
            raise ConfigError(
                "backbone.trainable: frozen cannot train the tokens head (its predictions are the backbone's own "
                "next-token outputs); use lora or full, or head: mlp / flow for a frozen probe"
            )
