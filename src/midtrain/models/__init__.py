"""The shared model layer: loading real VLMs, building their inputs, tiny test models.

- :func:`load_vlm` / :func:`backbone` / :func:`multimodal_token_ids` (``loading``): a frozen VLM
  and its processor through ``AutoModelForImageTextToText`` / ``AutoProcessor``;
- :func:`build_batch` / :func:`conversation_of` / :func:`render_prompt` (``inputs``): processor
  inputs for catalog rows with the model's chat template, truncation, answer-token masks;
- :func:`build_tiny_vlm` (``tiny``): tiny random models of the real architectures, built offline.
"""

from .inputs import BatchInfo, build_batch, conversation_of, render_prompt
from .loading import (
    ModelLoadError,
    backbone,
    check_vlm,
    load_processor,
    load_vlm,
    multimodal_token_ids,
    processor_settings,
    resolve_device,
    resolve_dtype,
)
from .tiny import ARCHS as TINY_ARCHS
from .tiny import build_tiny_vlm, tiny_vlm_parts

__all__ = [
    "BatchInfo", "ModelLoadError", "TINY_ARCHS", "backbone", "build_batch", "build_tiny_vlm", "conversation_of",
    "check_vlm", "load_processor", "load_vlm", "multimodal_token_ids", "processor_settings", "render_prompt", "resolve_device",
    "resolve_dtype", "tiny_vlm_parts",
]  # fmt: skip
