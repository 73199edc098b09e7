"""Which reader reads a dataset source: the one lookup the catalog stage and ``midtrain sft``'s
dataset files share."""

from __future__ import annotations

from ..runs import StageError
from .sources import DatasetSource, SampleReader


def open_reader(source: DatasetSource, seed: int) -> SampleReader:
    """The reader for ``source.format`` (imported lazily: only the formats in use are loaded)."""
    if source.format == "llava_json":
        from .llava import LlavaJsonReader as reader_cls
    elif source.format == "llava_jsonl":
        from .llava import LlavaJsonlReader as reader_cls
    elif source.format == "parquet":
        from .tabular import ParquetReader as reader_cls
    elif source.format == "hf_disk":
        from .tabular import HFDiskReader as reader_cls
    elif source.format == "lerobot":
        from .lerobot import LeRobotReader as reader_cls
    else:  # the config type check rejects this first; kept for direct callers
        raise StageError(f"{source.name}: unknown format {source.format!r}")
    return reader_cls(source, seed)
