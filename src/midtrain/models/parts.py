"""The parts of a VLM that training chooses between, and LoRA on its language model.

Found by structure, the same for every ``*ForConditionalGeneration`` VLM transformers ships: the
*language model* (``get_decoder()``: ``model.language_model`` / ``model.text_model``), the
*vision tower* (``model.visual`` / ``vision_tower`` / ``vision_model``), the *projector*
(``multi_modal_projector`` / ``connector``, or the ``merger`` modules inside a Qwen vision tower),
the vision tower's blocks (for ``last_fraction``) and the LM head. Mid-training (``sft``) and the
VLA policy's backbone (``vla``) choose what trains from these, and adapt the same linear layers
with LoRA (:class:`LoraSettings`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ConfigError, Settings, option
from ..runs import StageError


@dataclass
class LoraSettings(Settings):
    """LoRA adapters (peft) on linear layers of the language model: ``W x + (alpha / rank) B A x``."""

    rank: int = option(16, "adapter rank r")
    alpha: float = option(32.0, "scaling numerator: the update is (alpha / rank) B A")
    dropout: float = option(0.0, "dropout on the adapter input")
    targets: list[str] = option(factory=list, help="linear layers of the language model to adapt, by last name "
                                "(e.g. [q_proj, v_proj]); empty: every linear layer (peft's all-linear, LM only)")  # fmt: skip

    def validate(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"lora.rank: must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"lora.alpha: must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")


VISION_NAMES = ("visual", "vision_tower", "vision_model")
PROJECTOR_NAMES = ("multi_modal_projector", "connector")


@dataclass
class VLMParts:
    """Full module names (relative to the ``*ForConditionalGeneration`` model) of each part."""

    language_model: str
    vision_tower: str | None
    projector: list[str]
    vision_blocks: list[str]  # the vision tower's transformer/conv blocks, input to output

    def part_of(self, name: str) -> str:
        """``language_model`` / ``vision_tower`` / ``projector`` / ``lm_head`` / ``other`` for a parameter name."""
        if any(name == p or name.startswith(p + ".") for p in self.projector):
            return "projector"
        if self.vision_tower and name.startswith(self.vision_tower + "."):
            return "vision_tower"
        if name.startswith(self.language_model + "."):
            return "language_model"
        if name.startswith("lm_head."):
            return "lm_head"
        return "other"


def _longest_block_list(module, prefix: str, exclude: list[str]) -> list[str]:
    """Names of the children of the longest ``ModuleList``/``Sequential`` in ``module`` (the blocks)."""
    import torch.nn as nn

    best: list[str] = []
    for name, sub in module.named_modules(prefix=prefix):
        if any(name == e or name.startswith(e + ".") for e in exclude):
            continue
        if isinstance(sub, (nn.ModuleList, nn.Sequential)) and len(sub) > len(best):
            best = [f"{name}.{child}" for child, _ in sub.named_children()]
    return best


def find_parts(vlm) -> VLMParts:
    """Locate the language model, vision tower, projector and vision blocks of ``vlm``."""
    base = getattr(vlm, "model", None)
    get_decoder = getattr(vlm, "get_decoder", None)
    decoder = get_decoder() if get_decoder else None
    names = {id(m): n for n, m in vlm.named_modules()}
    if base is None or decoder is None or id(decoder) not in names:
        raise StageError(f"{type(vlm).__name__}: cannot find its language model (expected a *ForConditionalGeneration "
                         "VLM with .model and get_decoder())")  # fmt: skip
    vision = next((f"model.{n}" for n in VISION_NAMES if hasattr(base, n)), None)
    projector = [f"model.{n}" for n in PROJECTOR_NAMES if hasattr(base, n)]
    if vision:
        tower = vlm.get_submodule(vision)
        projector += [f"{vision}.{n}" for n, _ in tower.named_children() if "merger" in n]  # Qwen-VL: inside the tower
    blocks = _longest_block_list(vlm.get_submodule(vision), vision, projector) if vision else []
    return VLMParts(names[id(decoder)], vision, projector, blocks)


def lora_targets(vlm, parts: VLMParts, suffixes: list[str]) -> list[str]:
    """Full names of the linear layers of the language model to adapt (all, or those whose last
    name component is in ``suffixes``)."""
    import torch.nn as nn

    out = [n for n, m in vlm.named_modules() if n.startswith(parts.language_model + ".") and isinstance(m, nn.Linear)
           and (not suffixes or n.rsplit(".", 1)[-1] in suffixes)]  # fmt: skip
    if not out:
        raise StageError(f"lora.targets: no linear layer of the language model ({parts.language_model}) matches "
                         f"{suffixes or 'any name'}")  # fmt: skip
    return out


def trainable_modules(parts: VLMParts, vision: str, fraction: float, projector: bool) -> list[str]:
    """Module names outside the language model that train: the last ``ceil(fraction x blocks)``
    vision blocks (``last_fraction``), the whole tower (``full``), the projector."""
    import math

    out: list[str] = []
    if vision == "full" and parts.vision_tower:
        out.append(parts.vision_tower)
    elif vision == "last_fraction" and parts.vision_tower:
        if not parts.vision_blocks:
            raise StageError(f"vision: last_fraction: found no block list in the vision tower {parts.vision_tower}")
        k = max(1, math.ceil(fraction * len(parts.vision_blocks)))
        out += parts.vision_blocks[-k:]
    if projector:
        out += parts.projector
    return out
