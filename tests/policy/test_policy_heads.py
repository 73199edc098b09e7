"""Action heads on their own (no backbone): padded chunk steps contribute nothing, the flow sampler
integrates the training convention's velocity field back to the data, binning is consistent."""

from __future__ import annotations

import pytest
import torch

from midtrain.policy.configuration import FlowHeadSettings, MLPHeadSettings
from midtrain.policy.heads import ActionBins, FlowActionExpert, MLPActionHead, sinusoidal_time_embedding

B, H, A, D, S = 3, 5, 4, 16, 4


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(B, H, A, generator=g)
    target[..., 3] = (target[..., 3] > 0).float()
    mask = torch.ones(B, H, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 1:] = False
    return target, mask, torch.tensor([False, False, False, True])


def _garbage_on_padding(target, mask):
    out = target.clone()
    out[~mask] = 1e3
    return out


@pytest.mark.parametrize("loss", ["l1", "huber"])
def test_mlp_padded_steps_contribute_nothing(loss):
    torch.manual_seed(0)
    head = MLPActionHead(D, A, H, S, MLPHeadSettings(loss=loss, hidden_dim=32))
    hidden, state = torch.randn(B, H, D), torch.randn(B, S)
    target, mask, binary = _batch()
    grads = []
    for tgt in (target, _garbage_on_padding(target, mask)):
        head.zero_grad()
        value, logs = head.loss(head(hidden, state), tgt, mask, binary)
        value.backward()
        grads.append((value.item(), [p.grad.clone() for p in head.parameters()]))
    assert grads[0][0] == grads[1][0]
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))
    assert "gripper_bce" in logs


def test_flow_padded_steps_contribute_nothing():
    torch.manual_seed(0)
    expert = FlowActionExpert(D, A, H, S, FlowHeadSettings(width=32, layers=1, heads=2))
    ctx, ctx_mask, state = torch.randn(B, 7, D), torch.ones(B, 7, dtype=torch.bool), torch.randn(B, S)
    target, mask, binary = _batch()
    noise, time = torch.randn(B, H, A), torch.rand(B)
    a = expert.loss(target, mask, binary, ctx, ctx_mask, state, noise, time)[0]
    b = expert.loss(_garbage_on_padding(target, mask), mask, binary, ctx, ctx_mask, state, noise, time)[0]
    assert float(a) == float(b)


def test_flow_context_padding_is_masked():
    """Padded context positions (a shorter prompt in the batch) do not change the velocity."""
    torch.manual_seed(0)
    expert = FlowActionExpert(D, A, H, 0, FlowHeadSettings(width=32, layers=2, heads=2)).eval()
    ctx = torch.randn(1, 6, D)
    x, t = torch.randn(1, H, A), torch.tensor([0.3])
    padded = torch.cat([ctx, torch.randn(1, 3, D) * 100], 1)
    mask = torch.tensor([[True] * 6 + [False] * 3])
    v1 = expert.velocity(x, t, ctx, torch.ones(1, 6, dtype=torch.bool))
    v2 = expert.velocity(x, t, padded, mask)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)


def test_flow_sampler_follows_the_training_convention():
    """With the exact velocity of the training path (x_t = t eps + (1 - t) a, u = eps - a, i.e.
    v(x, t) = (x - a) / t), Euler steps from t = 1 land on a: loss and sampler agree on direction."""
    expert = FlowActionExpert(D, A, H, 0, FlowHeadSettings(width=32, layers=1, heads=2, num_steps=7))
    target, _, _ = _batch()
    expert.velocity = lambda x, t, *args: (x - target) / t[:, None, None]
    out = expert.sample(torch.zeros(B, 2, D), torch.ones(B, 2, dtype=torch.bool), torch.zeros(A, dtype=torch.bool),
                        noise=torch.randn(B, H, A))  # fmt: skip
    torch.testing.assert_close(out, target, rtol=1e-5, atol=1e-5)
    t = expert.sample_time(20000, "cpu")
    assert 0.001 <= float(t.min()) and float(t.max()) <= 1.0
    assert float(t.mean()) == pytest.approx(0.001 + 0.999 * 1.5 / 2.5, abs=0.01)  # Beta(1.5, 1) has mean 0.6


def test_time_embedding_shape_and_range():
    e = sinusoidal_time_embedding(torch.tensor([0.0, 0.5, 1.0]), 8)
    assert e.shape == (3, 8) and float(e.abs().max()) <= 1.0


def test_action_bins_round_trip():
    bins = ActionBins(256, 1.0)
    y = torch.linspace(-1.2, 1.2, 1001)
    k = bins.encode(y)
    assert int(k.min()) == 0 and int(k.max()) == 255 and bool((k[1:] >= k[:-1]).all())
    inside = y.abs() <= 1
    assert float((bins.decode(k)[inside] - y[inside]).abs().max()) <= 1.0 / 256 + 1e-6
    assert torch.equal(bins.encode(bins.decode(torch.arange(256))), torch.arange(256))
