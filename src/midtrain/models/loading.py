"""Load a frozen VLM and its processor the way a released checkpoint is loaded.

``load_vlm`` goes through ``AutoProcessor`` and ``AutoModelForImageTextToText`` from a hub id or a
local directory, so any architecture transformers maps to ``image-text-to-text`` works; the ones
midtrain tests (with tiny random models, see :mod:`midtrain.models.tiny`) are Qwen2-VL,
Qwen2.5-VL, Qwen3-VL, Idefics3 / SmolVLM, PaliGemma and InternVL (the transformers-native one).
``trust_remote_code`` stays off unless the caller turns it on.

Every failure a user can cause (a path that does not exist, a hub id that does not resolve, a
text-only or vision-only model, custom code without ``trust_remote_code``) becomes a one-line
:class:`ModelLoadError` that names the model and the fix, never a deep traceback.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ..devices import resolve_device
from ..runs import StageError, damaged_weights_file

DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


class ModelLoadError(StageError):
    """The requested model cannot be loaded as a VLM; the message says which and why in one line."""


def resolve_dtype(dtype: str, device: str):
    """``auto`` -> bfloat16 on GPUs that support it (else float16), float32 on CPU."""
    import torch

    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _load_config(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    from .components import register_components

    register_components()  # midtrain's own components (the demo VLM's) load like any architecture

    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir() or not (local / "config.json").exists():
            raise ModelLoadError(f"model {name_or_path!r}: not a model directory (no config.json in {local})")
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"model {name_or_path!r}: no such directory")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else name_or_path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"model {name_or_path!r} needs custom code from its repository; set trust_remote_code: true "
                "only if you trust that code"
            ) from None
        raise ModelLoadError(f"model {name_or_path!r}: unreadable config ({_first_line(exc)})") from None
    except (OSError, KeyError) as exc:
        hint = " (HF_HUB_OFFLINE=1: only local directories and cached models can be used)" if _offline() else ""
        raise ModelLoadError(
            f"model {name_or_path!r} not found: not a local directory and not resolvable on the Hugging Face Hub{hint}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def check_is_vlm(config: Any, name_or_path: str) -> None:
    """Raise ModelLoadError unless ``AutoModelForImageTextToText`` can build this config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    model_type = getattr(config, "model_type", None)
    remote = getattr(config, "auto_map", None) or {}
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES or "AutoModelForImageTextToText" in remote:
        return
    raise ModelLoadError(
        f"model {name_or_path!r} is a {model_type!r} model, not a vision-language model: featurize needs a model "
        "that AutoModelForImageTextToText loads (e.g. Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Idefics3/SmolVLM, PaliGemma, InternVL)"
    )


def check_vlm(name_or_path: str | Path, trust_remote_code: bool = False):
    """The model's config, after checking it exists and is a VLM (reads config.json only: fast)."""
    config = _load_config(str(name_or_path), trust_remote_code)
    check_is_vlm(config, str(name_or_path))
    return config


def load_processor(name_or_path: str, trust_remote_code: bool = False, **processor_kwargs: Any):
    """The model's own multimodal processor (``AutoProcessor``); ``processor_kwargs`` override its settings
    (e.g. ``min_pixels``/``max_pixels`` for Qwen-VL)."""
    from transformers import AutoProcessor
    from transformers.processing_utils import ProcessorMixin

    check_vlm(name_or_path, trust_remote_code)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, **processor_kwargs)
    except (OSError, ValueError, TypeError) as exc:
        raise ModelLoadError(f"model {name_or_path!r}: cannot load its processor ({_first_line(exc)})") from None
    if not isinstance(processor, ProcessorMixin) or not hasattr(processor, "image_processor"):
        raise ModelLoadError(
            f"model {name_or_path!r}: AutoProcessor gave a {type(processor).__name__}, not a multimodal processor "
            "with an image processor; is this a vision-language checkpoint?"
        )
    return processor


