"""``VLAConfig``: the config of ``midtrain vla`` (a light import, for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from ..config import ConfigError, Device, Settings, StageConfig, option
from ..data.sources import DatasetSource
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
class CoTrainSettings(Settings):
    """Objective Bridging (etc-two-bridges): action training co-trained with ETC / VQA next-token batches.

    Every action micro-batch of ``train.batch_size`` samples is accompanied by a VQA micro-batch of
    ``max(1, round(batch_share x batch_size))`` samples (25% by default), forward and backward
    separately, accumulated into the same optimizer step; the step's loss is
    ``L_action + loss_weight x L_vqa``, ``L_vqa`` the backbone's next-token cross-entropy on the
    answer tokens (sft's labels). VQA samples are drawn from the sources by weight, each source
    visited in epochs of its own (:class:`midtrain.train.WeightedBatches`).
    """

    etc: Union[str, dict[str, float]] = option(
        "", "ETC domains to co-train on: 'etc:all', 'etc_target:grounding+egocentric', or {reference: share} "
        "(e.g. {'etc_target:all': 0.94, 'etc_ood:all': 0.06}); empty with no datasets: no co-training"
    )
    datasets: list[DatasetSource] = option(factory=list, help="other VQA datasets to co-train on (catalog source syntax, kind vlm)")
    weights: dict[str, float] = option(
        factory=dict, help="source -> sampling weight in the VQA stream (default: the ETC shares, even over each "
        "reference's domains; datasets alone: by size)"
    )
    batch_share: float = option(0.25, "VQA samples per action micro-batch, as a fraction of train.batch_size (at least 1)")
    loss_weight: float = option(1.0, "lambda: a step's loss is L_action + lambda L_vqa")
    max_length: int = option(2048, "tokens per VQA sample (image tokens included)")
    overlong: Literal["truncate", "skip"] = option("truncate", "longer VQA samples: cut the text tail, or skip (counted)")
    val_fraction: float = option(0.02, "held-out VQA samples per source (eval_loss_vqa)")
    prepare_workers: int = option(0, "processes that tokenize VQA samples to measure them once before training (0: "
                                  "inline, the default: a forked worker hung once in the test suite, after other training in the process)", throughput=True)  # fmt: skip

    @property
    def enabled(self) -> bool:
        return bool(self.etc) or bool(self.datasets)

    def validate(self) -> None:
        if self.etc:
            from ..etc.compositions import parse_spec

            parse_spec(self.etc, "cotrain.etc")
        if not 0 < self.batch_share <= 4:
            raise ConfigError(f"cotrain.batch_share: must be in (0, 4], got {self.batch_share}")
        if not self.loss_weight > 0:
            raise ConfigError(f"cotrain.loss_weight: must be > 0, got {self.loss_weight}")
        if self.max_length < 8:
            raise ConfigError(f"cotrain.max_length: must be >= 8, got {self.max_length}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"cotrain.val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.prepare_workers < 0:
            raise ConfigError(f"cotrain.prepare_workers: must be >= 0, got {self.prepare_workers}")
        for name, w in self.weights.items():
            if not w >= 0:
                raise ConfigError(f"cotrain.weights.{name}: must be >= 0, got {w}")
        if self.weights and not sum(self.weights.values()) > 0:
            raise ConfigError("cotrain.weights: at least one weight must be > 0")
        if self.etc and self.datasets and not self.weights:
            raise ConfigError("cotrain.weights: required when cotrain.etc and cotrain.datasets are both given "
                              "(name each source's weight, the ETC domains as <folder>_<slug>)")  # fmt: skip
        names = [d.name for d in self.datasets]
        for i, d in enumerate(self.datasets):
            for key, message in d.problems():
                raise ConfigError(f"cotrain.datasets[{i}].{key}: {message}")
            if d.kind != "vlm":
                raise ConfigError(f"cotrain.datasets[{i}].kind: co-training data is VQA (kind: vlm), got {d.kind!r}")
            if names.index(d.name) != i:
                raise ConfigError(f"cotrain.datasets[{i}].name: duplicate source name {d.name!r}")


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
    cotrain: CoTrainSettings = option(factory=CoTrainSettings, help="ETC / VQA co-training (Objective Bridging)")
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
        if self.cotrain.enabled and self.backbone.trainable == "frozen":
            raise ConfigError("cotrain: a frozen backbone has nothing for the VQA loss to train; use backbone.trainable: lora or full")
        if self.policy.head_class.predicts_with_language_model and self.backbone.trainable == "frozen":
            raise ConfigError(
                f"backbone.trainable: frozen cannot train the {self.policy.head} head (its predictions are the backbone's own "
                "next-token outputs); use lora or full, or a head that reads the backbone (e.g. mlp, flow) for a frozen probe"
            )
