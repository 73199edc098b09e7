"""The shared training loop on a small regression task: schedule, token-weighted accumulation,
exact resume, NaN stop, callbacks, checkpoint layout and rotation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from toy_task import ToyConfig, ToyTask

from midtrain.runs import RunDir, stage_run
from midtrain.train import Callback, TrainingDiverged, TrainSettings, complete_checkpoints, read_metrics, train
from midtrain.train.batches import BatchPlan


def settings(**kw) -> TrainSettings:
    base = dict(steps=12, batch_size=4, lr=3e-2, warmup_steps=2, eval_every=4, eval_batches=0, save_every=4,
                keep_checkpoints=0, log_every=1, num_workers=0)
    return TrainSettings(**{**base, **kw})


def run_toy(tmp_path, name="run", task=None, callbacks=(), **kw):
    cfg = ToyConfig(train=settings(**kw))
    with stage_run(RunDir(tmp_path / name), "toy", cfg) as st:
        result = train(task or ToyTask(), cfg.train, st, callbacks=callbacks)
    return result, st.dir


def losses(stage_dir):
    return [(r["step"], r["loss"]) for r in read_metrics(stage_dir / "metrics.jsonl") if "loss" in r]


def test_learning_rate_schedule_warms_up_then_decays_to_the_floor():
    s = TrainSettings(steps=11, lr=1.0, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1)
    f = [s.lr_factor(k) for k in range(11)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[-1] == pytest.approx(0.1) and all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[6] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 4 / 8)))
    assert TrainSettings(steps=10, schedule="constant", warmup_steps=0).lr_factor(9) == 1.0
    assert TrainSettings(steps=100, warmup_ratio=0.1).warmup == 10


def test_batch_plan_covers_each_epoch_once_and_splits_steps_across_processes():
    lengths = np.random.default_rng(0).integers(1, 100, 40)
    plan = BatchPlan(40, 4, 1, 1, seed=3, lengths=lengths)
    epoch = np.concatenate([plan.micro_batch(i) for i in range(10)])
    assert sorted(epoch.tolist()) == list(range(40))
    spread = np.mean([np.ptp(lengths[plan.micro_batch(i)]) for i in range(10)])
    assert spread < np.mean([np.ptp(lengths[c]) for c in np.random.default_rng(1).permutation(40).reshape(10, 4)])
    one = BatchPlan(40, 4, 2, 1, seed=3, lengths=lengths)
    two = BatchPlan(40, 4, 1, 2, seed=3, lengths=lengths)
    for step in range(7):  # crosses an epoch boundary
        a = one.step_batches(step, 0)
        b = two.step_batches(step, 0) + two.step_batches(step, 1)
        assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_training_reduces_the_loss_and_writes_metrics_and_checkpoints(tmp_path):
    result, d = run_toy(tmp_path, steps=30, save_every=10, keep_checkpoints=2)
    rows = losses(d)
    assert [s for s, _ in rows] == list(range(1, 31))
    assert np.mean([l for _, l in rows[-5:]]) < 0.6 * np.mean([l for _, l in rows[:5]])
    evals = [r for r in read_metrics(d / "metrics.jsonl") if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 4, 8, 12, 16, 20, 24, 28, 30]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert [s for s, _ in complete_checkpoints(d / "checkpoints")] == [20, 30]  # keep_checkpoints=2
    ckpt = d / "checkpoints" / "step-000030"
    assert (ckpt / "toy_model.pt").is_file() and (ckpt / "trainer_state" / "state.json").is_file()
    saved = torch.load(ckpt / "trainer_state" / "weights.pt")
    assert "frozen.weight" not in saved and "net.0.weight" in saved and "calls" in saved  # trainable + buffers
    assert result.final_checkpoint == ckpt and result.parameters["trainable"] < result.parameters["total"]


def test_loss_is_token_weighted_over_the_whole_step(tmp_path):
    """grad_accum=2 x batch 2 takes the same steps as batch 4 (the weighted mean over 4 samples)."""
    _, a = run_toy(tmp_path, "a", steps=6, batch_size=4, grad_accum=1, group_by_length=False, save_every=0)
    _, b = run_toy(tmp_path, "b", steps=6, batch_size=2, grad_accum=2, group_by_length=False, save_every=0)
    # the plans differ (micro-batches of 2 vs 4 from the same permutation), so the samples per step are the same
    np.testing.assert_allclose([l for _, l in losses(a)], [l for _, l in losses(b)], rtol=1e-5)


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    _, ref = run_toy(tmp_path, "ref", steps=12, save_every=4)

    def crash(ctx):
        if ctx.step == 6:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path, "cut", steps=12, save_every=4, callbacks=[Callback(1, crash)])
    cut = tmp_path / "cut" / ".partial" / "toy"  # where a stage that did not finish keeps its work
    assert max(s for s, _ in losses(cut)) == 6  # rows of steps 5-6 were written after checkpoint 4
    (cut / "checkpoints" / ".step-000008.tmp" / "trainer_state").mkdir(parents=True)  # a save cut short
    result, resumed = run_toy(tmp_path, "cut", steps=12, save_every=4)
    assert result.resumed_from == 4 and not (cut / "checkpoints" / ".step-000008.tmp").exists()
    assert losses(resumed) == losses(ref)  # bit-exact on CPU fp32: same batches, RNG, optimizer state
    evals = lambda d: [(r["step"], r["eval_loss"]) for r in read_metrics(d / "metrics.jsonl") if "eval_loss" in r]
    assert evals(resumed) == evals(ref)
    w_ref = torch.load(ref / "checkpoints" / "step-000012" / "toy_model.pt")
    w_res = torch.load(resumed / "checkpoints" / "step-000012" / "toy_model.pt")
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_a_non_finite_loss_stops_naming_step_and_samples_and_keeps_the_last_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r"step 6: the loss is not finite .* samples toy/\d+.*step-000004"):
        run_toy(tmp_path, task=ToyTask(nan_after=5), steps=12, save_every=2, keep_checkpoints=1)
    d = tmp_path / "run" / ".partial" / "toy"
    assert [s for s, _ in complete_checkpoints(d / "checkpoints")] == [4]
    man = json.loads((d / "manifest.json").read_text())
    assert man["status"] == "failed" and "not finite" in man["error"]


def test_callbacks_run_every_k_steps_and_log_their_metrics(tmp_path):
    seen = []
    cb = Callback(5, lambda ctx: seen.append(ctx.step) or {"success": ctx.step / 100}, name="closed_loop")
    run_toy(tmp_path, steps=12, callbacks=[cb])
    assert seen == [5, 10, 12]
    rows = [r for r in read_metrics(tmp_path / "run" / "toy" / "metrics.jsonl") if r.get("callback") == "closed_loop"]
    assert [(r["step"], r["success"]) for r in rows] == [(5, 0.05), (10, 0.1), (12, 0.12)]
