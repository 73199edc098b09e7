"""``midtrain sft`` with ``train.fsdp=true`` in two CPU processes (gloo) under ``accelerate launch``:
the loss curve of one process at the same global batch, half of the weights and optimizer states
per process, a SIGKILLed run that continues exactly, and a final model that loads anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from midtrain.runs import StageError
from cli_processes import cli_env as env, kill_launch_at_checkpoint
from test_processes import copy_run, curve, free_port, in_process, overrides


def launch(run_root: Path, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", "midtrain.cli", "sft", "--run-dir", str(run_root), *args]  # fmt: skip


def run_two(run_root: Path, args: list[str]) -> Path:
    done = subprocess.run(launch(run_root, args), env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_root / "sft"


def manifest(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "manifest.json").read_text())


@pytest.mark.slow
def test_fsdp_lora_trains_like_one_process_with_half_the_state_and_resumes_exactly(catalog_run, tiny_vlm):
    """LoRA with the last vision blocks and the projector training (peft ``modules_to_save``):
    1 process x micro-batch 2 x grad_accum 2 vs 2 FSDP processes x 2 x 1."""
    from safetensors.torch import load_file

    model = tiny_vlm("qwen2_vl")
    one = in_process(copy_run(catalog_run, "one"), overrides(model, steps=8, batch_size=2, grad_accum=2) + ["lora.dropout=0"])
    args = overrides(model, steps=8, batch_size=2, grad_accum=1, fsdp="true") + ["lora.dropout=0"]
    two = run_two(copy_run(catalog_run, "two").root, args)

    (s1, l1), (s2, l2) = zip(*curve(one)), zip(*curve(two))
    assert s1 == s2 == tuple(range(1, 9))
    assert l1 == pytest.approx(l2, rel=1e-5)
    assert [v for _, v in curve(one, "eval_loss")] == pytest.approx([v for _, v in curve(two, "eval_loss")], rel=1e-5)

    m1, m2 = manifest(one)["train"], manifest(two)["train"]
    assert m2["fsdp"] and m2["processes"] == 2 and not m1["fsdp"]
    for key in ("param_bytes", "optimizer_bytes"):  # each process holds its half (dim-0 shards, padded)
        ratio = m2["state_bytes_per_process"][key] / m1["state_bytes_per_process"][key]
        assert 0.45 < ratio < 0.56, (key, ratio)

    # the final model is an ordinary merged checkpoint, the one process's up to float order
    a, b = load_file(one / "model" / "model.safetensors"), load_file(two / "model" / "model.safetensors")
    assert a.keys() == b.keys() and not any("lora" in k for k in b)
    assert all(b[k].float().sub(a[k].float()).abs().max() < 1e-4 for k in a)
    ckpt = two / "checkpoints" / "step-000008"
    assert sorted(p.name for p in (ckpt / "trainer_state").glob("shard-*")) == [
        "shard-00000-of-00002.safetensors", "shard-00001-of-00002.safetensors"]
    assert (ckpt / "adapter_model.safetensors").is_file()  # every checkpoint still holds the loadable adapter

    # SIGKILL after the checkpoint of step 4, rerun: the uninterrupted FSDP run, bit for bit
    run = copy_run(catalog_run, "killed")
    kill_launch_at_checkpoint(launch(run.root, args), run.root, "sft", 4)
    with pytest.raises(StageError, match=r"step-000004/trainer_state: checkpoint sharded over 2 FSDP processes; resume with "
                                         r"train.fsdp=true and 2 processes \(this run: 1, fsdp off\)"):  # fmt: skip
        in_process(run, args)  # one process cannot take the shards over
    resumed = run_two(run.root, args)
    assert manifest(resumed)["train"]["resumed_from"] == 4
    assert curve(resumed) == curve(two) and curve(resumed, "eval_loss") == curve(two, "eval_loss")
    c = load_file(resumed / "model" / "model.safetensors")
    assert all((b[k] == c[k]).all() for k in b)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_with_activation_checkpointing_trains_like_one_process(catalog_run, tiny_vlm):
    from midtrain.models import load_vlm

    model = tiny_vlm("qwen2_vl")
    extra = ["mode=full", "train.gradient_checkpointing=true", "train.lr=1e-3"]
    one = in_process(copy_run(catalog_run, "one"), overrides(model, steps=4, batch_size=2, grad_accum=2) + extra)
    two = run_two(copy_run(catalog_run, "two").root, overrides(model, steps=4, batch_size=2, grad_accum=1, fsdp="true") + extra)
    assert [v for _, v in curve(one)] == pytest.approx([v for _, v in curve(two)], rel=1e-5)
    vlm, _ = load_vlm(two / "model", dtype="float32", device="cpu")  # loads anywhere: an ordinary HF checkpoint
    ref, _ = load_vlm(one / "model", dtype="float32", device="cpu")
    ref_weights = dict(ref.named_parameters())
    assert all((p - ref_weights[n]).abs().max() < 1e-4 for n, p in vlm.named_parameters())
