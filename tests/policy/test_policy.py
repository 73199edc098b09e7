"""``VLAPolicy`` on tiny random VLMs of the supported architectures: each head overfits, save -> load
gives identical actions, padded steps do not count, ``select_action`` replans every
``n_action_steps``, greedy decoding matches the training-time forward, LoRA saves merged."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from midtrain.policy import VLAPolicy
from robot_data import CAMERA, observation, policy_config, robot_rows

SMALL_FLOW = {"width": 64, "layers": 2, "heads": 2}


def _policy(tiny_vlm, arch: str, head: str, rows, chunk: int = 4, seed: int = 0, **settings) -> VLAPolicy:
    if head == "flow":
        settings.setdefault("flow", SMALL_FLOW)
    cfg = policy_config(head, rows, chunk=chunk, **settings)
    return VLAPolicy.build(cfg, tiny_vlm(arch), device="cpu", seed=seed)


def _fit(policy: VLAPolicy, batch: dict, steps: int, lr: float) -> None:
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    policy.train()
    for _ in range(steps):
        loss, _ = policy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    policy.eval()


def _frozen_batch(policy: VLAPolicy, rows: list[dict], repeat: int = 1) -> dict:
    """A batch carrying the frozen backbone's features instead of its inputs, ``repeat`` times over."""
    batch = policy.io.collate(rows)
    feats = [f.detach() for f in policy.backbone_features(batch["inputs"], batch["state"])]
    return {"features": feats * repeat, "action": batch["action"].repeat(repeat, 1, 1),
            "action_mask": batch["action_mask"].repeat(repeat, 1), "state": batch["state"].repeat(repeat, 1),
            "sample_ids": batch["sample_ids"] * repeat}  # fmt: skip


def _flow_loss_at_fixed_draws(policy: VLAPolicy, batch: dict, draws: int = 4) -> float:
    g = torch.Generator().manual_seed(1)
    b, h, a = batch["action"].shape
    ctx = policy._context(batch.get("inputs"), batch["state"], batch.get("features"))
    with torch.no_grad():
        values = [policy.head.net.loss(batch["action"], batch["action_mask"], policy.binary, ctx.hidden, ctx.mask, batch["state"],
                                   torch.randn(b, h, a, generator=g), torch.rand(b, generator=g) * 0.999 + 0.001)[0]
                  for _ in range(draws)]  # fmt: skip
    return float(torch.stack(values).mean())


# --------------------------------------------------------------------------- each head overfits


def test_mlp_head_overfits(tiny_vlm):
    rows = robot_rows(episodes=2, length=4, chunk=4)
    policy = _policy(tiny_vlm, "qwen2_vl", "mlp", rows, mlp={"hidden_dim": 128})
    policy.configure_trainable("frozen")
    batch = _frozen_batch(policy, rows)
    before = policy(batch)[0].item()
    _fit(policy, batch, steps=300, lr=1e-3)
    after = float(policy(batch)[0])
    assert after < before / 10, (before, after)


@pytest.mark.slow
def test_flow_head_overfits(tiny_vlm):
    rows = robot_rows(episodes=1, length=4, chunk=4)
    policy = _policy(tiny_vlm, "qwen2_vl", "flow", rows)
    policy.configure_trainable("frozen")
    batch = _frozen_batch(policy, rows, repeat=8)  # several noise draws per sample and step
    before = _flow_loss_at_fixed_draws(policy, batch)
    _fit(policy, batch, steps=300, lr=3e-3)
    after = _flow_loss_at_fixed_draws(policy, batch)
    assert after < before / 10, (before, after)


def test_tokens_head_overfits_and_decodes_its_targets(tiny_vlm):
    rows = robot_rows(episodes=1, length=2, chunk=2)
    policy = _policy(tiny_vlm, "qwen2_vl", "tokens", rows, chunk=2)
    policy.configure_trainable("full")
    batch = policy.io.collate(rows)
    before = policy(batch)[0].item()
    _fit(policy, batch, steps=150, lr=3e-3)
    after, logs = policy(batch)
    assert float(after) < before / 10, (before, float(after))
    if logs["token_accuracy"] == 1.0:  # every valid target token is the argmax: greedy decoding returns them
        expected = policy.io.prompt.decode_tokens(_target_tokens(policy, batch))
        valid = batch["action_mask"]
        assert torch.equal(policy.predict_normalized(batch["inputs"], batch["state"])[valid], expected[valid])


def _target_tokens(policy: VLAPolicy, batch: dict) -> torch.Tensor:
    ids = batch["inputs"]["input_ids"]
    return ids[torch.isin(ids, policy.io.prompt.bin_ids)].reshape(len(ids), -1)


# --------------------------------------------------------------------------- save -> load, every architecture

ARCH_HEADS = [("qwen2_vl", "mlp"), ("qwen2_5_vl", "flow"), ("qwen3_vl", "tokens"), ("idefics3", "mlp"),
              ("smolvlm", "flow"), ("paligemma", "tokens"), ("internvl", "mlp")]  # fmt: skip


