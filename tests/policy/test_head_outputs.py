"""The three action heads give the numbers they gave before they were put behind one interface:
the training loss and the sampled chunk of each head, on fixed weights (a tiny qwen2_vl VLM and a
head initialised from seed 0), a fixed batch, and fixed flow noise. The expected values were
computed with the code before the change (commit 3a8ff56, on CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midtrain.policy import VLAPolicy
from robot_data import observation, policy_config, robot_rows

EXPECTED = {  # head -> (loss, the chunk [1, 4, 4] flattened), from the code before the change
    'mlp': (1.7485302686691284,
        [-0.5602068, 0.7464445, 0.0307475, 1.0, -1.2881072, 0.0276485, -0.471313, -1.0,
         -0.3954469, -0.1804821, -0.6761388, 1.0, -0.0859626, 0.223248, -0.4190975, 1.0]),
    'flow': (1.9836221933364868,
        [-1.2801129, -0.4471424, -0.6217822, 1.0, -0.0360489, 0.4699224, -0.6696807, -1.0,
         -0.3916917, -0.5764558, -0.2202764, 1.0, -0.5313598, 0.7402349, 0.4991682, 1.0]),
    'tokens': (6.761250972747803,
        [-0.553527, 0.3032624, 0.2996624, 1.0, -0.1135152, 0.3032624, 0.2996624, 1.0,
         -0.1135152, 0.3032624, -0.4345414, -1.0, -0.6502329, -0.148107, -0.4345414, -1.0]),
}  # fmt: skip


def _outputs(tiny_vlm, head: str) -> tuple[float, list[float]]:
    rows = robot_rows(episodes=1, length=3, chunk=4)
    settings = {"flow": {"width": 64, "layers": 2, "heads": 2}} if head == "flow" else {}
    policy = VLAPolicy.build(policy_config(head, rows, chunk=4, **settings), tiny_vlm("qwen2_vl"), device="cpu", seed=0)
    policy.configure_trainable("full")
    policy.train()
    torch.manual_seed(0)  # the flow head's noise and time
    loss, _ = policy(policy.io.collate(rows))
    noise = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    chunk = policy.predict_action_chunk(observation(t=1), noise=noise)
    return float(loss), chunk.flatten().tolist()


@pytest.mark.parametrize("head", ["mlp", "flow", "tokens"])
def test_loss_and_sampled_chunk_are_those_of_before(tiny_vlm, head):
    loss, chunk = _outputs(tiny_vlm, head)
    want_loss, want_chunk = EXPECTED[head]
    assert loss == pytest.approx(want_loss, rel=1e-5, abs=1e-6)
    assert chunk == pytest.approx(want_chunk, rel=1e-4, abs=1e-5)


# --------------------------------------------------------------------------- checkpoints written before


def _old_key(head: str, key: str) -> str:
    """The weight names policies had when the heads were not modules of their own."""
    if head == "mlp" and key == "head.queries":
        return "queries"
    if head == "tokens" and key.startswith("head.state_proj."):
        return key[5:]
    return "head." + key[9:] if key.startswith("head.net.") else key


@pytest.mark.parametrize("head", ["mlp", "flow", "tokens"])
def test_a_policy_saved_with_the_old_weight_names_loads(tiny_vlm, tmp_path, head):
    from safetensors.torch import load_file, save_file

    rows = robot_rows(episodes=1, length=3, chunk=4)
    settings = {"flow": {"width": 64, "layers": 2, "heads": 2}} if head == "flow" else {}
    policy = VLAPolicy.build(policy_config(head, rows, chunk=4, **settings), tiny_vlm("qwen2_vl"), device="cpu", seed=3)
    policy.save_pretrained(tmp_path / "p")
    weights = tmp_path / "p" / "model.safetensors"
    old = {_old_key(head, k): v for k, v in load_file(str(weights)).items()}
    assert set(old) != set(load_file(str(weights)))  # the old names differ
    save_file(old, str(weights))
    loaded = VLAPolicy.from_pretrained(tmp_path / "p", device="cpu")
    noise = torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(0))
    obs = observation(t=1)
    assert torch.equal(loaded.predict_action_chunk(obs, noise=noise), policy.eval().predict_action_chunk(obs, noise=noise))


# --------------------------------------------------------------------------- select_action on a batch


def test_select_action_on_a_batch_gives_one_action_per_observation(tiny_vlm):
    rows = robot_rows(episodes=1, length=3, chunk=4)
    policy = VLAPolicy.build(policy_config("mlp", rows, chunk=4, n_action_steps=2), tiny_vlm("qwen2_vl"), device="cpu")
    singles = [observation(t=t) for t in (0, 1, 2)]
    batch = {k: np.stack([o[k] for o in singles]) for k in singles[0] if k != "task"}
    batch["task"] = [o["task"] for o in singles]
    chunks = policy.predict_action_chunk(batch).numpy()
    first, second = policy.select_action(batch), policy.select_action(batch)
    assert first.shape == second.shape == (3, 4)
    np.testing.assert_array_equal(first, chunks[:, 0])
    np.testing.assert_array_equal(second, chunks[:, 1])
    policy.select_action(batch)  # a new chunk for the same batch
    with pytest.raises(ValueError, match="queued actions are for 3; call reset"):
        policy.select_action(singles[0])
    policy.reset()
    one = policy.select_action(singles[1])
    assert one.shape == (4,)
    np.testing.assert_allclose(one, chunks[1, 0], atol=1e-5)  # alone, not batched: equal up to rounding
