"""Pooling variants against direct per-sample computations."""

import pytest
import torch

from midtrain.featurize.pooling import POOLINGS, pool, pooling_mask

IMAGE_ID = 7


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 6, 5, generator=g)
    attention = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    ids = torch.tensor([[1, 7, 7, 2, 3, 4], [7, 7, 5, 0, 0, 0], [1, 2, 3, 4, 7, 0]])  # row 2: image id only in padding
    return hidden, attention, ids


def expected(hidden, attention, ids, pooling):
    out = []
    for h, a, t in zip(hidden, attention, ids):
        n = int(a.sum())
        if pooling == "last":
            out.append(h[n - 1])
            continue
        keep = a.bool()
        if pooling == "image_mean":
            keep &= t == IMAGE_ID
        elif pooling == "text_mean":
            keep &= t != IMAGE_ID
        out.append(h[keep].mean(0) if keep.any() else torch.zeros(h.shape[1]))
    return torch.stack(out)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_pool_matches_per_sample_computation(batch, pooling):
    hidden, attention, ids = batch
    feats, counts = pool(hidden, attention, ids, pooling, [IMAGE_ID])
    torch.testing.assert_close(feats, expected(hidden, attention, ids, pooling))
    if pooling == "image_mean":
        assert counts.tolist() == [2, 2, 0]  # padding never counts, even with an image id
    if pooling == "mean":
        assert counts.tolist() == [6, 3, 4]


def test_pool_upcasts_bf16_in_chunks(batch):
    hidden, attention, ids = batch
    feats, _ = pool(hidden.to(torch.bfloat16), attention, ids, "mean", [IMAGE_ID])
    assert feats.dtype == torch.float32
    torch.testing.assert_close(feats, expected(hidden.to(torch.bfloat16).float(), attention, ids, "mean"))


def test_unknown_pooling_is_rejected(batch):
    hidden, attention, ids = batch
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        pooling_mask("max", attention, ids, [IMAGE_ID])
