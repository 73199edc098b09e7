"""Features of every supported architecture: shapes, finiteness, pooling variants against the full
forward pass a researcher would write, and batched == unbatched."""

import numpy as np
import pytest
import torch

from catalog_rows import vla_rows, vlm_rows
from midtrain.data.catalog import rows_to_table
from midtrain.featurize.featurizer import BatchPreparer, FeatureExtractor
from midtrain.featurize.pooling import POOLINGS
from midtrain.models import multimodal_token_ids
from midtrain.models.tiny import ARCHS as TINY_ARCHS

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

ROWS = vlm_rows(5, seed=3)[1:] + vla_rows(2, seed=4)  # 3 with an image (one multi-turn), 1 text-only, 2 VLA frames
UNBATCHED = [0, 3, 4]  # the multi-turn image conversation, the text-only one, a VLA frame


def full_forward_pooled(model, inputs, pooling):
    """The naive path: the whole model with all hidden states, pooled by hand per sample."""
    kw = {k: v for k, v in inputs.items() if k != "labels"}
    with torch.inference_mode():
        hidden = model(**kw, output_hidden_states=True).hidden_states[-1]
    image_ids = multimodal_token_ids(model.config)["image"]
    out = []
    for h, mask, ids in zip(hidden, kw["attention_mask"].bool(), kw["input_ids"]):
        n = int(mask.sum())
        if pooling == "last":
            out.append(h[n - 1])
            continue
        is_image = torch.isin(ids, torch.tensor(image_ids))
        keep = {"mean": mask, "image_mean": mask & is_image, "text_mean": mask & ~is_image}[pooling]
        out.append(h[keep].mean(0) if keep.any() else torch.zeros(h.shape[-1]))
    return torch.stack(out).float().numpy()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_features_match_full_forward_and_unbatched(arch, loaded_vlm):
    model, processor = loaded_vlm(arch)
    table = rows_to_table(ROWS)
    preparer = BatchPreparer(processor, batch_size=16, max_tokens_per_batch=1 << 20)
    batch = preparer.prepare_batch(0, 0, table, np.arange(len(ROWS)))
    assert not batch.errors and sorted(batch.positions.tolist()) == list(range(len(ROWS)))
    has_image = np.array([bool(ROWS[p]["image_refs"]) for p in batch.positions])
    for pooling in POOLINGS:
        extractor = FeatureExtractor(model, pooling)
        feats, counts = extractor(batch.inputs)
        assert feats.shape == (len(ROWS), model.config.get_text_config().hidden_size) and feats.dtype == np.float32
        assert np.isfinite(feats).all()
        expected = full_forward_pooled(model, batch.inputs, pooling)
        np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5, err_msg=f"{arch} {pooling}")
        if pooling == "image_mean":
            assert ((counts > 0) == has_image).all()  # text-only sample: nothing to pool
    # batched == one sample at a time (right padding keeps every sample's positions)
    extractor = FeatureExtractor(model, "mean")
    batched, _ = extractor(batch.inputs)
    for i, position in enumerate(batch.positions):
        if position not in UNBATCHED:
            continue
        alone = preparer.prepare_batch(0, 0, table, np.array([position]))
        if alone.inputs is None:  # PaliGemma's processor requires an image in every batch
            assert arch == "paligemma" and not ROWS[position]["image_refs"]
            assert alone.errors[0]["reason"] == "processor rejected the sample"
            continue
        single, _ = extractor(alone.inputs)
        np.testing.assert_allclose(single[0], batched[i], rtol=1e-4, atol=1e-4, err_msg=f"{arch} row {position}")


def test_prepare_shard_buckets_by_length_and_covers_every_row(loaded_vlm):
    _, processor = loaded_vlm("qwen2_vl")
    table = rows_to_table(vlm_rows(12, seed=5) + vla_rows(6, seed=6))
    preparer = BatchPreparer(processor, batch_size=4, max_tokens_per_batch=400)
    items = list(preparer.prepare_shard(7, table))
    start, batches = items[0], items[1:]
    assert start.shard == 7 and start.n_batches == len(batches) and start.ids.num_rows == 18
    assert start.ids.column("id").to_pylist() == table.column("id").to_pylist()
    seen = np.concatenate([b.positions for b in batches])
    assert sorted(seen.tolist()) == list(range(18))
    assert all(len(b.positions) <= 4 for b in batches)
    padded = sum(b.inputs["input_ids"].numel() for b in batches)
    real = sum(int(b.lengths.sum()) for b in batches)
    assert padded < 1.5 * real  # length bucketing keeps padding small
    for b in batches:  # text-only rows are never batched with rows that have images
        assert len({bool(table.column("image_refs")[int(p)].as_py()) for p in b.positions}) == 1


@pytest.mark.slow
def test_compiled_extractor_matches_eager(tiny_vlm, loaded_vlm):
    """``compile: true`` (decoder layers and vision MLPs through inductor) gives the eager features."""
    from midtrain.models import load_vlm

    model, processor = loaded_vlm("qwen2_vl")
    batch = BatchPreparer(processor, batch_size=16).prepare_batch(0, 0, rows_to_table(ROWS), np.arange(len(ROWS)))
    expected, _ = FeatureExtractor(model, "mean")(batch.inputs)
    fresh, _ = load_vlm(tiny_vlm("qwen2_vl"), dtype="float32", device="cpu")  # compiled in place: not the shared one
    extractor = FeatureExtractor(fresh, "mean", compile=True)
    assert "decoder.layers.0" in extractor.compiled and any(n.startswith("vision.") for n in extractor.compiled)
    feats, _ = extractor(batch.inputs)
    np.testing.assert_allclose(feats, expected, rtol=1e-4, atol=1e-5)
    assert extractor.compile_s > 0
    again, _ = extractor(batch.inputs)  # same shapes: no recompile
    np.testing.assert_allclose(again, expected, rtol=1e-4, atol=1e-5)
