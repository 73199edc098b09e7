"""Pooling the last hidden state of a batch into one vector per sample (vectorised, float32).

``h`` is the backbone's ``last_hidden_state`` ``[B, T, D]`` (after the final norm), right-padded.

- ``mean`` (default): mean over non-padding tokens;
- ``last``: the last non-padding token (what a causal model has read everything by);
- ``image_mean``: mean over image tokens (the positions the model filled with vision features);
- ``text_mean``: mean over non-padding tokens that are not image tokens.

Sums are taken as one batched matmul ``mask[B, 1, T] @ h[B, T, D]`` in float32 whatever the model
dtype, so bf16 models are not averaged in bf16.
"""

from __future__ import annotations

POOLINGS = ("mean", "last", "image_mean", "text_mean")


def pooling_mask(pooling: str, attention_mask, input_ids, image_token_ids):
    """``[B, T]`` bool mask of the tokens ``pooling`` averages over."""
    import torch

    valid = attention_mask.bool()
    if pooling == "mean":
        return valid
    if pooling == "last":
        lengths = valid.sum(1)
        positions = torch.arange(valid.shape[1], device=valid.device)
        return positions.unsqueeze(0) == (lengths - 1).clamp(min=0).unsqueeze(1)
    ids = torch.as_tensor(list(image_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    is_image = torch.isin(input_ids, ids)
    if pooling == "image_mean":
        return valid & is_image
    if pooling == "text_mean":
        return valid & ~is_image
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


def pool(hidden, attention_mask, input_ids, pooling: str = "mean", image_token_ids=()):
    """``(features [B, D] float32, counts [B] int64)``; ``counts`` is how many tokens each row pooled
    (0 means the row has nothing to pool, e.g. ``image_mean`` on a text-only sample; its
    features are then zeros, and the caller must not use them)."""
    import torch

    mask = pooling_mask(pooling, attention_mask, input_ids, image_token_ids)
    counts = mask.sum(1)
    weights = mask.unsqueeze(1).to(torch.float32)
    # upcast at most ~64M elements at a time so a bf16 batch does not double its memory in float32
    rows = max(1, (1 << 26) // max(1, hidden.shape[1] * hidden.shape[2]))
    sums = torch.cat([
        torch.bmm(weights[i : i + rows], hidden[i : i + rows].to(torch.float32)).squeeze(1)
        for i in range(0, hidden.shape[0], rows)
    ])  # fmt: skip
    return sums / counts.clamp(min=1).unsqueeze(1).to(torch.float32), counts
