"""Config of ``midtrain report`` (light imports only, so ``midtrain report --help`` is fast)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import StageConfig, option


@dataclass
class ReportConfig(StageConfig):
    """One self-contained HTML file of every completed stage's figures, tables and counts."""

    title: str = option("midtrain run report", "title of the HTML page")
    gallery_size: int = option(6, "samples shown at each end of the score ranking")
    thumbnail_px: int = option(192, "longest side of the embedded gallery images, pixels")
    max_error_lines: int = option(20, "skipped samples listed per stage")
