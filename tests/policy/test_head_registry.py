"""A head is registered by name: one added to ``HEADS`` (here, in this file only) builds, trains and
samples through ``VLAPolicy`` without an edit of the processor or the configuration, including a
placeholder token of its own in the prompt; and ``policy.head`` accepts exactly the registered names."""

from __future__ import annotations

from typing import Any, Optional

import pytest
import torch
from torch import nn

from midtrain.config import ConfigError
from midtrain.policy import PolicySettings, VLAPolicy
from midtrain.policy.action_heads import HEADS, ActionHead, HeadPrompt
from midtrain.policy.action_heads.base import action_targets
from robot_data import observation, policy_config, robot_rows

READOUT_TOKEN = "<|readout|>"


class ReadoutPrompt(HeadPrompt):
    """One readout placeholder at the end of the user turn; no assistant turn."""

    user_suffix = READOUT_TOKEN

    def __init__(self, token_id: int):
        self.token_id = token_id

    def placeholders(self) -> dict[int, int]:
        return {self.token_id: 1}


class ReadoutHead(ActionHead):
    """The chunk as a linear map of the hidden state at its readout token, trained with squared error."""

    def __init__(self, config, backbone, io):
        super().__init__(config, backbone, io)
        self.out = nn.Linear(backbone.hidden_size, config.chunk_size * config.action_dim)

    @classmethod
    def added_tokens(cls, config) -> list[str]:
        return [READOUT_TOKEN]

    @classmethod
    def prompt(cls, config, tokenizer, binary) -> ReadoutPrompt:
        return ReadoutPrompt(tokenizer.convert_tokens_to_ids(READOUT_TOKEN))

    def read(self, hidden: torch.Tensor, inputs: dict[str, Any]):
        ids = inputs["input_ids"].to(hidden.device)
        return hidden[ids == self.io.prompt.token_id][:, None, :], None

    def _chunk(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.out(hidden[:, 0].float()).reshape(len(hidden), self.config.chunk_size, self.config.action_dim)

    def loss(self, ctx, batch: dict[str, Any]):
        target, mask = action_targets(batch, ctx.binary.device)
        err = ((self._chunk(ctx.hidden) - target) ** 2).mean(-1)
        return (err * mask).sum() / mask.sum(), {}

    def sample(self, ctx, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        y = self._chunk(ctx.hidden)
        return torch.where(ctx.binary, (y > 0.5).float(), y)


@pytest.fixture
def readout_head(monkeypatch):
    monkeypatch.setitem(HEADS, "readout", ReadoutHead)
    return "readout"


def test_a_head_registered_by_name_trains_and_samples(tiny_vlm, readout_head):
    rows = robot_rows(episodes=1, length=3, chunk=4)
    policy = VLAPolicy.build(policy_config(readout_head, rows, chunk=4), tiny_vlm("qwen2_vl"), device="cpu", seed=0)
    assert isinstance(policy.head, ReadoutHead)
    policy.configure_trainable("frozen")
    policy.train()
    batch = policy.io.collate(rows)
    ids = batch["inputs"]["input_ids"]
    assert ((ids == policy.io.prompt.token_id).sum(1) == 1).all()  # its placeholder is in every prompt
    opt = torch.optim.SGD([p for p in policy.parameters() if p.requires_grad], lr=0.05)
    before = policy.head.out.weight.detach().clone()
    loss, _ = policy(batch)
    loss.backward()
    opt.step()
    assert not torch.equal(policy.head.out.weight, before)
    with torch.no_grad():
        after, _ = policy(batch)
    assert float(after) < loss.item()  # one step on the batch lowers its loss: the gradient reached the head
    chunk = policy.predict_action_chunk(observation(t=1))
    assert chunk.shape == (1, 4, 4) and torch.isfinite(chunk).all()
    with torch.no_grad():  # a readout that ignores the observation: the chunk is its bias, unnormalised
        policy.head.out.weight.zero_()
        policy.head.out.bias.copy_(torch.linspace(-0.9, 0.9, 16))
    want = torch.linspace(-0.9, 0.9, 16).reshape(1, 4, 4)
    want[..., 3] = (want[..., 3] > 0.5).float()  # dim 3 is the binarised gripper
    expected = policy.io.action_normalizer.unnormalize(want.numpy())
    torch.testing.assert_close(policy.predict_action_chunk(observation(t=1)), torch.as_tensor(expected, dtype=torch.float32))


def test_the_head_setting_accepts_the_registered_names(readout_head):
    assert PolicySettings(head=readout_head).head_class is ReadoutHead
    with pytest.raises(ConfigError, match=r"head: expected one of mlp, flow, tokens, readout, got 'mystery'"):
        PolicySettings(head="mystery")


def test_a_head_that_predicts_with_the_language_model_refuses_vision_tower_features(monkeypatch):
    class SpeakingHead(ReadoutHead):
        predicts_with_language_model = True

    monkeypatch.setitem(HEADS, "speaking", SpeakingHead)
    PolicySettings(head="mlp", features="vision_tower")  # a head that reads the backbone may
    with pytest.raises(ConfigError, match="the speaking head predicts with"):
        PolicySettings(head="speaking", features="vision_tower")


def test_a_head_whose_settings_section_is_missing_is_named(monkeypatch):
    class Unsettled(ReadoutHead):
        settings_field = "unsettled"

    monkeypatch.setitem(HEADS, "unsettled", Unsettled)
    with pytest.raises(ConfigError, match=r"policy.unsettled, which PolicySettings lacks"):
        PolicySettings(head="unsettled")
