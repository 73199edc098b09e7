"""``midtrain vla`` with ETC co-training (Objective Bridging): a VQA micro-batch beside every action
micro-batch in one optimizer step, for every head; the logged VQA loss is the backbone's own
next-token loss (transformers' ``labels`` loss on the same micro-batch, from the previous step's
checkpoint); bad co-training configs stop before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from etc_runs import etc_run
from robot_data import write_lerobot

from midtrain.config import ConfigError, load_config
from midtrain.policy import VLAPolicy
from midtrain.runs import RunDir, StageError
from midtrain.vla.config import VLAConfig
from midtrain.vla.stage import train_vla


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A robot dataset and a run directory holding an etc stage output."""
    root = tmp_path_factory.mktemp("cotrain")
    etc_run(RunDir(root / "run"), root / "data")
    return write_lerobot(root / "robot", episodes=4, length=8), root / "run"


def args(model, dataset, steps: int = 2, **train) -> list[str]:
    train = {"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 0, "eval_every": steps, "eval_batches": 0,
             "save_every": 1, "log_every": 1, "num_workers": 0, **train}  # fmt: skip
    return [f"model={model}", f"data.lerobot={dataset}", "policy.chunk_size=4", "data.val_fraction=0.25", "device=cpu",
            "cotrain.etc=etc:egocentric+temporal", "cotrain.val_fraction=0.1", "cotrain.prepare_workers=0", *(f"train.{k}={v}" for k, v in train.items())]  # fmt: skip


def run(run_dir: Path, overrides: list[str], name: str) -> Path:
    return train_vla(load_config(VLAConfig, overrides=overrides + [f"name={name}"]), RunDir(run_dir))


def metrics(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("head", ["mlp", "flow", "tokens"])
def test_every_head_co_trains_with_vqa_batches(tiny_vlm, world, head):
    dataset, run_dir = world
    extra = ["policy.flow.width=32", "policy.flow.heads=2", "policy.flow.layers=1"] if head == "flow" else []
    out = run(run_dir, args(tiny_vlm("qwen2_vl"), dataset) + [f"policy.head={head}", *extra], f"vla_{head}")
    man = json.loads((out / "manifest.json").read_text())
    co = man["cotrain"]
    assert co["micro_batch"] == 1 and co["loss_weight"] == 1.0  # 25% of a micro-batch of 4
    assert set(co["sources"]) == {"etc_egocentric", "etc_temporal"}
    assert [v["weight"] for v in co["sources"].values()] == [0.5, 0.5]
    assert co["sources"]["etc_egocentric"]["domain"] == "egocentric"
    rows = metrics(out)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(np.isfinite(r["loss_vqa"]) for r in steps)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2] and all(np.isfinite(r["eval_loss_vqa"]) for r in evals)
    assert VLAPolicy.from_pretrained(out / "policy", device="cpu").config.head == head


def test_the_vqa_loss_is_the_backbones_next_token_loss_on_the_drawn_micro_batch(tiny_vlm, world):
    """Step 2's ``loss_vqa`` equals ``vlm(**batch, labels=labels).loss`` of the step-1 checkpoint's
    backbone on the stream's micro-batch of step 2, rebuilt here from the prepared data."""
    from midtrain.models import load_vlm
    from midtrain.sft.data import PoolRows, collate_sft
    from midtrain.train import WeightedBatches

    dataset, run_dir = world
    out = run(run_dir, args(tiny_vlm("qwen2_vl"), dataset, steps=2) + ["backbone.trainable=full", "cotrain.batch_share=0.5"],
              "vla_oracle")  # fmt: skip
    man = json.loads((out / "manifest.json").read_text())
    samples = pq.read_table(out / "cotrain" / "samples.parquet").to_pylist()
    train = [s for s in samples if s["split"] == "train"]
    names = sorted(man["cotrain"]["sources"])
    plan = WeightedBatches([np.array([i for i, s in enumerate(train) if s["source"] == n]) for n in names],
                           [man["cotrain"]["sources"][n]["weight"] for n in names], 2, seed=0)  # fmt: skip
    pool = PoolRows(out / "cotrain" / "pool.arrow", np.array([s["pool_row"] for s in train]))
    rows = [pool[i] for i in plan.micro_batch(1)]  # step 2 = micro-batch 1 (one process, no accumulation)
    vlm, processor = load_vlm(out / "checkpoints" / "step-000001" / "backbone", dtype="float32", device="cpu")
    batch = collate_sft(rows, processor, 2048, "truncate")
    inputs = {k: v for k, v in batch.items() if hasattr(v, "shape")}
    with torch.no_grad():
        expected = float(vlm(**inputs, use_cache=False).loss)
    logged = next(r["loss_vqa"] for r in metrics(out) if r.get("step") == 2 and "loss" in r)
    assert logged == pytest.approx(expected, rel=1e-4)


