"""The tokens head: the language model writes the chunk as action-bin tokens (RT-2 / OpenVLA; see
:mod:`midtrain.policy.heads`). It runs the backbone itself (teacher-forced in training, greedy
decoding in inference), so it has no fixed backbone features."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..backbone import STATE_TOKEN, action_bin_token
from ..heads import masked_mean
from .base import ActionHead, HeadContext, action_targets


class TokensHead(ActionHead):
    needs_causal_lm = True
    reads_backbone = False
    trains_token_matrix = True

    def __init__(self, config, backbone, io):
        super().__init__(config, backbone, io)
        sd = config.state_dim
        self.state_proj = nn.Linear(sd, backbone.hidden_size) if sd else None

    @classmethod
    def added_tokens(cls, config) -> list[str]:
        return [action_bin_token(k) for k in range(config.settings.tokens.bins)] + ([STATE_TOKEN] if config.state_dim else [])

    def injected(self, batch_size: int, state: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
        if self.io.state_id is None:
            return {}
        return {self.io.state_id: self.state_proj(state.to(self.backbone.device))[:, None, :]}

    def action_token_logits(self, inputs: dict[str, Any], state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ``(logits [B, H*A, vocab], labels [B, H*A])`` of the action tokens in
        ``inputs`` (training format): each token's logits come from the hidden state before it, and
        only those rows go through the LM head (no ``[B, T, vocab]`` tensor)."""
        backbone = self.backbone
        ids = inputs["input_ids"].to(backbone.device)
        with backbone.injected(self.injected(ids.shape[0], state)):
            hidden = backbone.hidden_states(inputs)
        is_action = torch.isin(ids, self.io.bin_ids.to(backbone.device))
        b, n = ids.shape[0], self.config.chunk_size * self.config.action_dim
        pos = torch.nonzero(is_action)[:, 1].reshape(b, n)
        prev = hidden.gather(1, (pos - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        return backbone.vlm.get_output_embeddings()(prev).float(), ids.gather(1, pos)

    def loss(self, ctx: HeadContext, batch: dict[str, Any]):
        """Cross-entropy of the LM on the action tokens only, over valid chunk steps."""
        _, mask = action_targets(batch, ctx.binary.device)
        logits, labels = self.action_token_logits(ctx.inputs, ctx.state)
        b, n = labels.shape
        ce = nn.functional.cross_entropy(logits.reshape(b * n, -1), labels.reshape(-1), reduction="none").reshape(b, n)
        weights = mask[:, :, None].expand(-1, -1, self.config.action_dim).reshape(b, n)
        loss = masked_mean(ce, weights)
        acc = masked_mean((logits.argmax(-1) == labels).float(), weights)
        return loss, {"token_accuracy": float(acc)}

    def sample(self, ctx: HeadContext, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Greedy decoding of the H * A action tokens, restricted to the bin tokens."""
        from transformers import LogitsProcessor, LogitsProcessorList

        backbone = self.backbone
        allowed = self.io.bin_ids.to(backbone.device)

        class OnlyActionTokens(LogitsProcessor):
            def __call__(self, input_ids, scores):
                keep = torch.full_like(scores, float("-inf"))
                keep[:, allowed] = 0
                return scores + keep

        kw = backbone.model_inputs(self.io.prompt_inputs(ctx.inputs))
        n = self.config.chunk_size * self.config.action_dim
        with backbone.injected(self.injected(kw["input_ids"].shape[0], ctx.state)):
            out = backbone.vlm.generate(
                **kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                logits_processor=LogitsProcessorList([OnlyActionTokens()]),
                pad_token_id=self.io.processor.tokenizer.pad_token_id, eos_token_id=None,
            )  # fmt: skip
        return self.io.decode_tokens(out[:, -n:])

    @staticmethod
    def checkpoint_key(key: str) -> str:
        return f"head.{key}" if key.startswith("state_proj.") else key
