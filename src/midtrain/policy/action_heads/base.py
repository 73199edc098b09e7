"""The contract every action head satisfies, so ``VLAPolicy`` never asks which head it has.

A head is an ``nn.Module`` built from ``(config, backbone, io)`` that

- says what it adds to the prompt (:meth:`prompt`, a :class:`HeadPrompt` the processor holds as
  ``io.prompt``: placeholders after the instruction, the assistant turn, the decoding prompt), which
  settings are its own (``settings_field``: the ``policy.<field>`` section, or None) and whether the
  language model itself predicts (``predicts_with_language_model``: then it needs the language model
  to run and to train, so ``features: vision_tower`` and a frozen backbone are refused);
- says what it needs of the backbone: tokens to add to the processor (:meth:`added_tokens`),
  embeddings to place at its placeholder tokens (:meth:`injected`), whether it reads the backbone's
  output (``reads_backbone``; the tokens head runs the language model itself) and how
  (:meth:`read`: the hidden states it keeps, and their padding mask);
- trains: :meth:`loss` ``(context, batch) -> (loss, logs)`` on normalised targets;
- acts: :meth:`sample` ``(context, noise) -> [B, H, A]``, the normalised chunk with binarised dims as
  probabilities or ``{0, 1}`` (:meth:`midtrain.policy.normalize.Normalizer.unnormalize` reads it).

What adding a head takes is in :mod:`midtrain.policy.action_heads`.
The math of the existing heads is in :mod:`midtrain.policy.heads`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch
from torch import nn


@dataclass
class HeadContext:
    """What a head sees of one batch of observations."""

    inputs: Optional[dict[str, Any]]  # the backbone inputs (PolicyProcessor.encode / collate); None with features
    state: Optional[torch.Tensor]  # [B, S] normalised state on the policy's device, or None
    binary: torch.Tensor  # [A] bool: the binarised (gripper) dims
    hidden: Optional[torch.Tensor] = None  # what :meth:`ActionHead.read` kept of the backbone's output
    mask: Optional[torch.Tensor] = None  # [B, T] True = a real token of ``hidden`` (None: no padding)


class HeadPrompt:
    """What a head adds to the policy's prompt (the processor's ``prompt``). The default adds nothing:
    the head reads the prompt as the VLM renders it. Must pickle (the processor goes to DataLoader workers)."""

    user_suffix: str = ""  # text after the instruction in the user turn (placeholder tokens)
    answer_is_target: bool = False  # the assistant turn spells the target chunk (collate passes the targets)

    def placeholders(self) -> dict[int, int]:
        """Token id -> how many of it each prompt must keep (checked after the VLM's processor)."""
        return {}

    def answer(self, target: Optional[np.ndarray]) -> Optional[str]:
        """The assistant turn (None: no turn); ``target`` is the normalised ``[H, A]`` chunk when
        ``answer_is_target`` and training, else None."""
        return None

    def finish(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The processor's outputs, adjusted for the head."""
        return inputs


class ActionHead(nn.Module):
    """See the module docstring. ``backbone`` and ``io`` are the policy's (not registered here, so
    the head's weights are only its own)."""

    needs_causal_lm: ClassVar[bool] = False  # its targets are next tokens (a bidirectional LM would see them)
    reads_backbone: ClassVar[bool] = True  # False: the head runs the backbone itself (no fixed features)
    trains_token_matrix: ClassVar[bool] = False  # its added tokens' embeddings and LM-head rows train
    draws_noise: ClassVar[bool] = False  # :meth:`sample` draws noise (seeded per episode by the policy)
    predicts_with_language_model: ClassVar[bool] = False  # its actions are the language model's outputs
    settings_field: ClassVar[Optional[str]] = None  # its settings: the field of PolicySettings (``policy.<field>``)

    def __init__(self, config, backbone, io):
        super().__init__()
        self.config = config
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "io", io)

    @classmethod
    def settings(cls, policy_settings) -> Any:
        """This head's settings section of :class:`midtrain.policy.configuration.PolicySettings` (None: it has none)."""
        return getattr(policy_settings, cls.settings_field) if cls.settings_field else None

    @classmethod
    def prompt(cls, config, tokenizer, binary: torch.Tensor) -> HeadPrompt:
        """What this head adds to the prompt (``binary``: the binarised action dims)."""
        return HeadPrompt()

    @classmethod
    def added_tokens(cls, config) -> list[str]:
        """Special tokens the processor needs for this head."""
        return []

    def injected(self, batch_size: int, state: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Embeddings that replace placeholder tokens in the backbone's input (token id -> [B, n, D])."""
        return {}

    def read(self, hidden: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(hidden, mask)``: what the head keeps of the backbone's last hidden states ``[B, T, D]``."""
        return hidden, inputs["attention_mask"].to(hidden.device).bool()

    def read_pooled(self, pooled: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """``(hidden, mask)`` from pooled image features ``[B, 1, D]`` (``policy.features: vision_tower``)."""
        return pooled, torch.ones(pooled.shape[:2], dtype=torch.bool, device=pooled.device)

    def features(self, hidden: torch.Tensor, mask: Optional[torch.Tensor]) -> list[torch.Tensor]:
        """What :meth:`read` kept, per sample and unpadded (a frozen backbone's fixed features)."""
        return [hidden[i, mask[i]] for i in range(len(hidden))] if mask is not None else list(hidden)

    def collate_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-sample features back to ``(hidden, mask)``, padded."""
        lengths = torch.tensor([len(f) for f in features], device=features[0].device)
        hidden = nn.utils.rnn.pad_sequence(features, batch_first=True)
        return hidden, torch.arange(hidden.shape[1], device=hidden.device)[None] < lengths[:, None]

    def backbone_inputs(self) -> list[nn.Parameter]:
        """Weights that are backbone inputs (fixed with a frozen backbone, so features stay fixed)."""
        return []

    def loss(self, ctx: HeadContext, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """``(loss, logs)`` of one training batch; every head defines it (the contract of this class)."""
        raise NotImplementedError(f"{type(self).__name__} defines no loss(ctx, batch): an action head needs one")

    def sample(self, ctx: HeadContext, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """A normalised action chunk ``[B, H, A]`` from the context; every head defines it."""
        raise NotImplementedError(f"{type(self).__name__} defines no sample(ctx): an action head needs one")

    @staticmethod
    def checkpoint_key(key: str) -> str:
        """A weight name of a policy saved before the heads were modules of their own -> today's."""
        return key


def action_targets(batch: dict[str, Any], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(target [B, H, A] float32, mask [B, H])`` of a training batch on ``device``."""
    return batch["action"].to(device).float(), batch["action_mask"].to(device)
