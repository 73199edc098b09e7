"""Config of ``midtrain export`` (light imports only, so ``midtrain export --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from ..config import ConfigError, StageConfig, option


@dataclass
class ExportConfig(StageConfig):
    """The selected mixture in the formats trainers read: LLaVA / ShareGPT JSON with a
    LLaMA-Factory ``dataset_info.json`` entry, and optionally Parquet."""

    format: Literal["json", "jsonl"] = option("json", "the mixture as one JSON array or JSON Lines")
    image_mode: Literal["copy", "link", "reference"] = option(
        "copy", "images copied into export/images, symlinked there, or referenced by absolute path"
    )
    dataset_name: str = option("midtrain_mixture", "the LLaMA-Factory dataset_info.json key")
    parquet: bool = option(True, "also write mixture.parquet (catalog rows, loadable with HF datasets)")
    embed_images: bool = option(False, "put the image bytes inside mixture.parquet (self-contained)")
    selection: Optional[Path] = option(None, "selection file (default: this run's select/selection.parquet)")

    def validate(self) -> None:
        if not self.dataset_name.strip():
            raise ConfigError("dataset_name: must not be empty")
