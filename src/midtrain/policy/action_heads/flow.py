"""The flow head: a flow-matching action expert cross-attending to the backbone
(:class:`midtrain.policy.heads.FlowActionExpert`)."""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..heads import FlowActionExpert
from .base import ActionHead, HeadContext, action_targets


class FlowHead(ActionHead):
    draws_noise = True
    settings_field = "flow"

    def __init__(self, config, backbone, io):
        super().__init__(config, backbone, io)
        self.net = FlowActionExpert(backbone.hidden_size, config.action_dim, config.chunk_size, config.state_dim,
                                    self.settings(config.settings))  # fmt: skip

    def loss(self, ctx: HeadContext, batch: dict[str, Any]):
        target, mask = action_targets(batch, ctx.binary.device)
        return self.net.loss(target, mask, ctx.binary, ctx.hidden, ctx.mask, ctx.state)

    def sample(self, ctx: HeadContext, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        if noise is not None:
            noise = noise.to(ctx.binary.device)
        return self.net.sample(ctx.hidden, ctx.mask, ctx.binary, ctx.state, noise)

    @staticmethod
    def checkpoint_key(key: str) -> str:
        return f"head.net.{key[5:]}" if key.startswith("head.") and not key.startswith("head.net.") else key
