"""``midtrain sft`` as a user runs it, in separate processes: killed with SIGKILL and run again it
continues exactly where an uninterrupted run would be; under ``accelerate launch`` two CPU
processes (gloo) train like one process at the same global batch."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from midtrain.runs import RunDir
from midtrain.sft.config import SFTConfig
from midtrain.sft.stage import run_sft
from midtrain.train import read_metrics

from cli_processes import cli_env as env, kill_at_checkpoint


def overrides(model: Path, steps: int, **train) -> list[str]:
    train = {"steps": steps, "batch_size": 4, "lr": 5e-3, "warmup_steps": 2, "eval_every": 8, "eval_batches": 0,
             "save_every": 4, "log_every": 1, "num_workers": 0, **train}  # fmt: skip
    return [f"model={model}", "sources=[llava,spatial]", "mode=lora", "vision=last_fraction", "val_fraction=0.1",
            "device=cpu", *(f"train.{k}={v}" for k, v in train.items())]  # fmt: skip


def in_process(run: RunDir, args: list[str]) -> Path:
    from midtrain.config import load_config

    return run_sft(load_config(SFTConfig, overrides=args), run)


def copy_run(catalog_run: RunDir, name: str) -> RunDir:
    run = RunDir(catalog_run.root.parent / name)
    shutil.copytree(catalog_run.root / "catalog", run.root / "catalog")
    return run


def curve(stage_dir: Path, key: str = "loss") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(stage_dir / "metrics.jsonl") if key in r]


@pytest.mark.slow
def test_sigkill_and_rerun_continues_the_uninterrupted_loss_curve(catalog_run, tiny_vlm):
    model = tiny_vlm("qwen2_vl")
    args = overrides(model, steps=40)
    reference = in_process(copy_run(catalog_run, "reference"), args)
    run = copy_run(catalog_run, "killed")
    cmd = [sys.executable, "-m", "midtrain.cli", "sft", "--run-dir", str(run.root), *args]
    stage = kill_at_checkpoint(cmd, run.root, "sft", 8)  # after its second checkpoint
    killed_at = max(s for s, _ in curve(stage))
    assert 8 <= killed_at < 40, "the kill must land mid-run"
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = run.root / "sft"
    assert curve(out) == curve(reference)  # bit-exact (CPU, fp32, one thread): same batches, RNG, optimizer state
    assert curve(out, "eval_loss") == curve(reference, "eval_loss")
    from safetensors.torch import load_file

    a, b = load_file(reference / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    assert read_metrics(out / "metrics.jsonl")[0]["step"] == 0  # rows of the killed run after its checkpoint were dropped
    import json

    assert json.loads((out / "manifest.json").read_text())["train"]["resumed_from"] >= 8


@pytest.mark.slow
def test_sigkill_then_a_damaged_newest_checkpoint_resumes_from_the_one_before_bit_for_bit(catalog_run, tiny_vlm):
    import json

    from midtrain.train import complete_checkpoints

    model = tiny_vlm("qwen2_vl")
    args = overrides(model, steps=24)
    reference = in_process(copy_run(catalog_run, "reference"), args)
    run = copy_run(catalog_run, "killed")
    cmd = [sys.executable, "-m", "midtrain.cli", "sft", "--run-dir", str(run.root), *args]
    stage = kill_at_checkpoint(cmd, run.root, "sft", 8)
    found = complete_checkpoints(stage / "checkpoints")
    assert len(found) >= 2, "the kill must leave two checkpoints"
    (before, _), (newest_step, newest) = found[-2], found[-1]
    damaged = newest / "trainer_state" / "optimizer.pt"
    damaged.write_bytes(damaged.read_bytes()[:1000])  # a save cut by a full disk, a bad copy
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = run.root / "sft"
    assert f"damaged checkpoint {newest}: {damaged}" in (out / "log.txt").read_text()
    assert json.loads((out / "manifest.json").read_text())["train"]["resumed_from"] == before < newest_step
    assert curve(out) == curve(reference) and curve(out, "eval_loss") == curve(reference, "eval_loss")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one_at_the_same_global_batch(catalog_run, tiny_vlm):
    """1 process x micro-batch 2 x grad_accum 2 vs 2 processes x 2 x 1: the same micro-batches, and
    the loop weights each by its answer tokens over the global step, so the curves agree up to the
    order of float additions (tolerance rtol 1e-5). Dropout is off: each process draws its own masks."""
    model = tiny_vlm("qwen2_vl")
    one = in_process(copy_run(catalog_run, "one"), overrides(model, steps=8, batch_size=2, grad_accum=2) + ["lora.dropout=0"])
    run = copy_run(catalog_run, "two")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
              "-m", "midtrain.cli", "sft", "--run-dir", str(run.root),
              *overrides(model, steps=8, batch_size=2, grad_accum=1), "lora.dropout=0"]  # fmt: skip
    done = subprocess.run(launch, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    two = run.root / "sft"
    import json

    man = json.loads((two / "manifest.json").read_text())
    assert man["train"]["processes"] == 2 and man["train"]["global_batch"] == 4
    (s1, l1), (s2, l2) = zip(*curve(one)), zip(*curve(two))
    assert s1 == s2 == tuple(range(1, 9))
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert [v for _, v in curve(one, "eval_loss")] == pytest.approx([v for _, v in curve(two, "eval_loss")], rel=1e-5)
