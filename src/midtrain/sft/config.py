"""``SFTConfig``: the config of ``midtrain sft`` (a light import, for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import ConfigError, Device, Settings, StageConfig, option
from ..data.sources import DatasetSource
from ..models.parts import LoraSettings
from ..train.settings import TrainSettings


@dataclass
class SFTLoraSettings(LoraSettings):
    """LoRA adapters (``mode: lora``), and whether the final model is also written merged."""

    merge: bool = option(True, "also write the final model with the adapter merged in (model/), loadable like any checkpoint")


@dataclass
class MixtureSettings(Settings):
    """A fixed-budget composition drawn from named sources (Rethinking-VLA-Initialization's domain
    compositions): ``weights`` per source, ``budget`` training samples (or tokens), seeded by the
    stage seed. Empty weights with a budget: every source, in proportion to its size."""

    weights: dict[str, float] = option(factory=dict, help="source name -> weight (normalised); empty: every input source")
    budget: int = option(0, "training samples (unit: samples) or tokens (unit: tokens) to draw; 0: every sample")
    unit: Literal["samples", "tokens"] = option("samples", "what budget counts; tokens = processor tokens incl. image tokens")

    def validate(self) -> None:
        if self.budget < 0:
            raise ConfigError(f"mixture.budget: must be >= 0, got {self.budget}")
        for name, w in self.weights.items():
            if not w >= 0:
                raise ConfigError(f"mixture.weights.{name}: must be >= 0, got {w}")
        if self.weights and not sum(self.weights.values()) > 0:
            raise ConfigError("mixture.weights: at least one weight must be > 0")
        if self.weights and not self.budget:
            raise ConfigError("mixture.budget: required with mixture.weights (the fixed number of samples or tokens to draw)")


@dataclass
class SFTConfig(StageConfig):
    """Config of ``midtrain sft``: supervised fine-tuning (mid-training) of a VLM on the selected mixture.

    Data, by default the export stage's ``mixture.parquet``; or ``sources`` (catalog sources of
    this run, VLM or - with ``vla_as_text`` - VLA); or ``datasets`` (LLaVA/ShareGPT JSON(L),
    Parquet, HF datasets on disk, read with the catalog's readers); or a ``mixture_file``.
    """

    name: str = option("sft", "stage folder in the run directory (e.g. sft_vla for the perplexity baselines' VLA-text model)")
    model: str = option("", "the VLM to fine-tune: hub id, local directory, or a checkpoint midtrain wrote (required)")
    mode: Literal["full", "lora"] = option("lora", "full fine-tuning of the language model, or LoRA adapters on it")
    lora: SFTLoraSettings = option(factory=SFTLoraSettings, help="LoRA settings (mode: lora)")
    vision: Literal["frozen", "last_fraction", "full"] = option("frozen", "vision tower: frozen, its last vision_fraction of blocks train, or all of it")
    vision_fraction: float = option(0.25, "fraction of vision blocks that train with vision: last_fraction")
    train_projector: bool = option(True, "the vision-language projector trains")
    mixture_file: Optional[Path] = option(None, "catalog-schema Parquet to train on (default: <run>/export/mixture.parquet)")
    sources: list[str] = option(factory=list, help="catalog sources of this run to train on instead of the mixture")
    catalog: Optional[Path] = option(None, "catalog directory for sources (default: <run>/catalog)")
    datasets: list[DatasetSource] = option(factory=list, help="dataset files to train on directly (catalog source syntax)")
    vla_as_text: bool = option(False, "render VLA frames as conversations whose answer is the binned action chunk "
                                      "(the perplexity baselines' vla model); else VLA rows are an error")  # fmt: skip
    action_bins: int = option(256, "bins per action dimension with vla_as_text")
    action_range: tuple[float, float] = option((-1.0, 1.0), "action value range binned with vla_as_text")
    mixture: MixtureSettings = option(factory=MixtureSettings, help="fixed-budget composition over sources")
    val_fraction: float = option(0.02, "held-out validation samples per source, as a fraction of its training draw")
    max_length: int = option(2048, "tokens per sample (image tokens included)")
    overlong: Literal["truncate", "skip"] = option("truncate", "longer samples: cut the text tail, or skip (counted)")
    train: TrainSettings = option(factory=TrainSettings, help="optimisation settings")
    save_dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "dtype of the final model (auto: the input checkpoint's)")
    attn_implementation: str = option("sdpa", "attention kernel (sdpa, eager, flash_attention_2, ...)")
    trust_remote_code: bool = option(False, "allow custom model code from the checkpoint's repository")
    processor_kwargs: dict[str, Any] = option(factory=dict, help="processor overrides, e.g. {max_pixels: 200704} for Qwen-VL")
    device: Device = option("auto", "auto (GPU if visible), cpu or cuda; under accelerate launch, one GPU per process", throughput=True)
    num_threads: Optional[int] = option(None, "intra-op threads of each process on CPU (null: torch's default)", throughput=True)
    prepare_workers: int = option(1, "processes that tokenize samples to measure lengths before training (0: inline)", throughput=True)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a Hugging Face hub id, a local checkpoint directory, or <run>/sft/model)")
        if not self.name or "/" in self.name or self.name.startswith(".") or self.name != self.name.strip():
            raise ConfigError(f"name: {self.name!r} must be a folder name without '/' or a leading '.'")
        if not 0 < self.vision_fraction <= 1:
            raise ConfigError(f"vision_fraction: must be in (0, 1], got {self.vision_fraction}")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if self.action_bins < 2 or not self.action_range[0] < self.action_range[1]:
            raise ConfigError(f"action_bins / action_range: need >= 2 bins and low < high, got {self.action_bins}, {list(self.action_range)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: must be >= 1, got {self.num_threads}")
        if self.prepare_workers < 0:
            raise ConfigError(f"prepare_workers: must be >= 0, got {self.prepare_workers}")
        given = [k for k, v in (("mixture_file", self.mixture_file), ("sources", self.sources), ("datasets", self.datasets)) if v]
        if len(given) > 1:
            raise ConfigError(f"{given[1]}: give one data input (mixture_file, sources or datasets), not {' and '.join(given)}")
        names = [d.name for d in self.datasets]
        for i, d in enumerate(self.datasets):
            for key, message in d.problems():
                raise ConfigError(f"datasets[{i}].{key}: {message}")
            if names.index(d.name) != i:
                raise ConfigError(f"datasets[{i}].name: duplicate source name {d.name!r}")