def test_bad_co_training_configs_stop_before_training(tiny_vlm, world, tmp_path):
    dataset, run_dir = world
    base = args(tiny_vlm("qwen2_vl"), dataset)
    with pytest.raises(ConfigError, match="cotrain: a frozen backbone has nothing for the VQA loss to train"):
        load_config(VLAConfig, overrides=base + ["backbone.trainable=frozen"])
    with pytest.raises(ConfigError, match="cotrain.weights: required when cotrain.etc and cotrain.datasets"):
        load_config(VLAConfig, overrides=base + ["cotrain.datasets=[{name: x, kind: vlm, format: llava_json, path: x.json}]"])
    with pytest.raises(StageError, match="cotrain.weights: 'etc_grounding' is not a co-training source; the sources are etc_egocentric"):
        run(run_dir, base + ["cotrain.weights={etc_grounding: 1}"], "vla_bad")
    with pytest.raises(StageError, match=r"cotrain.etc: 'etc_ood:all': .* holds no etc output"):
        run(run_dir, base + ["cotrain.etc={etc:all: 0.94, etc_ood:all: 0.06}"], "vla_bad")
    assert not (run_dir / "vla_bad").exists() and not (run_dir / ".partial" / "vla_bad").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_co_train_like_one_at_the_same_global_batch(tiny_vlm, world, tmp_path, sharding):
    """1 process x grad_accum 2 vs 2 processes (gloo) x grad_accum 1: the same action and VQA
    micro-batches, the VQA passes before the action passes so the synced backward is an action batch
    (DDP with unused parameters: a VQA batch gives the head no gradient); action and VQA loss curves
    agree up to the order of float additions. ``fsdp``: the same with the backbone sharded (FSDP2), and
    the final policy, written from the gathered weights, loads and predicts like the one process's."""
    import shutil
    import socket
    import subprocess
    import sys

    from cli_processes import cli_env

    dataset, run_dir = world
    two_dir = tmp_path / "two"
    shutil.copytree(run_dir / "etc", two_dir / "etc")
    base = args(tiny_vlm("qwen2_vl"), dataset, steps=4, batch_size=2) + ["policy.head=mlp", "cotrain.batch_share=1.0"]
    one = run(run_dir, base + ["train.grad_accum=2"], "vla_one")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
              "-m", "midtrain.cli", "vla", "--run-dir", str(two_dir), *base, "train.grad_accum=1", "name=vla_two",
              f"train.fsdp={sharding == 'fsdp'}"]  # fmt: skip
    done = subprocess.run(launch, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = two_dir / "vla_two"
    assert json.loads((two / "manifest.json").read_text())["train"]["processes"] == 2
    curve = lambda d, k: [r[k] for r in metrics(d) if "loss" in r]  # noqa: E731
    assert curve(one, "loss") == pytest.approx(curve(two, "loss"), rel=1e-5)
    assert curve(one, "loss_vqa") == pytest.approx(curve(two, "loss_vqa"), rel=1e-5)
    assert len(curve(one, "loss")) == 4
    if sharding == "fsdp":
        man = json.loads((two / "manifest.json").read_text())["train"]
        assert man["fsdp"] and man["state_bytes_per_process"]["optimizer_bytes"] > 0
        a, b = VLAPolicy.from_pretrained(one / "policy", device="cpu"), VLAPolicy.from_pretrained(two / "policy", device="cpu")
        wa = dict(a.named_parameters())
        assert all((p - wa[n]).abs().max() < 1e-4 for n, p in b.named_parameters())
