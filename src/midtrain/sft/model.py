"""The VLM being mid-trained: which parts train, the answer-token loss, saving.

Parts (found by structure, the same for every ``*ForConditionalGeneration`` VLM transformers
ships): the *language model* (``get_decoder()``: ``model.language_model`` / ``model.text_model``),
the *vision tower* (``model.visual`` / ``vision_tower`` / ``vision_model``), the *projector*
(``multi_modal_projector`` / ``connector``, or the ``merger`` modules inside a Qwen vision
tower) and the LM head (usually tied to the embedding).

Modes: ``full`` trains the language model (embeddings and head included); ``lora`` adds peft
LoRA adapters to linear layers of the language model (all of them by default) and trains only
those. Independently the vision tower is ``frozen``, ``last_fraction`` (its last ``fraction`` of
blocks train, as Rethinking-VLA-Initialization unfreezes the last 25% of ViT layers) or
``full``, and the projector trains or not. Under LoRA, trainable vision blocks and the
projector are peft ``modules_to_save``, so the adapter directory holds them too.

Loss: mean next-token cross-entropy over answer tokens (labels != -100)::

    L = -1/|A| sum_{t in A} log softmax(W h_{t-1})[y_t]

computed from the backbone's last hidden state at the ``|A|`` answer positions only: the
``[batch, tokens, vocab]`` logits of ``model(**batch, labels=...)`` are never built (with a
150k vocabulary they dominate a small VLM's compute and memory), and large answer sets go
through the head in checkpointed chunks so the logits in memory stay bounded.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..models.answer_loss import HEAD_CHUNK_ELEMENTS, IGNORE, chunked_answer_loss  # noqa: F401 (re-exported)
from ..models.parts import VLMParts, find_parts, lora_targets, trainable_modules  # noqa: F401 (re-exported)
from ..runs import StageError


def _expand_module_lists(vlm, names: list[str]) -> list[str]:
    """peft's ``modules_to_save`` wraps modules, not ``ModuleList`` containers: list their children instead."""
    out = []
    for name in names:
        module = vlm.get_submodule(name)
        if isinstance(module, nn.ModuleList):
            out += [f"{name}.{child}" for child, _ in module.named_children()]
        else:
            out.append(name)
    return out


def apply_training_mode(vlm, parts: VLMParts, mode: str, vision: str, fraction: float, projector: bool, lora=None):
    """Set ``requires_grad`` per the mode and, for LoRA, wrap ``vlm`` with peft.

    Returns ``(trained_model, peft_model_or_None)``: the HF model object that runs (with LoRA
    layers injected) and the ``PeftModel`` that saves the adapter.
    """
    extra = trainable_modules(parts, vision, fraction, projector)
    vlm.requires_grad_(False)
    if mode == "full":
        for name, p in vlm.named_parameters():
            if parts.part_of(name) in ("language_model", "lm_head"):
                p.requires_grad_(True)
        for name in extra:
            vlm.get_submodule(name).requires_grad_(True)
        return vlm, None
    from peft import LoraConfig, get_peft_model  # the train extra (the CLI names it when missing)

    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=lora_targets(vlm, parts, lora.targets),
                        modules_to_save=_expand_module_lists(vlm, extra) or None)  # fmt: skip
    peft_model = get_peft_model(vlm, config)
    return peft_model.base_model.model, peft_model


def parameter_counts(vlm, parts: VLMParts) -> dict[str, dict[str, int]]:
    """``{part: {"total", "trainable"}}`` (each tensor counted once, tied weights under the first
    name); under LoRA, adapters count in the part they adapt and also under ``lora``."""
    out: dict[str, dict[str, int]] = {}
    for name, p in vlm.named_parameters():
        clean = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
        for key in (parts.part_of(clean), "lora" if ".lora_" in name else None):
            if key is None:
                continue
            c = out.setdefault(key, {"total": 0, "trainable": 0})
            if ".original_module." not in name:  # peft keeps the frozen original beside the trained copy
                c["total"] += p.numel()
            c["trainable"] += p.numel() if p.requires_grad else 0
    out["all"] = {"total": sum(v["total"] for k, v in out.items() if k != "lora"),
                  "trainable": sum(v["trainable"] for k, v in out.items() if k != "lora")}  # fmt: skip
    return out


class SFTModel(nn.Module):
    """The module the training loop runs: ``model(batch) -> (loss, logs)`` with the answer-token
    loss of the module docstring. ``net`` is the VLM (or its ``PeftModel``), registered once so
    parameter names are stable; ``vlm`` is the HF model that runs (LoRA layers injected)."""

    def __init__(self, vlm, peft_model=None, frozen_vision: str | None = None):
        super().__init__()
        self.net = peft_model if peft_model is not None else vlm
        object.__setattr__(self, "vlm", vlm)  # an alias, not a second registration
        params = inspect.signature(vlm.model.forward).parameters
        self.accepted = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        self.softcap = getattr(vlm.config.get_text_config(), "final_logit_softcapping", None)
        self.frozen_vision = frozen_vision

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.frozen_vision:  # a frozen tower is a fixed feature map: no dropout, fixed BN statistics
            self.vlm.get_submodule(self.frozen_vision).eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        self.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def forward(self, batch: dict[str, Any]):
        inputs = {k: v for k, v in batch.items() if k in self.accepted and k != "labels" and hasattr(v, "shape")}
        hidden = self.vlm.model(**inputs, use_cache=False).last_hidden_state
        labels = batch["labels"][:, 1:]  # token t is predicted from position t - 1
        answer = labels != IGNORE
        loss = chunked_answer_loss(hidden[:, :-1][answer], self.vlm.get_output_embeddings(), labels[answer], self.softcap)
        return loss, {}


def read_checkpoint_dtype(name_or_path: str, config) -> str:
    """The dtype a checkpoint was saved in (``float32`` if it does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    text = str(dtype).removeprefix("torch.") if dtype is not None else "float32"
    return text if text in ("float32", "bfloat16", "float16") else "float32"


def save_model(vlm, processor, directory: Path, dtype: str, info: dict) -> None:
    """``save_pretrained`` of model and processor in ``dtype`` (weights cast in place: call last),
    plus ``midtrain_sft.json`` saying how it was trained."""
    import torch

    directory.mkdir(parents=True, exist_ok=True)
    vlm.to(getattr(torch, dtype))
    vlm.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    (directory / "midtrain_sft.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
