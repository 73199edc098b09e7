"""Config of ``midtrain fit``: the estimator's training settings and which rows to train on
(light imports only, so ``midtrain fit --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, StageConfig, option


@dataclass
class TrainSettings:
    """Hyper-parameters of :func:`~.estimator.train_estimator`; the fit stage's config extends this class.

    ``monitor: val_auc`` (default) selects by held-out *ranking*, the only thing selection
    uses. VLA and VLM features are often separable: the validation AUC is then 1.0 after the
    first epoch, and every later epoch only grows the margins, driving every pool score to
    ~0 and leaving the order of the far-away sources to whichever hard negatives set the
    max-margin direction. The earliest epoch with the best held-out ranking is the least
    over-fitted estimator that ranks as well. ``monitor: val_loss`` trains to the loss plateau.
    """

    model: Literal["linear", "mlp"] = option("linear", "the logit f: linear (the paper's choice) or an mlp of `hidden` widths")
    hidden: list[int] = option(factory=lambda: [256], help="hidden layer widths of the mlp")
    dropout: float = option(0.0, "dropout of the mlp's hidden layers")
    batch_size: int = option(128, "training batch, class-balanced (half VLA, half pool); changes the estimator")
    lr: float = option(1e-3, "AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    max_epochs: int = option(50, "most training epochs (an epoch is one pass over the larger class)")
    patience: int = option(5, "stop after this many epochs without a `min_delta` improvement of `monitor`")
    min_delta: float = option(1e-4, "smallest change of the monitored metric that counts as an improvement")
    target_val_accuracy: Optional[float] = option(None, "also stop once the validation balanced accuracy reaches this")
    monitor: Literal["val_auc", "val_loss"] = option(
        "val_auc", "validation metric for early stopping; the earliest best epoch's weights are kept"
    )
    val_fraction: float = option(0.1, "held-out fraction of each class for validation")
    seed: int = option(0, "seed of the split, the batches and the initial weights")
    num_threads: int = option(1, "torch threads while training (the result is reproducible for a fixed thread count)")

    def check(self) -> None:
        """Reject bad values (ConfigError naming the key)."""
        if self.batch_size < 2:
            raise ConfigError(f"batch_size: must be >= 2 (half VLA, half pool), got {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ConfigError(f"max_epochs / patience: must be >= 1, got {self.max_epochs} / {self.patience}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.target_val_accuracy is not None and not 0.0 < self.target_val_accuracy <= 1.0:
            raise ConfigError(f"target_val_accuracy: must be in (0, 1], got {self.target_val_accuracy}")
        if self.model == "mlp" and (not self.hidden or min(self.hidden) < 1):
            raise ConfigError(f"hidden: model 'mlp' needs positive layer widths, got {self.hidden}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout: must be in [0, 1), got {self.dropout}")
        if self.monitor not in ("val_auc", "val_loss"):
            raise ConfigError(f"monitor: must be 'val_auc' or 'val_loss', got {self.monitor!r}")
        if self.num_threads < 1:
            raise ConfigError(f"num_threads: must be >= 1, got {self.num_threads}")

    def training_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(TrainSettings)}


@dataclass
class FitConfig(StageConfig, TrainSettings):
    """Proximity-estimator training: the :class:`TrainSettings` hyper-parameters plus which feature
    rows to train on. Negatives are capped by default because the pool is usually much larger
    than memory."""

    features: Optional[Path] = option(None, "features directory to train on (default: this run's featurize stage)")
    vla_sources: list[str] = option(factory=list, help="VLA sources that are the positives (empty: every VLA source)")
    pool_sources: list[str] = option(factory=list, help="VLM pool sources that are the negatives (empty: every VLM source)")
    max_positives: Optional[int] = option(None, "seeded subsample cap on the positives (null: all rows)")
    max_negatives: Optional[int] = option(200_000, "seeded subsample cap on the negatives (null: all rows)")

    def validate(self) -> None:
        self.check()
        for key in ("max_positives", "max_negatives"):
            v = getattr(self, key)
            if v is not None and v < 2:
                raise ConfigError(f"{key}: must be >= 2 or null, got {v}")
