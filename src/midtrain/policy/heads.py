"""The three action heads. All work on the normalised scale (:mod:`midtrain.policy.normalize`) and
take the chunk's padding mask ``m [B, H]`` (False past the episode end): a padded step adds
nothing to any loss.

Notation: B batch, H chunk steps, A action dims, D backbone hidden size, ``a`` the normalised
target chunk ``[B, H, A]``, ``G`` the binarised (gripper) dims with targets in ``{0, 1}``, ``C``
the others.

**mlp** (OpenVLA-OFT's L1 regression head; VLM4VLA's single action token): the backbone's last
hidden states at Q learnable action-query positions ``h [B, Q, D]`` (Q = H: one query per step,
or Q = 1), plus the state token ``s [B, D]`` if any, go through an MLP-ResNet (LayerNorm ->
Linear -> ReLU -> blocks of pre-LN ``x + ReLU(W LN(x))`` -> LayerNorm -> Linear), giving the
whole chunk ``y [B, H, A]`` in one pass. Loss, averaged over valid steps::

    L = mean_{m, C} l(y - a) + w_g * mean_{m, G} BCE(sigmoid(y), a)      l = |.| or Huber_delta

**flow** (pi0 / SmolVLA; openpi's convention, noise at t = 1, data at t = 0)::

    t ~ Beta(alpha, beta) * 0.999 + 0.001,  eps ~ N(0, I)
    x_t = t * eps + (1 - t) * a,            u = eps - a          (so dx_t/dt = u)
    L = mean_{m, A} || v_theta(x_t, t, ctx) - u ||^2

``v_theta`` is a small pre-LN transformer over the H noisy action tokens (each
``MLP([W_a x_t ; sinusoid(t)])`` plus a learned step embedding, and a state token in front if
any): self-attention within the chunk (in training, padded steps are hidden from it, so their
content cannot reach the valid steps), cross-attention to the backbone's last hidden states
``ctx [B, T, D]`` (padding masked), an MLP. Inference integrates from ``x_1 = eps`` to ``x_0``
with ``num_steps`` forward-Euler steps ``x <- x + dt * v``, ``dt = -1 / num_steps``; the backbone
runs once per chunk. Binarised dims are learned as ``2a - 1 in {-1, +1}`` and read out as
``x > 0``.

**tokens** (RT-2 / OpenVLA action next-token prediction): each normalised value is clipped to
``[-r, r]`` and put in one of ``n`` uniform bins, ``k = floor((y + r) / (2r) * n)``, decoded to
the bin centre ``-r + (k + 1/2) 2r / n``; bin ``k`` is the added token ``<|act_k|>``. The chunk
is written as ``H * A`` tokens in step-major order after the prompt; the loss is the LM's
cross-entropy on those tokens only (padded steps masked) and inference decodes them greedily.
Binarised dims use ``2a - 1`` as for flow.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# --------------------------------------------------------------------------- shared pieces


class MLPResNetBlock(nn.Module):
    """Pre-LayerNorm feed-forward block with a residual: ``x + ReLU(W LN(x))`` (OpenVLA-OFT)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ffn = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class MLPResNet(nn.Module):
    """OpenVLA-OFT's ``MLPResNet``: LN -> Linear -> ReLU -> residual blocks -> LN -> Linear."""

    def __init__(self, num_blocks: int, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(input_dim)
        self.fc1 = nn.Linear(input_dim, hidden_dim)
        self.blocks = nn.ModuleList(MLPResNetBlock(hidden_dim) for _ in range(num_blocks))
        self.layer_norm2 = nn.LayerNorm(hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.layer_norm1(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc2(self.layer_norm2(x))


def masked_mean(values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum(values * weights) / max(sum(weights), 1)``: a mean over the valid entries only."""
    weights = weights.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def step_dim_mask(mask: torch.Tensor, dims: torch.Tensor) -> torch.Tensor:
    """``[B, H]`` valid steps x ``[A]`` selected dims -> ``[B, H, A]`` weights."""
    return mask[:, :, None].float() * dims[None, None, :].float()


def signed_binary(target: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Binarised dims ``{0, 1}`` -> ``{-1, +1}``, others unchanged (the flow/tokens target scale)."""
    return torch.where(binary, 2 * target - 1, target)


def sign_to_probability(y: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
    """Binarised dims ``x > 0`` -> ``{0, 1}``, others unchanged (what ``Normalizer.unnormalize`` reads)."""
    return torch.where(binary, (y > 0).to(y.dtype), y)


# --------------------------------------------------------------------------- mlp


class MLPActionHead(nn.Module):
    """Chunk regression from Q query hidden states: ``[B, Q, D] (+ state [B, S]) -> [B, H, A]``.

    Q = H (``queries: chunk``): the MLP-ResNet maps each step's query state (with the state
    token) to that step's A values, weights shared across steps as in OpenVLA-OFT. Q = 1
    (``queries: single``): it maps the one action token's state to all H * A values.
    """

    def __init__(self, hidden_size: int, action_dim: int, chunk_size: int, state_dim: int, settings):
        super().__init__()
        self.action_dim, self.chunk_size, self.settings = action_dim, chunk_size, settings
        self.num_queries = chunk_size if settings.queries == "chunk" else 1
        self.state_proj = nn.Linear(state_dim, hidden_size) if state_dim else None
        in_dim = hidden_size * (2 if state_dim else 1)
        out_dim = action_dim if settings.queries == "chunk" else action_dim * chunk_size
        self.mlp = MLPResNet(settings.blocks, in_dim, settings.hidden_dim, out_dim)

    def forward(self, query_hidden: torch.Tensor, state: torch.Tensor | None) -> torch.Tensor:
        x = query_hidden
        if self.state_proj is not None:
            s = self.state_proj(state.to(x.dtype))[:, None, :].expand(-1, x.shape[1], -1)
            x = torch.cat([x, s], dim=-1)
        return self.mlp(x).reshape(x.shape[0], self.chunk_size, self.action_dim)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, binary: torch.Tensor):
        """``(loss, logs)`` of the prediction ``[B, H, A]`` (binary dims as logits) against ``target``."""
        s = self.settings
        pred = pred.float()
        diff = pred - target
        if s.loss == "l1":
            reg = diff.abs()
        else:
            reg = F.huber_loss(pred, target, reduction="none", delta=s.huber_delta)
        loss = masked_mean(reg, step_dim_mask(mask, ~binary))
        logs = {"regression_loss": float(loss.detach())}
        if bool(binary.any()):
            bce = F.binary_cross_entropy_with_logits(pred, target.clamp(0, 1), reduction="none")
            bce_loss = masked_mean(bce, step_dim_mask(mask, binary))
            loss = loss + s.gripper_weight * bce_loss
            logs["gripper_bce"] = float(bce_loss.detach())
        return loss, logs

    @staticmethod
    def decode(pred: torch.Tensor, binary: torch.Tensor) -> torch.Tensor:
        """Normalised chunk with binary dims as probabilities."""
        return torch.where(binary, torch.sigmoid(pred.float()), pred.float())


# --------------------------------------------------------------------------- flow


def sinusoidal_time_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """pi0's sine-cosine embedding of ``t [B]`` in [0, 1] -> ``[B, dim]`` (periods from min to max)."""
    if dim % 2:
        raise ValueError(f"time embedding dimension {dim} must be even")
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (2 * math.pi / period)[None, :] * t.double()[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).float()


class FlowActionExpert(nn.Module):
    """The flow-matching action expert: predicts the velocity ``v [B, H, A]`` of ``x_t`` at time ``t``.

    Inputs: the noisy chunk ``x_t [B, H, A]``, ``t [B]``, the backbone context ``ctx [B, T, D]``
    with its padding mask ``[B, T]`` (True = real token), optionally the raw state ``[B, S]``.
    """

    def __init__(self, hidden_size: int, action_dim: int, chunk_size: int, state_dim: int, settings):
        super().__init__()
        w = settings.width
        self.settings, self.action_dim, self.chunk_size = settings, action_dim, chunk_size
        self.context_proj = nn.Sequential(nn.LayerNorm(hidden_size), nn.Linear(hidden_size, w))
        self.action_in = nn.Linear(action_dim, w)
        self.action_time_mlp = nn.Sequential(nn.Linear(2 * w, w), nn.SiLU(), nn.Linear(w, w))
        self.step_embedding = nn.Parameter(torch.randn(chunk_size, w) * 0.02)
        self.state_proj = nn.Linear(state_dim, w) if state_dim else None
        layer = nn.TransformerDecoderLayer(
            d_model=w, nhead=settings.heads, dim_feedforward=4 * w, dropout=0.0, activation="gelu",
            batch_first=True, norm_first=True,
        )  # fmt: skip
        self.layers = nn.ModuleList(_clone(layer) for _ in range(settings.layers))
        self.out_norm = nn.LayerNorm(w)
        self.action_out = nn.Linear(w, action_dim)

    def velocity(self, x_t, t, context, context_mask, state=None, step_mask=None) -> torch.Tensor:
        """``step_mask [B, H]`` (training): padded chunk steps are hidden from the others' attention,
        so their (meaningless) noisy targets cannot leak into the valid steps' velocities."""
        w = self.settings.width
        emb = self.action_in(x_t.to(self.action_in.weight.dtype))
        time = sinusoidal_time_embedding(t, w).to(emb.dtype)[:, None, :].expand_as(emb)
        tokens = self.action_time_mlp(torch.cat([emb, time], dim=-1)) + self.step_embedding[None]
        if self.state_proj is not None:
            tokens = torch.cat([self.state_proj(state.to(emb.dtype))[:, None, :], tokens], dim=1)
        memory = self.context_proj(context.to(emb.dtype))
        pad = ~context_mask.bool()
        hidden_steps = None
        if step_mask is not None and not bool(step_mask.all()):
            hidden_steps = ~step_mask.bool()
            if self.state_proj is not None:
                hidden_steps = torch.cat([torch.zeros_like(hidden_steps[:, :1]), hidden_steps], dim=1)
        for layer in self.layers:
            tokens = layer(tokens, memory, tgt_key_padding_mask=hidden_steps, memory_key_padding_mask=pad)
        return self.action_out(self.out_norm(tokens[:, -self.chunk_size :]))

    def sample_time(self, batch: int, device) -> torch.Tensor:
        """``t ~ Beta(alpha, beta) * 0.999 + 0.001`` from torch's global generator (seeded and
        restored by the training loop)."""
        s = self.settings
        beta = torch.distributions.Beta(torch.tensor(s.time_alpha), torch.tensor(s.time_beta))
        return (beta.sample((batch,)) * 0.999 + 0.001).to(device)

    def loss(self, target, mask, binary, context, context_mask, state=None, noise=None, time=None):
        """Flow-matching loss of the normalised chunk ``target [B, H, A]`` (see the module docstring)."""
        a = signed_binary(target.float(), binary)
        if noise is None:
            noise = torch.randn_like(a)
        if time is None:
            time = self.sample_time(a.shape[0], a.device)
        tt = time[:, None, None]
        x_t = tt * noise + (1 - tt) * a
        u = noise - a
        v = self.velocity(x_t, time, context, context_mask, state, step_mask=mask).float()
        mse = masked_mean((v - u) ** 2, step_dim_mask(mask, torch.ones_like(binary)))
        return mse, {"flow_mse": float(mse.detach())}

    @torch.no_grad()
    def sample(self, context, context_mask, binary, state=None, noise=None) -> torch.Tensor:
        """Euler integration from noise (t = 1) to a chunk (t = 0); returns the normalised chunk
        with binarised dims as ``{0, 1}``."""
        b = context.shape[0]
        x = noise if noise is not None else torch.randn(b, self.chunk_size, self.action_dim, device=context.device)
        x = x.float()
        n = self.settings.num_steps
        dt = -1.0 / n
        for step in range(n):
            t = torch.full((b,), 1.0 + step * dt, device=x.device)
            x = x + dt * self.velocity(x, t, context, context_mask, state).float()
        return sign_to_probability(x, binary)


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


# --------------------------------------------------------------------------- tokens


class ActionBins:
    """Uniform binning of normalised values in ``[-r, r]`` into ``n`` bins (see the module docstring)."""

    def __init__(self, bins: int, bin_range: float):
        self.bins, self.range = bins, float(bin_range)

    def encode(self, y: torch.Tensor) -> torch.Tensor:
        """Normalised values -> bin indices (int64), clipped to the range."""
        k = torch.floor((y.float().clamp(-self.range, self.range) + self.range) / (2 * self.range) * self.bins)
        return k.long().clamp(0, self.bins - 1)

    def decode(self, k: torch.Tensor) -> torch.Tensor:
        """Bin indices -> bin centres on the normalised scale."""
        return -self.range + (k.float() + 0.5) * (2 * self.range / self.bins)
