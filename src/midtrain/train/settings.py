"""``TrainSettings``: the optimisation settings every training stage nests under ``train:``.

One dataclass for SFT (``midtrain sft``) and VLA policy training, so a recipe reads the same in
both. Batch terms: ``batch_size`` is the micro-batch of one process, ``grad_accum`` micro-batches
make one optimizer step per process, and the *global batch* of a step is
``batch_size * grad_accum * processes``. ``steps`` counts optimizer steps.

The learning rate follows a linear warmup from 0 to ``lr`` over the warmup steps, then
``schedule``: ``cosine`` decays to ``min_lr_ratio * lr`` at the last step, ``linear`` likewise
in a straight line, ``constant`` stays at ``lr``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError, Settings, option


@dataclass
class TrainSettings(Settings):
    """Optimisation, evaluation, checkpoint and logging settings of one training run."""

    steps: int = option(1000, "optimizer steps to train for")
    batch_size: int = option(8, "micro-batch size of one process (samples per forward/backward)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step; global batch = batch_size x grad_accum x processes")
    lr: float = option(1e-4, "peak learning rate (AdamW); full fine-tuning of a 2B VLM usually wants 1e-5 to 2e-5, LoRA 1e-4 to 2e-4")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay (not applied to 1-d parameters: biases, norm scales)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas")
    eps: float = option(1e-8, "AdamW epsilon")
    warmup_steps: Optional[int] = option(None, "linear warmup steps (null: warmup_ratio x steps)")
    warmup_ratio: float = option(0.03, "warmup as a fraction of steps, used when warmup_steps is null")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", "learning-rate schedule after warmup")
    min_lr_ratio: float = option(0.0, "final learning rate of the cosine/linear decay, as a fraction of lr")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0: no clipping; the norm is logged either way)")
    eval_every: int = option(100, "validation loss every N steps (0: only after the last step)")
    eval_batches: int = option(50, "validation micro-batches per evaluation (0: the whole validation split)")
    save_every: int = option(500, "checkpoint every N steps (and after the last step)", throughput=True)
    keep_checkpoints: int = option(2, "checkpoints kept on disk, newest first (0: keep all)", throughput=True)
    log_every: int = option(10, "write a metrics.jsonl row (means since the previous row) every N steps", throughput=True)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = option(
        "auto", "autocast precision (weights and optimizer stay fp32): auto = bf16 on a GPU that supports it, fp32 on CPU"
    )
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass (less memory, ~30% slower)",
                                          throughput=True)  # fmt: skip
    fsdp: bool = option(False, "shard weights, gradients and optimizer states over the processes (FSDP2, one unit per "
                               "transformer block) instead of DDP replicas; checkpoints are per-process shards", throughput=True)
    group_by_length: bool = option(True, "micro-batches of similar token length (less padding; order still random)")
    seed: int = option(0, "seed of the data order, dropout and any other randomness in training")
    num_workers: int = option(1, "DataLoader worker processes building batches (0: in the training process)", throughput=True)

    def validate(self) -> None:
        for key in ("steps", "batch_size", "grad_accum"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")
        for key in ("weight_decay", "max_grad_norm", "eps"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas: each must be in [0, 1), got {list(self.betas)}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps <= self.steps:
            raise ConfigError(f"train.warmup_steps: must be in [0, steps={self.steps}], got {self.warmup_steps}")
        if not 0 <= self.warmup_ratio <= 1:
            raise ConfigError(f"train.warmup_ratio: must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"train.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        for key in ("eval_every", "eval_batches", "save_every", "keep_checkpoints", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.fsdp and self.precision == "fp16":
            raise ConfigError("train.precision: fp16 needs a gradient scaler that sharded training does not have; use bf16 with train.fsdp")
        if self.log_every < 1:
            raise ConfigError(f"train.log_every: must be >= 1, got {self.log_every}")

    @property
    def warmup(self) -> int:
        """Warmup steps, resolved."""
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_ratio * self.steps))

    def lr_factor(self, step: int) -> float:
        """Multiplier of ``lr`` for optimizer step ``step`` (0-based: the factor applied by the
        ``step``-th update). Warmup rises linearly to 1 at ``warmup``; the decay reaches
        ``min_lr_ratio`` at the last step."""
        warm = self.warmup
        if step < warm:
            return (step + 1) / (warm + 1)
        if self.schedule == "constant":
            return 1.0
        span = max(1, self.steps - 1 - warm)
        progress = min(1.0, (step - warm) / span)
        if self.schedule == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * shape