@pytest.mark.parametrize("arch,head", ARCH_HEADS)
def test_save_load_identical_actions(tiny_vlm, tmp_path, arch, head):
    rows = robot_rows(episodes=1, length=3, chunk=4)
    policy = _policy(tiny_vlm, arch, head, rows, n_action_steps=2)
    policy.configure_trainable("full")
    _fit(policy, policy.io.collate(rows), steps=2, lr=1e-3)  # weights that differ from any initialisation
    obs = observation(t=1)
    noise = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    chunk = policy.predict_action_chunk(obs, noise=noise)
    assert chunk.shape == (1, 4, 4) and chunk.dtype == torch.float32 and bool(torch.isfinite(chunk).all())
    assert set(chunk[0, :, 3].tolist()) <= {-1.0, 1.0}  # the binarised gripper answers in dataset units
    policy.save_pretrained(tmp_path / "policy")
    loaded = VLAPolicy.from_pretrained(tmp_path / "policy", device="cpu")
    assert loaded.config.to_dict() == policy.config.to_dict()
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), chunk)


# --------------------------------------------------------------------------- padded steps


@pytest.mark.parametrize("head", ["mlp", "flow", "tokens"])
def test_padded_steps_contribute_nothing(tiny_vlm, head):
    rows = robot_rows(episodes=1, length=3, chunk=4)  # frames 1 and 2 have padded steps
    policy = _policy(tiny_vlm, "qwen2_vl", head, rows)
    policy.configure_trainable("full")
    batch = policy.io.collate(rows)
    assert not bool(batch["action_mask"].all())
    garbled = [dict(r, action=[a if m else [9.0, -9.0, 9.0, 1.0] for a, m in zip(r["action"], r["action_mask"])]) for r in rows]
    results = []
    for b in (batch, policy.io.collate(garbled)):
        policy.zero_grad()
        torch.manual_seed(0)  # the same flow noise and time
        loss, _ = policy(b)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    assert results[0][0] == results[1][0]
    assert results[0][1].keys() == results[1][1].keys()
    assert all(torch.equal(results[0][1][n], results[1][1][n]) for n in results[0][1])


# --------------------------------------------------------------------------- select_action


