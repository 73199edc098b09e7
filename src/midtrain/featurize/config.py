"""Config of ``midtrain featurize`` (light imports only, so ``midtrain featurize --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import ConfigError, Device, Settings, StageConfig, option
from ..models.loading import ATTN_IMPLEMENTATIONS


@dataclass
class RayOptions(Settings):
    """Ray Data backend settings (``backend: ray``): a pool of CPU actors runs the processor (image
    decoding, chat template) and streams batches to a pool of model actors, one model each."""

    address: Optional[str] = option(None, "Ray cluster to join: null starts a local instance; 'auto' or ray://host:10001 joins a running one", throughput=True)
    num_actors: int = option(1, "model replicas (one model per actor)", throughput=True)
    gpus_per_actor: float = option(0.0, "GPUs per model actor (0: the model runs on CPU)", throughput=True)
    cpus_per_actor: float = option(1.0, "CPUs per model actor", throughput=True)
    num_preprocess_actors: int = option(1, "CPU actors that read, decode and process catalog rows into batches", throughput=True)
    cpus_per_preprocess_actor: float = option(1.0, "CPUs per preprocessing actor", throughput=True)


@dataclass
class FeaturizeConfig(StageConfig):
    """Featurize settings: which frozen VLM, how samples become its inputs, how its last hidden
    state is pooled (these decide the features) and how fast it runs (the throughput options).

    ``compile`` pays off on long runs only: on the 2-core CPU benchmark the compiled model ran about
    1.2x the eager one (4.2-4.4x the naive loop in 5 runs, eager 3.1-4.1x in 14), after a compile of
    34-40 s once per process plus a recompile of about 10 s at the first batch without padding (both
    in ``compile_s`` in the manifest); see :func:`~.featurizer.compile_backbone`.
    """

    model: str = option("", "the VLM: a Hugging Face hub id or a local checkpoint directory (required)")
    catalog: Optional[Path] = option(None, "catalog directory to featurize (default: this run's catalog stage)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "model weights and compute dtype (auto: bfloat16, else float16, on GPU; float32 on CPU)"
    )
    device: Device = option("auto", "where the model runs: auto (a GPU if visible), cpu, cuda, cuda:N, mps", throughput=True)
    attn_implementation: str = option(
        "sdpa", "attention kernel (sdpa, eager, flash_attention_2, ...): the same attention, computed faster or slower",
        throughput=True,
    )
    trust_remote_code: bool = option(False, "allow a checkpoint's own Python code (only for models you trust)")
    processor_kwargs: dict[str, Any] = option(
        factory=dict, help="extra processor settings, e.g. {max_pixels: 200704} for Qwen-VL (change the inputs)"
    )
    pooling: Literal["mean", "last", "image_mean", "text_mean"] = option(
        "mean", "how a sample's last hidden states become one vector: over all tokens, the last token, image or text tokens"
    )
    include_assistant: bool = option(True, "include the answers of VLM conversations in the input")
    max_length: int = option(4096, "longest input in tokens; longer samples follow `overlong`")
    overlong: Literal["truncate", "skip"] = option(
        "truncate", "a longer sample: cut its text tail (a sample whose images would be cut is skipped) or skip it"
    )
    batch_size: int = option(32, "samples per model batch", throughput=True)
    max_tokens_per_batch: int = option(32768, "most padded tokens per model batch (long samples get smaller batches)", throughput=True)
    shard_size: int = option(2048, "catalog rows per output shard (the resume unit; changes the shard layout)")
    num_workers: Optional[int] = option(
        None, "DataLoader workers preparing batches (null: 1 on CPU, up to 8 on GPU; 0: in the main process)", throughput=True
    )
    prefetch_factor: int = option(4, "batches each worker prepares ahead", throughput=True)
    compile: bool = option(False, "torch.compile the decoder layers and vision MLPs (faster for long runs, after a compile)", throughput=True)
    backend: Literal["local", "ray"] = option("local", "local: DataLoader workers and one model here; ray: Ray Data actor pools", throughput=True)
    ray: RayOptions = option(factory=RayOptions, help="Ray Data settings (backend: ray)", throughput=True)

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model: required (a Hugging Face hub id or a local checkpoint directory)")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(f"attn_implementation: expected one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {self.attn_implementation!r}")
        for key in ("max_length", "batch_size", "max_tokens_per_batch", "shard_size", "prefetch_factor"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")
        if self.ray.num_actors < 1 or self.ray.num_preprocess_actors < 1:
            raise ConfigError("ray.num_actors and ray.num_preprocess_actors: must be >= 1")
        if self.ray.gpus_per_actor < 0 or self.ray.cpus_per_actor < 0 or self.ray.cpus_per_preprocess_actor < 0:
            raise ConfigError("ray.gpus_per_actor / ray.cpus_per_actor / ray.cpus_per_preprocess_actor: must be >= 0")
