"""Config of ``midtrain score`` (light imports only, so ``midtrain score --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, Device, StageConfig, option

FEATURE_SCORERS = ("proximity", "random", "mean_distance")
CATALOG_SCORERS = ("vla_perplexity", "delta_perplexity")


@dataclass
class ScoreConfig(StageConfig):
    """Pool scoring: higher = closer to the VLA data.

    Feature scorers (``proximity``, ``random``, ``mean_distance``) stream the feature run; catalog
    scorers (``vla_perplexity``, ``delta_perplexity``) stream the catalog through VLMs.

    ``kernel`` (``proximity``): ``eager`` is a float16 -> float32 copy + ``torch.mv`` per 1,024-row
    block; ``compiled`` a ``torch.compile``'d fused float16 x float32 dot, ~1.6-2x faster from a warm
    page cache, compiled once per process in ~4-14 s (needs a C++ compiler; falls back to ``eager``
    with a logged reason); ``auto`` picks ``compiled`` for a linear estimator on a pool of at least
    64 GiB of features, where the compile pays for itself. The manifest records the kernel that ran
    (``kernel``, ``kernel_reason``, ``kernel_fallback``, ``kernel_rows``: rows of the shards each
    kernel scored). ``num_threads``: on 2 shared cores 2 threads were 4x slower than 1, not faster.
    """

    scorer: Literal["proximity", "random", "mean_distance", "vla_perplexity", "delta_perplexity"] = option(
        "proximity", "proximity (the fitted estimator), random, mean_distance, vla_perplexity or delta_perplexity"
    )
    features: Optional[Path] = option(None, "features directory to score (default: this run's featurize stage)")
    estimator: Optional[Path] = option(None, "estimator directory for `proximity` (default: this run's fit/estimator)")
    allow_foreign_estimator: bool = option(
        False, "accept an estimator fitted on another feature run of the same dimension (same VLM and pooling)"
    )
    pool_sources: list[str] = option(factory=list, help="VLM pool sources to score (empty: every VLM source)")
    vla_sources: list[str] = option(factory=list, help="VLA sources of the mean_distance reference (empty: every VLA source)")
    chunk_rows: Optional[int] = option(None, "rows per streamed chunk (null: 16,384 for the compiled kernel, 1,024 otherwise)", throughput=True)
    kernel: Literal["auto", "compiled", "eager"] = option("auto", "how `proximity` computes its dot products (see above)", throughput=True)
    num_threads: Optional[int] = option(None, "intra-op threads of the feature scorers (null: 1)", throughput=True)
    knn: Optional[int] = option(None, "mean_distance: mean distance to the k nearest VLA rows (null: to all reference rows)")
    max_reference: int = option(4096, "mean_distance: VLA reference rows, a seeded subsample")
    vla_model: Optional[Path] = option(None, "perplexity scorers: the VLM fine-tuned on VLA data rendered as text")
    base_model: Optional[Path] = option(None, "delta_perplexity: the base VLM")
    batch_size: int = option(8, "perplexity scorers: samples per model batch", throughput=True)
    max_length: int = option(2048, "perplexity scorers: longest input in tokens (longer samples are truncated)")
    device: Device = option("auto", "perplexity scorers: where the models run (auto, cpu, cuda, cuda:N, mps)", throughput=True)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "perplexity scorers: model dtype (auto: bfloat16/float16 on GPU, float32 on CPU)"
    )
    trust_remote_code: bool = option(False, "perplexity scorers: allow the checkpoints' own Python code")
    delta: Literal["log", "ppl"] = option(
        "log", "delta_perplexity: score -(log ppl_vla - log ppl_base) (log) or -(ppl_vla - ppl_base) (ppl)"
    )

    def validate(self) -> None:
        if (self.chunk_rows is not None and self.chunk_rows < 1) or self.batch_size < 1 or self.max_reference < 1:
            raise ConfigError("chunk_rows / batch_size / max_reference: must be >= 1")
        if self.knn is not None and self.knn < 1:
            raise ConfigError(f"knn: must be >= 1 or null, got {self.knn}")
        if self.scorer in CATALOG_SCORERS and self.vla_model is None:
            raise ConfigError(f"vla_model: scorer {self.scorer!r} needs the path of the VLA-fine-tuned VLM")
        if self.scorer == "delta_perplexity" and self.base_model is None:
            raise ConfigError("base_model: scorer 'delta_perplexity' needs the path of the base VLM")
