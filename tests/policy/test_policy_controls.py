"""The study's controls as policy settings: ``blank_images`` (the blind control: every camera image is
one constant frame, in training and closed loop alike) and ``features: vision_tower`` (the VLM's
pooled image features, no language model), on tiny VLMs of the real architectures and on the demo
VLM's architecture (LLaVA with the EfficientNet-Lite0 tower)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from midtrain.config import ConfigError
from midtrain.models.tiny import ARCHS
from midtrain.policy import PolicySettings, VLAPolicy
from robot_data import CAMERA, INSTRUCTIONS, observation, policy_config, robot_rows

SMALL_FLOW = {"width": 64, "layers": 2, "heads": 2}


def _policy(model_dir, head: str = "mlp", **settings) -> VLAPolicy:
    if head == "flow":
        settings.setdefault("flow", SMALL_FLOW)
    rows = robot_rows(episodes=1, length=3)
    return VLAPolicy.build(policy_config(head, rows, **settings), model_dir, device="cpu", seed=0)


def _other_image(obs: dict) -> dict:
    return {**obs, CAMERA: 255 - np.asarray(obs[CAMERA])}


def _chunk(policy: VLAPolicy, obs: dict) -> torch.Tensor:
    noise = torch.zeros(1, policy.config.chunk_size, policy.config.action_dim)  # the flow head's draw, fixed
    return policy.predict_action_chunk(obs, noise=noise)


# --------------------------------------------------------------------------- blind


@pytest.mark.parametrize("head", ["mlp", "flow"])
def test_a_blind_policy_ignores_the_camera_and_a_normal_one_does_not(tiny_vlm, head):
    obs = observation(t=1)
    blind = _policy(tiny_vlm("qwen2_vl"), head, blank_images=True)
    assert torch.equal(_chunk(blind, obs), _chunk(blind, _other_image(obs)))
    normal = _policy(tiny_vlm("qwen2_vl"), head)
    assert not torch.equal(_chunk(normal, obs), _chunk(normal, _other_image(obs)))
    other_task = {**obs, "task": INSTRUCTIONS[2]}  # blind is not deaf: the instruction still counts
    assert not torch.equal(_chunk(blind, obs), _chunk(blind, other_task))


def test_a_blind_policy_trains_on_the_constant_frame_it_acts_on(tiny_vlm, tmp_path):
    rows = robot_rows(episodes=2, length=3)
    blind = _policy(tiny_vlm("qwen2_vl"), blank_images=True)
    per_image = blind.io.collate(rows)["inputs"]["pixel_values"].reshape(len(rows), -1)
    assert all(torch.equal(p, per_image[0]) for p in per_image)  # one constant frame for every training sample
    live = blind.io.encode(blind.io.observation_rows(observation(t=1))[0])["pixel_values"]
    assert torch.equal(live.reshape(-1), per_image[0])  # and the same frame in closed loop
    seen = _policy(tiny_vlm("qwen2_vl")).io.collate(rows)["inputs"]["pixel_values"].reshape(len(rows), -1)
    assert not all(torch.equal(p, seen[0]) for p in seen)
    blind.save_pretrained(tmp_path / "policy")  # the setting travels with the checkpoint, so `midtrain eval` blanks too
    loaded = VLAPolicy.from_pretrained(tmp_path / "policy", device="cpu")
    assert loaded.config.settings.blank_images
    assert torch.equal(_chunk(loaded, observation(t=1)), _chunk(loaded, _other_image(observation(t=1))))


# --------------------------------------------------------------------------- vision tower


@pytest.mark.parametrize("arch", ARCHS)
def test_vision_tower_features_are_the_models_image_features_pooled_per_sample(tiny_vlm, arch):
    policy = _policy(tiny_vlm(arch), features="vision_tower")
    rows = robot_rows(episodes=2, length=2)
    both = policy.backbone.pooled_image_features(policy.io.encode(rows))
    alone = torch.cat([policy.backbone.pooled_image_features(policy.io.encode([r])) for r in rows])
    assert both.shape == (len(rows), 1, policy.backbone.hidden_size)
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=1e-4)  # each sample pools its own image tokens
    assert not torch.allclose(both[0], both[2])  # different frames, different features


def test_vision_tower_policy_runs_no_language_model_and_reads_the_image(tiny_vlm, tmp_path):
    policy = _policy(tiny_vlm("qwen2_vl"), features="vision_tower")
    language_model = policy.backbone.vlm.get_decoder()

    def refuse(*_):
        raise AssertionError("the language model ran")

    hook = language_model.register_forward_pre_hook(refuse)
    obs = observation(t=1)
    chunk = _chunk(policy, obs)
    assert not torch.equal(chunk, _chunk(policy, _other_image(obs)))
    assert torch.equal(chunk, _chunk(policy, {**obs, "task": INSTRUCTIONS[2]}))  # no language model: the text is unread
    hook.remove()
    policy.save_pretrained(tmp_path / "policy")
    assert torch.equal(_chunk(VLAPolicy.from_pretrained(tmp_path / "policy", device="cpu"), obs), chunk)


@pytest.mark.parametrize("head", ["mlp", "flow"])
def test_vision_tower_features_can_be_precomputed_for_a_frozen_backbone(tiny_vlm, head):
    rows = robot_rows(episodes=1, length=3)
    policy = _policy(tiny_vlm("qwen2_vl"), head, features="vision_tower")
    policy.configure_trainable("frozen")
    batch = policy.io.collate(rows)
    feats = policy.backbone_features(batch["inputs"], batch["state"])
    assert [tuple(f.shape) for f in feats] == [(1, policy.backbone.hidden_size)] * len(rows)
    noise = torch.zeros(len(rows), 4, 4)
    direct = policy.predict_normalized(batch["inputs"], batch["state"], noise)
    cached = policy.predict_normalized(None, batch["state"], noise, features=feats)
    torch.testing.assert_close(direct, cached)
    if head == "mlp":  # the queries come after the backbone here, so they still train with it frozen
        assert policy.head.queries.requires_grad


def test_vision_tower_head_learns(tiny_vlm):
    rows = robot_rows(episodes=2, length=3)
    policy = _policy(tiny_vlm("qwen2_vl"), features="vision_tower")
    policy.configure_trainable("frozen")
    batch = policy.io.collate(rows)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(60):
        loss, _ = policy(batch)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_vision_tower_refuses_the_tokens_head():
    with pytest.raises(ConfigError, match="tokens head"):
        PolicySettings(head="tokens", features="vision_tower")


def test_vision_tower_on_the_demo_vlm_architecture(loaded_vlm, tmp_path):
    """LLaVA with the demo VLM's EfficientNet-Lite0 tower (random weights), its processor and a tiny
    causal language model: 49 image tokens of width 1280, projected to the language model's width."""
    from transformers import LlamaConfig, LlavaForConditionalGeneration

    from midtrain.models.demo_vlm import IMAGE_TOKEN, demo_processor, llava_config
    from midtrain.models.smollm2 import CHAT_TEMPLATE

    tokenizer = copy.deepcopy(loaded_vlm("qwen2_vl")[1].tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(llava_config(text, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), True)).eval()
    folder = tmp_path / "demo_arch"
    model.save_pretrained(folder)
    demo_processor(tokenizer, CHAT_TEMPLATE).save_pretrained(folder)

    policy = _policy(folder, features="vision_tower")
    rows = robot_rows(episodes=2, length=2)
    inputs = policy.io.encode(rows)
    both = policy.backbone.pooled_image_features(inputs)
    assert both.shape == (len(rows), 1, 32)
    vlm = policy.backbone.vlm.model
    with torch.no_grad():  # the oracle: the model's own tower and projector, averaged over the 49 tokens
        tower = vlm.vision_tower(inputs["pixel_values"]).last_hidden_state
        expected = vlm.multi_modal_projector(tower).mean(1, keepdim=True)
    assert tower.shape[1] == 49
    torch.testing.assert_close(both, expected, atol=1e-5, rtol=1e-4)
    obs = observation(t=1)
    assert not torch.equal(_chunk(policy, obs), _chunk(policy, _other_image(obs)))
