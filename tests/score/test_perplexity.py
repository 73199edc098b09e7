"""Perplexity baselines with tiny real-architecture VLMs: exact answer-token NLL, and a VLM
fine-tuned on VLA data rendered as text prefers pool samples that read like that data."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from run_fixtures import vla_row, vlm_row, write_catalog

from midtrain.data.images import encode_image, ref_from_bytes
from midtrain.models import build_batch, load_vlm
from midtrain.models.tiny import build_tiny_vlm
from midtrain.runs import RunDir, SampleError, StageError
from midtrain.score.perplexity import AnswerPerplexity
from midtrain.sft.vla_text import render_vla_as_text
from midtrain.score.config import ScoreConfig
from midtrain.score.stage import score_pool


def image(i: int) -> dict:
    return ref_from_bytes(encode_image(np.full((56, 56, 3), (i * 37) % 250, np.uint8)))


def robot_frames(n: int) -> list[dict]:
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        r = vla_row(i)
        r["image_refs"] = [image(i)]
        r["action"] = rng.uniform(-1, 1, size=(2, 4)).round(2).tolist()
        rows.append(r)
    return rows


def pool_rows() -> dict[str, list[dict]]:
    """``actiony`` answers look like rendered actions; ``chatty`` answers are prose."""
    rng = np.random.default_rng(1)
    actiony, chatty = [], []
    for i in range(6):
        a = vlm_row("actiony", i, image(i))
        a["messages"][1]["content"] = "\n".join(" ".join(str(v) for v in rng.integers(0, 256, 4)) for _ in range(2))
        actiony.append(a)
        c = vlm_row("chatty", i, image(i + 50))
        c["messages"][1]["content"] = "the image shows a kitchen with a white counter and a wooden cabinet"
        chatty.append(c)
    return {"actiony": actiony, "chatty": chatty}


def finetune_on_vla_text(base_dir, out_dir, frames: list[dict], steps: int = 25):
    """A few AdamW steps of answer-token cross-entropy on VLA frames rendered as text."""
    model, processor = load_vlm(base_dir, device="cpu")
    model.train().requires_grad_(True)
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = [render_vla_as_text(f) for f in frames]
    batch, info = build_batch(rows, processor, answer_mask=True)
    labels = batch["input_ids"].masked_fill(~info.answer_mask, -100)
    for _ in range(steps):
        loss = model(**dict(batch), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppl_models")
    base = build_tiny_vlm("qwen2_vl", root / "base", seed=0)
    tuned = finetune_on_vla_text(base, root / "vla", robot_frames(12))
    return base, tuned


@pytest.fixture
def run(tmp_path):
    run = RunDir(tmp_path / "run")
    write_catalog(run, {**pool_rows(), "robot": robot_frames(4)})
    return run


def test_render_vla_as_text_discretises_the_valid_action_steps():
    frame = {"id": "robot/0", "source": "robot", "instruction": "open the drawer", "image_refs": [image(0)],
             "action": [[-1.0, 0.0, 0.999], [1.0, 0.5, -0.5]], "action_mask": [True, False]}  # fmt: skip
    row = render_vla_as_text(frame, bins=256)
    assert row["messages"][0]["content"] == "<image>\nWhat action should the robot take to open the drawer?"
    assert row["messages"][1]["content"] == "0 128 255"  # the padded second step is left out


def test_answer_nll_equals_the_models_own_loss_on_answer_tokens(models):
    base, _ = models
    scorer = AnswerPerplexity(base, device="cpu")
    rows = pool_rows()["chatty"][:2] + pool_rows()["actiony"][:1]
    nll, errors = scorer.answer_nll(rows)  # batched, right-padded
    assert errors == []
    for r, value in zip(rows, nll):
        b, info = build_batch([r], scorer.processor, answer_mask=True)
        with torch.no_grad():
            ref = scorer.model(**dict(b), labels=b["input_ids"].masked_fill(~info.answer_mask, -100)).loss.item()
        assert value == pytest.approx(ref, rel=1e-5)


def test_vla_and_delta_perplexity_prefer_action_like_answers(models, run):
    base, tuned = models
    out = score_pool(ScoreConfig(scorer="vla_perplexity", vla_model=tuned, device="cpu", batch_size=4), run)
    t = pq.read_table(out / "proximity_scores.parquet")
    assert t.num_rows == 12 and set(t.column("source").to_pylist()) == {"actiony", "chatty"}  # VLA frames not scored
    np.testing.assert_allclose(t.column("score").to_numpy(), -t.column("nll_vla").to_numpy())
    mean = {s: pc.mean(t.filter(pc.equal(t.column("source"), s)).column("score")).as_py() for s in ("actiony", "chatty")}
    assert mean["actiony"] > mean["chatty"]
    man = run.manifest("score")
    assert man["order_column"] == "score" and man["catalog_fingerprint"] == run.manifest("catalog")["fingerprint"]

    out = score_pool(ScoreConfig(scorer="delta_perplexity", vla_model=tuned, base_model=base, device="cpu"), run)
    t = pq.read_table(out / "proximity_scores.parquet")
    np.testing.assert_allclose(t.column("score").to_numpy(), t.column("nll_base").to_numpy() - t.column("nll_vla").to_numpy())
    mean = {s: pc.mean(t.filter(pc.equal(t.column("source"), s)).column("score")).as_py() for s in ("actiony", "chatty")}
    assert mean["actiony"] > mean["chatty"]


def test_unscorable_samples_are_named_or_skipped(models, run, tmp_path):
    base, _ = models
    rows = pool_rows()
    rows["chatty"][2]["messages"][0]["content"] += " describe it in detail" * 200  # the answer is truncated away
    rows["chatty"][3]["image_refs"] = [{"path": str(tmp_path / "gone.png"), "bytes": None}]
    run2 = RunDir(tmp_path / "run2")
    write_catalog(run2, rows)
    with pytest.raises(StageError, match="pool_sources: 'robot' is not a VLM source .* VLM sources: actiony, chatty"):
        score_pool(ScoreConfig(scorer="vla_perplexity", vla_model=base, device="cpu", pool_sources=["robot"]), run2)
    with pytest.raises(SampleError, match="chatty.json:[34]: "):
        score_pool(ScoreConfig(scorer="vla_perplexity", vla_model=base, device="cpu", max_length=128), run2)
    out = score_pool(ScoreConfig(scorer="vla_perplexity", vla_model=base, device="cpu", max_length=128, on_error="skip"), run2)
    assert pq.read_metadata(out / "proximity_scores.parquet").num_rows == 10
    assert run2.manifest("score")["counts"]["skipped"] == {"no answer tokens": 1, "missing image file": 1}