def test_select_action_replans_every_n_action_steps(tiny_vlm, monkeypatch):
    rows = robot_rows(episodes=1, length=3, chunk=4)
    policy = _policy(tiny_vlm, "qwen2_vl", "mlp", rows, n_action_steps=3)
    chunks = []
    real = policy.predict_action_chunk

    def counting(batch, noise=None):
        chunks.append(real(batch, noise))
        return chunks[-1]

    monkeypatch.setattr(policy, "predict_action_chunk", counting)
    actions = [policy.select_action(observation(t=i % 3)) for i in range(7)]
    assert len(chunks) == 3  # steps 0, 3 and 6 predict
    for i, a in enumerate(actions):
        assert isinstance(a, np.ndarray) and a.shape == (4,)
        np.testing.assert_array_equal(a, chunks[i // 3][0, i % 3].numpy())
    policy.reset()
    policy.select_action(observation())
    assert len(chunks) == 4  # reset empties the queue


# --------------------------------------------------------------------------- tokens: decoding = training forward


@pytest.mark.parametrize("arch", ["qwen2_vl", "paligemma"])
def test_greedy_decoding_matches_the_training_forward(tiny_vlm, arch):
    """Untrained, so the tokens are arbitrary: feeding the generated tokens back as a training
    target, the forward's argmax over action tokens at every position is the generated token. This
    holds only if decoding sees exactly the training prompt, positions and attention (PaliGemma:
    a causal suffix from the first action token on)."""
    rows = robot_rows(episodes=1, length=2, chunk=2)
    policy = _policy(tiny_vlm, arch, "tokens", rows, chunk=2, binarize_gripper=False).eval()  # decode -> encode is exact
    batch = policy.io.collate(rows)
    generated = policy.predict_normalized(batch["inputs"], batch["state"])
    as_target = [dict(r, action=policy.io.action_normalizer.unnormalize(generated[i].numpy()).tolist(), action_mask=[True, True])
                 for i, r in enumerate(rows)]  # fmt: skip
    tf = policy.io.collate(as_target)
    with torch.no_grad():
        logits, labels = policy.head.action_token_logits(tf["inputs"], tf["state"])
    assert torch.equal(policy.io.prompt.bin_ids[logits[..., policy.io.prompt.bin_ids].argmax(-1)], labels)


def test_tokens_loss_is_causal(tiny_vlm):
    """Changing the last action token changes no earlier token's loss (PaliGemma's bidirectional
    prefix would otherwise let the targets see each other)."""
    rows = robot_rows(episodes=1, length=1, chunk=2)
    policy = _policy(tiny_vlm, "paligemma", "tokens", rows, chunk=2).eval()
    batch = policy.io.collate(rows)
    other = dict(rows[0], action=[rows[0]["action"][0], [-0.9, 0.9, -0.9, -1.0]])
    batch2 = policy.io.collate([other])
    losses = []
    for b in (batch, batch2):
        ids = b["inputs"]["input_ids"]
        with torch.no_grad(), policy.backbone.injected(policy.head.injected(1, b["state"])):
            hidden = policy.backbone.hidden_states(b["inputs"])
        pos = torch.nonzero(torch.isin(ids, policy.io.prompt.bin_ids))[:, 1]
        losses.append(hidden[0, pos[:5] - 1])  # the first step's tokens and the next one's first
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- trainable parts


def test_lora_saves_merged_weights(tiny_vlm, tmp_path):
    rows = robot_rows(episodes=1, length=3, chunk=4)
    policy = _policy(tiny_vlm, "qwen2_vl", "mlp", rows)
    counts = policy.configure_trainable("lora", "frozen")
    assert counts["lora"] > 0 and counts["backbone"] == 0 and counts["vision"] == 0
    _fit(policy, policy.io.collate(rows), steps=3, lr=1e-2)
    chunk = policy.predict_action_chunk(observation())
    policy.save_pretrained(tmp_path / "p")
    names = __import__("safetensors").safe_open(str(tmp_path / "p" / "backbone" / "model.safetensors"), "pt").keys()
    assert not any("lora_" in n or "base_layer" in n for n in names)
    loaded = VLAPolicy.from_pretrained(tmp_path / "p", device="cpu")
    torch.testing.assert_close(loaded.predict_action_chunk(observation()), chunk, rtol=1e-4, atol=1e-4)


def test_frozen_vision_tower_stays_fixed_and_in_eval_mode(tiny_vlm):
    from midtrain.policy.backbone import vision_module

    rows = robot_rows(episodes=1, length=3, chunk=4)
    policy = _policy(tiny_vlm, "qwen2_vl", "mlp", rows)
    counts = policy.configure_trainable("full", "frozen")
    vision = vision_module(policy.backbone.vlm)
    before = {n: p.clone() for n, p in vision.named_parameters()}
    lm_before = policy.backbone.vlm.get_input_embeddings().weight.clone()
    _fit(policy, policy.io.collate(rows), steps=2, lr=1e-2)
    policy.train()
    assert not vision.training and policy.backbone.vlm.training
    assert counts["vision"] == 0 and counts["backbone"] > 0
    assert all(torch.equal(p, before[n]) for n, p in vision.named_parameters())
    assert not torch.equal(policy.backbone.vlm.get_input_embeddings().weight, lm_before)


# --------------------------------------------------------------------------- observations


def test_observation_checks_and_formats(tiny_vlm):
    rows = robot_rows(episodes=1, length=2, chunk=4)
    policy = _policy(tiny_vlm, "qwen2_vl", "mlp", rows)
    obs = observation()
    with pytest.raises(KeyError, match=CAMERA):
        policy.select_action({k: v for k, v in obs.items() if k != CAMERA})
    with pytest.raises(ValueError, match="3 dimensions; this policy was trained on 4"):
        policy.predict_action_chunk({**obs, "observation.state": obs["observation.state"][:3]})
    with pytest.raises(KeyError, match="task"):
        policy.predict_action_chunk({k: v for k, v in obs.items() if k != "task"})
    # a LeRobot-style float CHW tensor, a larger frame (resized to the training size) and a batch
    chw = torch.from_numpy(obs[CAMERA]).permute(2, 0, 1).float() / 255
    a = policy.predict_action_chunk(obs)
    torch.testing.assert_close(policy.predict_action_chunk({**obs, CAMERA: chw}), a)
    big = np.kron(obs[CAMERA], np.ones((2, 2, 1), dtype=np.uint8))
    assert policy.predict_action_chunk({**obs, CAMERA: big}).shape == (1, 4, 4)
    two = {CAMERA: np.stack([obs[CAMERA]] * 2), "observation.state": np.stack([obs["observation.state"]] * 2), "task": [obs["task"]] * 2}
    torch.testing.assert_close(policy.predict_action_chunk(two), torch.cat([a, a]), rtol=1e-5, atol=1e-5)


def test_tokens_head_refuses_a_bidirectional_language_model():
    rows = robot_rows(episodes=1, length=2, chunk=4)
    text = SimpleNamespace(model_type="midtrain_bidirectional_text")
    vlm = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))
    with pytest.raises(ValueError, match="causal language model"):
        VLAPolicy(policy_config("tokens", rows), vlm, None)


def test_the_evaluator_loads_the_checkpoint_and_reads_its_interface(tiny_vlm, tmp_path):
    from midtrain.eval.policies import interface_of, load_policy

    rows = robot_rows(episodes=1, length=2, chunk=4)
    _policy(tiny_vlm, "qwen2_vl", "flow", rows).save_pretrained(tmp_path / "p")
    policy = load_policy(tmp_path / "p")
    assert isinstance(policy, VLAPolicy)
    info = interface_of(policy)
    assert (info.action_dim, info.camera_keys, info.image_size, info.state_dim) == (4, (CAMERA,), (32, 32), 4)
    actions = []
    for _ in range(2):  # seeded episodes act the same
        policy.seed(7)
        policy.reset()
        actions.append([policy.select_action(observation(t)) for t in range(5)])
    np.testing.assert_array_equal(np.stack(actions[0]), np.stack(actions[1]))
