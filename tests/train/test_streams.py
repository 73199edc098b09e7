"""Co-training streams in the shared loop: the weighted draw, the step's loss ``L_task + lambda L_stream``
(checked against autograd on the same micro-batches), and exact resume with a stream."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from toy_task import ToyConfig, ToyModel, ToyTask

from midtrain.runs import RunDir, stage_run
from midtrain.train import AuxStream, Callback, TrainSettings, WeightedBatches, read_metrics, train
from midtrain.train.batches import BatchPlan


def test_weighted_batches_follow_the_weights_and_visit_each_group_in_epochs():
    groups = [np.arange(0, 50), np.arange(50, 53)]  # a large and a tiny group
    plan = WeightedBatches(groups, [0.94, 0.06], batch_size=2, seed=3)
    drawn = np.array([i for k in range(10_000) for i in plan.micro_batch(k)])
    share = np.mean(drawn >= 50)
    assert abs(share - 0.06) < 4 * np.sqrt(0.06 * 0.94 / len(drawn))  # the weight, not the groups' sizes (3/53)
    small = drawn[drawn >= 50]
    for e in range(len(small) // 3):  # each run of 3 uses of the small group is one permutation of it
        assert sorted(small[3 * e : 3 * e + 3].tolist()) == [50, 51, 52]
    big = drawn[drawn < 50]
    assert sorted(big[:50].tolist()) == list(range(50))
    fresh = WeightedBatches(groups, [0.94, 0.06], batch_size=2, seed=3)  # a pure function of the index, in any order
    for k in [9_999, 17, 4_200, 0]:
        assert fresh.micro_batch(k) == plan.micro_batch(k)
    assert WeightedBatches(groups, [0.94, 0.06], 2, seed=4).micro_batch(0) != plan.micro_batch(0) or \
        WeightedBatches(groups, [0.94, 0.06], 2, seed=4).micro_batch(1) != plan.micro_batch(1)  # fmt: skip
    only = WeightedBatches(groups, [1.0, 0.0], batch_size=5, seed=0)
    assert all(i < 50 for k in range(40) for i in only.micro_batch(k))


def _stream_rows(n: int = 40, dim: int = 8, seed: int = 11) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = -(x @ torch.randn(dim, generator=g))  # another target: the stream pulls elsewhere
    w = torch.randint(1, 4, (n,), generator=g).float()
    return [{"id": f"side/{i}", "x": x[i], "y": y[i], "w": w[i]} for i in range(n)]


def _stream(task: ToyTask, rows: list[dict], weight: float, micro: int = 3) -> AuxStream:
    plan = WeightedBatches([np.arange(0, 20), np.arange(20, len(rows))], [0.7, 0.3], micro, seed=5)
    return AuxStream("side", rows, task.collate, plan.micro_batch, weight=weight, eval_dataset=rows[:6], eval_batch_size=micro)


def _run(tmp_path, name, task, streams, callbacks=(), **kw):
    cfg = ToyConfig(train=TrainSettings(**{**dict(steps=8, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=0, eval_every=4,
                                                  eval_batches=0, save_every=4, keep_checkpoints=0, log_every=1, num_workers=0,
                                                  max_grad_norm=0.0, group_by_length=False), **kw}))  # fmt: skip
    with stage_run(RunDir(tmp_path / name), "toy", cfg) as st:
        train(task, cfg.train, st, callbacks=callbacks, streams=streams)
    return read_metrics(st.dir / "metrics.jsonl")


def _weighted(model, batches) -> torch.Tensor:
    losses = [model(b)[0] * b["loss_weight"] for b in batches]
    return sum(losses) / sum(b["loss_weight"] for b in batches)


def test_a_step_trains_the_task_loss_plus_lambda_times_the_stream_loss(tmp_path):
    """Step 1's logged losses and gradient norm equal autograd's on L_task + 0.5 L_side over the same
    micro-batches (the task's plan and the stream's draw for accumulation indices 0 and 1)."""
    task = ToyTask()
    torch.manual_seed(0)
    task.model = ToyModel(dropout=0.0)  # no randomness in the forward: the oracle sees the same function
    start = {k: v.clone() for k, v in task.model.state_dict().items()}
    rows = _stream_rows()
    stream = _stream(task, rows, weight=0.5)
    first = _run(tmp_path, "run", task, [stream])[1]
    assert first["step"] == 1

    oracle = ToyModel(dropout=0.0)
    oracle.load_state_dict(start)
    plan = BatchPlan(len(task.train_dataset), 4, 2, 1, seed=0)
    main = [task.collate([task.train_dataset[i] for i in b]) for b in plan.step_batches(0, 0)]
    side = [task.collate([rows[i] for i in stream.micro_batch(a)]) for a in range(2)]
    l_task, l_side = _weighted(oracle, main), _weighted(oracle, side)
    (l_task + 0.5 * l_side).backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in oracle.parameters() if p.grad is not None))
    assert first["loss"] == pytest.approx(float(l_task.detach()), rel=1e-5)
    assert first["loss_side"] == pytest.approx(float(l_side.detach()), rel=1e-5)
    assert first["grad_norm"] == pytest.approx(float(norm), rel=1e-4)
    evals = [r for r in read_metrics(tmp_path / "run" / "toy" / "metrics.jsonl") if "eval_loss_side" in r]
    assert [r["step"] for r in evals] == [0, 4, 8]


def test_resume_with_a_stream_equals_an_uninterrupted_run(tmp_path):
    rows = _stream_rows()
    task = ToyTask()
    ref = _run(tmp_path, "ref", task, [_stream(task, rows, 1.0)])

    def crash(ctx):
        if ctx.step == 6:
            raise KeyboardInterrupt("killed")

    task = ToyTask()
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "cut", task, [_stream(task, rows, 1.0)], callbacks=[Callback(1, crash)])
    task = ToyTask()
    resumed = _run(tmp_path, "cut", task, [_stream(task, rows, 1.0)])
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(resumed) == strip(ref)  # task loss, stream loss, eval losses: bit-exact
    assert all("loss_side" in r for r in ref if "loss" in r)
