"""The policy's backbone: any ``AutoModelForImageTextToText`` VLM, with placeholder tokens whose input
embeddings the policy supplies, and its trainable parts chosen (full | lora | frozen).

**Placeholders.** Learnable action queries (``mlp`` head) and the projected state token
(``tokens`` head) enter the sequence as added special tokens (``<|action_query|>``,
``<|state|>``) written into the prompt; a forward hook on the input-embedding module replaces
their embeddings with the policy's tensors. The prompt goes through the model's own chat
template and processor like any sample, so this works for every architecture the processor and
``masked_scatter`` of image features already handle (the hook only touches rows of the
placeholder ids, and the models place image features by image-token id, not by embedding).

**Trainable parts.** ``full``: every weight (the vision tower too unless ``vision: frozen``);
``lora``: LoRA adapters (peft) on every linear layer of the language model, plus the vision tower
if ``vision: trainable``, plus the token embedding / output matrix when the head predicts added
tokens; ``frozen``: nothing (a probe of the initialisation; the policy then computes each
sample's backbone output once).

**Vision tower only** (``policy.features: vision_tower``, the study's reference row):
:meth:`Backbone.pooled_image_features` runs the VLM's own ``get_image_features`` (vision tower and
projector, the features the model would place at its image tokens) and averages them over each
sample's image tokens; the language model does not run. :meth:`Backbone.save_pretrained` writes an ordinary checkpoint
(LoRA merged: ``W + scale * B A`` computed into the saved weights, the live adapters untouched),
which :func:`midtrain.models.load_vlm` loads.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..models.forward import accepted_arguments
from ..models.loading import ModelLoadError, backbone as base_model
from ..models.parts import LoraSettings, find_parts, lora_targets
from ..runs import StageError

ACTION_QUERY_TOKEN = "<|action_query|>"
STATE_TOKEN = "<|state|>"
BIDIRECTIONAL_TEXT_MODELS = ("bert", "roberta", "midtrain_bidirectional_text")
INSTALL_HINT = "pip install 'midtrain[train]'"


def action_bin_token(k: int) -> str:
    return f"<|act_{k}|>"


def vision_module(vlm) -> nn.Module | None:
    """The vision encoder of a VLM (see :func:`midtrain.models.parts.find_parts`)."""
    parts = find_parts(vlm)
    return vlm.get_submodule(parts.vision_tower) if parts.vision_tower else None


def is_bidirectional(vlm) -> bool:
    """True for VLMs whose language model attends both ways (the demo VLM's MiniLM), which cannot
    learn next-token prediction."""
    return getattr(vlm.config.get_text_config(), "model_type", "") in BIDIRECTIONAL_TEXT_MODELS


def add_special_tokens(vlm, processor, tokens: list[str]) -> list[int]:
    """Add ``tokens`` to the processor's tokenizer (as special tokens) and grow the embeddings to
    fit; returns their ids. New rows start at the mean of the old ones (transformers' mean
    resizing), so they do not disturb the model before training."""
    tok = processor.tokenizer
    new = [t for t in tokens if t not in tok.get_vocab()]
    if new:
        tok.add_tokens(new, special_tokens=True)
    rows = vlm.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        vlm.resize_token_embeddings(len(tok), mean_resizing=True)
    return tok.convert_tokens_to_ids(tokens)


class Backbone(nn.Module):
    """A VLM whose placeholder-token embeddings can be replaced for one call (see the module docstring)."""

    def __init__(self, vlm, processor):
        super().__init__()
        self.vlm = vlm
        self.processor = processor
        self._inject: dict[int, torch.Tensor] = {}
        self._hook = vlm.get_input_embeddings().register_forward_hook(self._replace_embeddings)
        self.accepted = accepted_arguments(base_model(vlm).forward)
        self.accepted |= {"pixel_values", "image_grid_thw", "pixel_attention_mask", "image_sizes", "mm_token_type_ids"} & (
            accepted_arguments(vlm.forward)
        )
        self.lora_applied = False
        image_features = getattr(base_model(vlm), "get_image_features", None)
        self.image_feature_arguments = accepted_arguments(image_features) if image_features is not None else set()

    @property
    def hidden_size(self) -> int:
        return int(self.vlm.config.get_text_config().hidden_size)

    @property
    def device(self) -> torch.device:
        return self.vlm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.vlm.get_input_embeddings().weight.dtype

    def embedding_scale(self) -> float:
        """Standard deviation of the token embeddings: the scale to initialise learned queries at."""
        return float(self.vlm.get_input_embeddings().weight.detach().float().std())

    # -- placeholders --------------------------------------------------------------------
    def _replace_embeddings(self, module, args, output):
        if not self._inject or not args:
            return output
        ids = args[0]
        for token_id, values in self._inject.items():
            where = ids == token_id
            if not bool(where.any()):
                continue
            flat = values.to(output.dtype).reshape(-1, output.shape[-1])
            if int(where.sum()) != flat.shape[0]:
                raise ValueError(
                    f"placeholder token {token_id}: {int(where.sum())} positions in the batch but {flat.shape[0]} "
                    "embeddings given (was the prompt truncated?)"
                )
            output = output.masked_scatter(where[..., None].expand_as(output), flat)
        return output

    @contextlib.contextmanager
    def injected(self, values: dict[int, torch.Tensor]) -> Iterator[None]:
        """Within the block, the input embeddings of token ``id`` are ``values[id]`` (``[B, n, D]``,
        rows in sequence order); tokens of other ids are embedded as usual."""
        previous = self._inject
        self._inject = {k: v for k, v in values.items() if v is not None}
        try:
            yield
        finally:
            self._inject = previous

    # -- running -------------------------------------------------------------------------
    def model_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor outputs the model accepts, on its device; floating tensors in its dtype."""
        out = {}
        for key, value in inputs.items():
            if key not in self.accepted or not hasattr(value, "to"):
                continue
            out[key] = value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
        return out

    def hidden_states(self, inputs: dict[str, Any]) -> torch.Tensor:
        """Last hidden states ``[B, T, D]`` (after the final norm) of the base model; no LM head."""
        return base_model(self.vlm)(**self.model_inputs(inputs), use_cache=False).last_hidden_state

    def pooled_image_features(self, inputs: dict[str, Any]) -> torch.Tensor:
        """``[B, 1, D]``: the mean over each sample's image tokens of the VLM's projected image features
        (``get_image_features``: what the model places at those tokens); no language model runs."""
        from ..models.loading import multimodal_token_ids

        base = base_model(self.vlm)
        if not self.image_feature_arguments:
            raise ModelLoadError(f"policy.features: vision_tower needs a VLM with get_image_features; {type(base).__name__} has none")
        args = {k: v for k, v in self.model_inputs(inputs).items() if k in self.image_feature_arguments}
        out = base.get_image_features(**args)
        feats = getattr(out, "pooler_output", out)
        parts = feats if isinstance(feats, (list, tuple)) else [feats]
        flat = torch.cat([f.reshape(-1, f.shape[-1]) for f in parts])
        image_ids = torch.tensor(multimodal_token_ids(self.vlm.config)["image"], device=flat.device)
        counts = torch.isin(inputs["input_ids"].to(flat.device), image_ids).sum(1)
        if int(counts.sum()) != flat.shape[0] or bool((counts == 0).any()):
            raise ValueError(f"policy.features: vision_tower: {flat.shape[0]} image features for image-token counts "
                             f"{counts.tolist()} per sample (every sample needs its image tokens, untruncated)")  # fmt: skip
        return torch.stack([chunk.mean(0) for chunk in flat.split(counts.tolist())])[:, None]

    # -- trainable parts -----------------------------------------------------------------
    def configure_trainable(self, mode: str, vision: str, lora: LoraSettings | None = None,
                            train_token_matrix: bool = False) -> dict[str, int]:  # fmt: skip
        """Set ``requires_grad`` for ``mode`` (full | lora | frozen) and ``vision`` (frozen | trainable);
        returns trainable parameter counts per part."""
        self.vlm.requires_grad_(False)
        if mode == "full":
            self.vlm.requires_grad_(True)
        elif mode == "lora":
            self._apply_lora(lora or LoraSettings())
            if train_token_matrix:
                self.vlm.get_input_embeddings().weight.requires_grad_(True)
                out = self.vlm.get_output_embeddings()
                if out is not None:
                    out.weight.requires_grad_(True)
        vis = vision_module(self.vlm)
        if vis is not None:
            vis.requires_grad_(vision == "trainable" and mode != "frozen")
        self.vlm.train(mode != "frozen")
        counts = {"backbone": 0, "vision": 0, "lora": 0}
        vis_ids = {id(p) for p in vis.parameters()} if vis is not None else set()
        for name, p in self.vlm.named_parameters():
            if p.requires_grad:
                key = "lora" if "lora_" in name else "vision" if id(p) in vis_ids else "backbone"
                counts[key] += p.numel()
        return counts

    def _apply_lora(self, settings: LoraSettings) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError:
            raise ModelLoadError(f"backbone.trainable: lora needs peft ({INSTALL_HINT})") from None
        try:
            names = lora_targets(self.vlm, find_parts(self.vlm), settings.targets)
        except StageError as exc:
            raise ModelLoadError(f"backbone.{exc}") from None
        config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=names)
        inject_adapter_in_model(config, self.vlm)
        self.lora_applied = True

    # -- saving --------------------------------------------------------------------------
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The VLM's weights with every LoRA update added in (``W + scale * B A``), under the
        original parameter names; the live model is not modified."""
        if not self.lora_applied:
            return self.vlm.state_dict()
        from peft.tuners.lora import LoraLayer

        deltas = {}
        for name, module in self.vlm.named_modules():
            if isinstance(module, LoraLayer):
                for adapter in module.active_adapters:
                    key = f"{name}.base_layer.weight"
                    deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter).detach()
        out = {}
        for key, value in self.vlm.state_dict().items():
            if "lora_" in key:
                continue
            if key in deltas:
                value = value + deltas[key].to(value.dtype)
            out[key.replace(".base_layer.", ".")] = value
        return out

    def save_pretrained(self, directory: Path) -> None:
        """An ordinary Hugging Face checkpoint (weights in safetensors) and the processor."""
        directory = Path(directory)
        state = self.merged_state_dict()
        if self.lora_applied:
            with _without_peft_flag(self.vlm):
                self.vlm.save_pretrained(directory, state_dict=state, safe_serialization=True)
        else:
            self.vlm.save_pretrained(directory, safe_serialization=True)
        self.processor.save_pretrained(directory)


@contextlib.contextmanager
def _without_peft_flag(model) -> Iterator[None]:
    """transformers saves only adapters for a model it believes holds peft adapters; the merged
    weights are a full model."""
    flag = getattr(model, "_hf_peft_config_loaded", None)
    if flag:
        model._hf_peft_config_loaded = False
    try:
        yield
    finally:
        if flag:
            model._hf_peft_config_loaded = flag
