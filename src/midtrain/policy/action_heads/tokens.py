"""The tokens head: the language model writes the chunk as action-bin tokens (RT-2 / OpenVLA; see
:mod:`midtrain.policy.heads`). It runs the backbone itself (teacher-forced in training, greedy
decoding in inference), so it has no fixed backbone features."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ...models.inputs import SEQUENCE_KEYS
from ..backbone import STATE_TOKEN, action_bin_token
from ..heads import ActionBins, masked_mean
from .base import ActionHead, HeadContext, HeadPrompt, action_targets


def tokens_bin_range(settings, normalization: str) -> float:
    """The bins cover ``[-r, r]``: ``settings.bin_range``, else 3 for mean_std and 1 for the [-1, 1] scalings."""
    if settings.bin_range is not None:
        return settings.bin_range
    return 3.0 if normalization == "mean_std" else 1.0


class ActionTokensPrompt(HeadPrompt):
    """The assistant turn is the chunk's ``H * A`` action-bin tokens (zeros without a target); the
    decoding prompt is the same sequence cut before its first action token, so training and decoding
    see identical prefixes. The state, if used, is a ``<|state|>`` placeholder at the end of the user turn."""

    answer_is_target = True

    def __init__(self, config, settings, tokenizer, binary: torch.Tensor):
        bins = settings.bins
        self.bins = ActionBins(bins, tokens_bin_range(settings, config.settings.normalization))
        self.bin_ids = torch.as_tensor(tokenizer.convert_tokens_to_ids([action_bin_token(k) for k in range(bins)]))
        self.state_id = tokenizer.convert_tokens_to_ids(STATE_TOKEN) if config.state_dim else None
        self.user_suffix = STATE_TOKEN if config.state_dim else ""
        self.binary = binary
        self.shape = (config.chunk_size, config.action_dim)
        self.pad_id = tokenizer.pad_token_id or 0

    def placeholders(self) -> dict[int, int]:
        return {} if self.state_id is None else {self.state_id: 1}

    def answer(self, target: Optional[np.ndarray]) -> str:
        k = np.zeros(self.shape, dtype=np.int64) if target is None else self._bins_of(target)
        return "".join(action_bin_token(int(i)) for i in k.reshape(-1))

    def _bins_of(self, target: np.ndarray) -> np.ndarray:
        y = torch.as_tensor(target)
        y = torch.where(self.binary, 2 * y - 1, y)
        return self.bins.encode(y).numpy()

    def finish(self, inputs: dict[str, Any]) -> dict[str, Any]:
        if "token_type_ids" in inputs:  # PaliGemma: a causal suffix from the first action token on
            started = torch.isin(inputs["input_ids"], self.bin_ids).cumsum(1) > 0
            inputs["token_type_ids"] = torch.where(started & inputs["attention_mask"].bool(), 1, inputs["token_type_ids"])
        return inputs

    def prompt_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The decoding prompt: :meth:`midtrain.policy.processor.PolicyProcessor.encode` outputs cut
        before each row's first action token and left-padded (what ``generate`` needs)."""
        return left_padded_prefix(inputs, torch.isin(inputs["input_ids"], self.bin_ids), self.pad_id)

    def decode_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Generated action tokens ``[B, H * A]`` -> the normalised chunk ``[B, H, A]``."""
        lookup = torch.full((int(self.bin_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.bin_ids] = torch.arange(len(self.bin_ids))
        k = lookup[token_ids.cpu().clamp(0, len(lookup) - 1)]
        if bool((k < 0).any()):
            raise RuntimeError("decoding produced a token that is not an action token")
        y = self.bins.decode(k).reshape(len(k), *self.shape)
        return torch.where(self.binary, (y > 0).float(), y)


def left_padded_prefix(inputs: dict[str, Any], cut: torch.Tensor, pad_id: int) -> dict[str, Any]:
    """Sequence tensors cut at each row's first ``cut`` position and re-padded on the left."""
    attn = inputs["attention_mask"]
    lengths = torch.where(cut.any(1), cut.float().argmax(1), attn.sum(1)).long()
    width = int(lengths.max())
    out = dict(inputs)
    for key in SEQUENCE_KEYS:
        value = inputs.get(key)
        if value is None or not hasattr(value, "shape") or value.dim() != 2:
            continue
        fill = pad_id if key == "input_ids" else 0
        new = torch.full((value.shape[0], width), fill, dtype=value.dtype)
        for i, n in enumerate(lengths.tolist()):
            new[i, width - n :] = value[i, :n]
        out[key] = new
    return out


class TokensHead(ActionHead):
    needs_causal_lm = True
    reads_backbone = False
    trains_token_matrix = True
    predicts_with_language_model = True
    settings_field = "tokens"

    def __init__(self, config, backbone, io):
        super().__init__(config, backbone, io)
        sd = config.state_dim
        self.state_proj = nn.Linear(sd, backbone.hidden_size) if sd else None

    @classmethod
    def added_tokens(cls, config) -> list[str]:
        return [action_bin_token(k) for k in range(cls.settings(config.settings).bins)] + ([STATE_TOKEN] if config.state_dim else [])

    @classmethod
    def prompt(cls, config, tokenizer, binary: torch.Tensor) -> ActionTokensPrompt:
        return ActionTokensPrompt(config, cls.settings(config.settings), tokenizer, binary)

    def injected(self, batch_size: int, state: Optional[torch.Tensor]) -> dict[int, torch.Tensor]:
        if self.io.prompt.state_id is None:
            return {}
        return {self.io.prompt.state_id: self.state_proj(state.to(self.backbone.device))[:, None, :]}

    def action_token_logits(self, inputs: dict[str, Any], state: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ``(logits [B, H*A, vocab], labels [B, H*A])`` of the action tokens in
        ``inputs`` (training format): each token's logits come from the hidden state before it, and
        only those rows go through the LM head (no ``[B, T, vocab]`` tensor)."""
        backbone = self.backbone
        ids = inputs["input_ids"].to(backbone.device)
        with backbone.injected(self.injected(ids.shape[0], state)):
            hidden = backbone.hidden_states(inputs)
        is_action = torch.isin(ids, self.io.prompt.bin_ids.to(backbone.device))
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
        allowed = self.io.prompt.bin_ids.to(backbone.device)

        class OnlyActionTokens(LogitsProcessor):
            def __call__(self, input_ids, scores):
                keep = torch.full_like(scores, float("-inf"))
                keep[:, allowed] = 0
                return scores + keep

        kw = backbone.model_inputs(self.io.prompt.prompt_inputs(ctx.inputs))
        n = self.config.chunk_size * self.config.action_dim
        with backbone.injected(self.injected(kw["input_ids"].shape[0], ctx.state)):
            out = backbone.vlm.generate(
                **kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                logits_processor=LogitsProcessorList([OnlyActionTokens()]),
                pad_token_id=self.io.processor.tokenizer.pad_token_id, eos_token_id=None,
            )  # fmt: skip
        return self.io.prompt.decode_tokens(out[:, -n:])

    @staticmethod
    def checkpoint_key(key: str) -> str:
        return f"head.{key}" if key.startswith("state_proj.") else key
