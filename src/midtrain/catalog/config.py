"""Config of ``midtrain catalog`` (light imports only, so ``midtrain catalog --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, StageConfig, option
from ..data.sources import DatasetSource


@dataclass
class CatalogConfig(StageConfig):
    """Config of ``midtrain catalog``: the dataset sources and the part layout."""

    datasets: list[DatasetSource] = option(
        factory=list, help="the dataset sources: name, kind (vlm | vla), format, path and the format's settings"
    )
    rows_per_part: int = option(50_000, "rows per part file (the resume unit)")
    row_group_size: int = option(512, "rows per Parquet row group (bounds the memory of reading and writing)")
    verify_references: bool = option(
        False, "fingerprint files the rows name (images by path) by a full content hash instead of size + mtime"
    )

    def validate(self) -> None:
        if not self.datasets:
            raise ConfigError("datasets: at least one dataset source is required")
        if self.rows_per_part < 1:
            raise ConfigError(f"rows_per_part: must be >= 1, got {self.rows_per_part}")
        if self.row_group_size < 1:
            raise ConfigError(f"row_group_size: must be >= 1, got {self.row_group_size}")
        seen: dict[str, int] = {}
        for i, src in enumerate(self.datasets):
            for key, message in src.problems():
                raise ConfigError(f"datasets[{i}].{key}: {message}")
            if src.name == "references":
                raise ConfigError(f"datasets[{i}].name: 'references' is the catalog's folder of reference fingerprints; "
                                  "choose another source name")  # fmt: skip
            if src.name in seen:
                raise ConfigError(f"datasets[{i}].name: duplicate source name {src.name!r} (also datasets[{seen[src.name]}])")
            seen[src.name] = i