def load_vlm(
    name_or_path: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
    processor_kwargs: dict[str, Any] | None = None,
):
    """``(model, processor)``: an eval-mode ``AutoModelForImageTextToText`` on ``device`` and its processor.

    ``dtype``: ``auto`` (bfloat16/float16 on GPU, float32 on CPU) or an explicit torch dtype name.
    ``attn_implementation``: ``sdpa`` (default), ``eager``, ``flash_attention_2``, ...
    Raises :class:`ModelLoadError` (one line) for a missing model or a model that is not a VLM.
    """
    from safetensors import SafetensorError
    from transformers import AutoModelForImageTextToText

    name = str(name_or_path)
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(f"attn_implementation {attn_implementation!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    processor = load_processor(name, trust_remote_code, **(processor_kwargs or {}))
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name,
            dtype=torch_dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            device_map=device if device.startswith("cuda") else None,
        )
    except ImportError as exc:
        raise ModelLoadError(f"model {name!r}: {_first_line(exc)}") from None
    except (OSError, ValueError, SafetensorError) as exc:
        damaged = damaged_weights_file(name)
        if damaged:
            raise ModelLoadError(f"{damaged}; restore it or rerun the stage that wrote it") from None
        raise ModelLoadError(f"model {name!r}: cannot load weights ({_first_line(exc)})") from None
    if not device.startswith("cuda"):
        model = model.to(device)
    model.eval().requires_grad_(False)
    return model, processor


def backbone(model):
    """The model without its language-model head: ``model.model`` for every ``*ForConditionalGeneration``.

    Calling it returns ``last_hidden_state`` (after the final norm) and never computes vocabulary
    logits, which for a small VLM with a 150k vocabulary are a large share of the forward cost.
    """
    base = getattr(model, "base_model", None)
    if base is None or base is model:
        raise ModelLoadError(f"{type(model).__name__}: no base model (backbone) to run without the LM head")
    return base


def multimodal_token_ids(config) -> dict[str, list[int]]:
    """Token ids the model fills with vision features: ``{"image": [...], "video": [...]}``.

    Read from the model config (``image_token_id`` / ``image_token_index``, ``video_token_id``), so
    pooling over image tokens works the same way for every architecture.
    """
    image = [getattr(config, k) for k in ("image_token_id", "image_token_index") if getattr(config, k, None) is not None]
    video = [config.video_token_id] if getattr(config, "video_token_id", None) is not None else []
    return {"image": sorted(set(image)), "video": video}


def _jsonable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return True
    if isinstance(value, (list, tuple)) and len(value) <= 16 and depth < 2:
        return all(_jsonable(v, depth + 1) for v in value)
    if isinstance(value, dict) and len(value) <= 16 and depth < 2:
        return all(isinstance(k, str) and _jsonable(v, depth + 1) for k, v in value.items())
    return False


def processor_settings(processor) -> dict[str, Any]:
    """The processor settings that change features (image size / pixel budget / tiling / tokens per
    image, chat template hash), for the featurize manifest."""
    out: dict[str, Any] = {"processor_class": type(processor).__name__}
    ip = processor.image_processor
    out["image_processor_class"] = type(ip).__name__
    try:
        ip_dict = ip.to_dict()
    except Exception:  # noqa: BLE001 - settings are informative; never fail a run on them
        ip_dict = {}
    out["image_processor"] = {
        k: v for k, v in sorted(ip_dict.items()) if not k.startswith("_") and k != "processor_class" and _jsonable(v)
    }
    for attr in ("image_seq_len", "image_seq_length", "num_image_tokens"):
        if isinstance(getattr(processor, attr, None), int):
            out[attr] = getattr(processor, attr)
    tok = processor.tokenizer
    out["tokenizer_class"] = type(tok).__name__
    out["vocab_size"] = len(tok)
    template = processor.chat_template
    if template is not None:
        text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
        out["chat_template_sha1"] = hashlib.sha1(text.encode()).hexdigest()
    else:
        out["chat_template_sha1"] = None
    return out
