"""One training loop for every training stage (SFT mid-training, VLA policy training).

- :class:`TrainSettings` (``settings``): the ``train:`` block of a training stage's config;
- :class:`TrainTask` / :func:`train` / :class:`Callback` (``loop``): what a stage hands over, and
  the loop (token-weighted loss, accumulation, clipping, AdamW + schedule, evaluation, callbacks,
  NaN stop), with accelerate doing the distribution;
- ``checkpoints`` (``checkpoint``): atomic ``step-NNNNNN/`` directories that a killed run resumes
  from exactly, and ``metrics.jsonl``;
- :class:`BatchPlan` (``batches``): the data order as a function of seed and step;
  :class:`WeightedBatches`: a co-training stream's micro-batches drawn from groups by weight;
- :class:`AuxStream` (``loop``): a co-training stream accumulated into the same optimizer steps;
- :func:`distributed_stage` / :func:`make_accelerator` (``distributed``): one stage run across
  the processes of ``accelerate launch``.
"""

from .batches import BatchPlan, WeightedBatches
from .checkpoint import complete_checkpoints, read_metrics
from .distributed import distributed_stage, make_accelerator
from .loop import AuxStream, Callback, StepContext, TrainingDiverged, TrainResult, TrainTask, train
from .settings import TrainSettings

__all__ = [
    "AuxStream", "BatchPlan", "Callback", "StepContext", "TrainResult", "TrainSettings", "TrainTask", "TrainingDiverged",
    "WeightedBatches", "complete_checkpoints", "distributed_stage", "make_accelerator", "read_metrics", "train",
]  # fmt: skip
