"""The mlp head: chunk regression from learned action-query states (:class:`midtrain.policy.heads.MLPActionHead`)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..backbone import ACTION_QUERY_TOKEN
from ..heads import MLPActionHead
from .base import ActionHead, HeadContext, HeadPrompt, action_targets


class QueryPrompt(HeadPrompt):
    """The assistant turn is Q action-query placeholders (their embeddings are the learned queries)."""

    def __init__(self, query_id: int, num_queries: int):
        self.query_id, self.num_queries = query_id, num_queries

    def placeholders(self) -> dict[int, int]:
        return {self.query_id: self.num_queries}

    def answer(self, target) -> str:
        return ACTION_QUERY_TOKEN * self.num_queries


class MLPHead(ActionHead):
    """Q learnable queries (``[Q, D]``, backbone inputs at the action-query tokens) and the MLP-ResNet."""

    settings_field = "mlp"

    def __init__(self, config, backbone, io):
        super().__init__(config, backbone, io)
        d = backbone.hidden_size
        self.queries = nn.Parameter(torch.randn(io.prompt.num_queries, d) * backbone.embedding_scale())
        self.net = MLPActionHead(d, config.action_dim, config.chunk_size, config.state_dim, self.settings(config.settings))

    @classmethod
    def prompt(cls, config, tokenizer, binary: torch.Tensor) -> QueryPrompt:
        num_queries = config.chunk_size if cls.settings(config.settings).queries == "chunk" else 1
        return QueryPrompt(tokenizer.convert_tokens_to_ids(ACTION_QUERY_TOKEN), num_queries)

    @classmethod
    def added_tokens(cls, config) -> list[str]:
        return [ACTION_QUERY_TOKEN]

    def injected(self, batch_size: int, state: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
        return {self.io.prompt.query_id: self.queries[None].expand(batch_size, -1, -1)}

    def read(self, hidden: torch.Tensor, inputs: dict[str, Any]) -> tuple[torch.Tensor, None]:
        ids = inputs["input_ids"].to(hidden.device)
        return hidden[ids == self.io.prompt.query_id].reshape(ids.shape[0], self.io.prompt.num_queries, hidden.shape[-1]), None

    def read_pooled(self, pooled: torch.Tensor) -> tuple[torch.Tensor, None]:
        """Pooled image features plus each query: the per-step inputs of the MLP-ResNet (``[B, Q, D]``)."""
        return pooled + self.queries[None].to(pooled.dtype), None

    def collate_features(self, features: list[torch.Tensor]) -> tuple[torch.Tensor, None]:
        return torch.stack(features), None

    def backbone_inputs(self) -> list[nn.Parameter]:
        return [] if self.config.settings.features == "vision_tower" else [self.queries]  # then they train after the backbone

    def loss(self, ctx: HeadContext, batch: dict[str, Any]):
        target, mask = action_targets(batch, ctx.binary.device)
        return self.net.loss(self.net(ctx.hidden, ctx.state), target, mask, ctx.binary)

    def sample(self, ctx: HeadContext, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.net.decode(self.net(ctx.hidden, ctx.state), ctx.binary)

    @staticmethod
    def checkpoint_key(key: str) -> str:
        if key == "queries":
            return "head.queries"
        return f"head.net.{key[5:]}" if key.startswith("head.") and not key.startswith(("head.net.", "head.queries")) else key
