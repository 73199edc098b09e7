"""The shared model layer: loading real VLMs and building their inputs.

- :func:`load_vlm` / :func:`backbone` / :func:`multimodal_token_ids` (``loading``): a frozen VLM
  and its processor through ``AutoModelForImageTextToText`` / ``AutoProcessor``;
- :func:`build_batch` / :func:`conversation_of` / :func:`render_prompt` (``inputs``): processor
  inputs for catalog rows with the model's chat template, truncation, answer-token masks.

The tiny random models of the real architectures that tests and benchmarks build offline live
apart from this runtime path, in :mod:`midtrain.models.tiny` (import it by that name).

The names are resolved on first use, so importing ``midtrain.models.loading`` (as a stage's light
config module does) does not import the input builders and their image stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "BatchInfo": "inputs", "build_batch": "inputs", "conversation_of": "inputs", "render_prompt": "inputs",
    "ModelLoadError": "loading", "backbone": "loading", "check_vlm": "loading", "load_processor": "loading",
    "load_vlm": "loading", "multimodal_token_ids": "loading", "processor_settings": "loading",
    "resolve_device": "loading", "resolve_dtype": "loading",
}  # fmt: skip

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
