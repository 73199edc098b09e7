"""``midtrain vla`` end to end on tiny models: LeRobot and catalog data, the policy it writes, held-out
metrics by episode, the frozen probe's one backbone pass per sample, bad input before the first
step, and SIGKILL + rerun continuing the uninterrupted run exactly."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from midtrain.config import ConfigError, load_config
from midtrain.policy import VLAPolicy
from midtrain.runs import RunDir, SampleError, StageError
from midtrain.vla.config import VLAConfig
from midtrain.vla.stage import train_vla
from cli_processes import cli_env, kill_at_checkpoint
from robot_data import CAMERA, observation, robot_rows, write_lerobot



@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_lerobot(tmp_path_factory.mktemp("vla") / "robot", episodes=4, length=8)


def args(model, data: list[str], steps: int = 4, **train) -> list[str]:
    train = {"steps": steps, "batch_size": 4, "lr": 1e-3, "warmup_steps": 1, "eval_every": 2, "eval_batches": 0,
             "save_every": 2, "log_every": 1, "num_workers": 0, **train}  # fmt: skip
    return [f"model={model}", *data, "policy.chunk_size=4", "data.val_fraction=0.25", "device=cpu",
            *(f"train.{k}={v}" for k, v in train.items())]  # fmt: skip


def run(run_dir: Path, overrides: list[str], force: bool = False) -> Path:
    return train_vla(load_config(VLAConfig, overrides=overrides), RunDir(run_dir), force=force)


def metrics(stage: Path) -> list[dict]:
    return [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines()]


def test_trains_on_a_lerobot_dataset_and_writes_a_loadable_policy(tiny_vlm, dataset, tmp_path):
    out = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), [f"data.lerobot={dataset}", "policy.head=mlp"]))
    man = json.loads((out / "manifest.json").read_text())
    assert man["status"] == "complete"
    assert man["counts"]["frames"] == 32 and man["counts"]["val_frames"] == 8 and man["counts"]["train_frames"] == 24
    held = man["data"]["held_out_episodes"]
    assert len(held) == 1 and man["data"]["camera_keys"] == [CAMERA] and man["data"]["image_size"] == [32, 32]
    assert man["parameters"]["lora"] > 0 and man["parameters"]["backbone"] == 0
    rows = metrics(out)
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert {"eval_l1", "eval_l1_delta_x", "eval_gripper_accuracy"} <= set(evals[-1])
    assert "eval_l1_gripper_effort" not in evals[-1]  # the gripper is binarised: accuracy, not L1
    policy = VLAPolicy.from_pretrained(out / "policy", device="cpu")
    assert policy.config.action_names[3] == "gripper_effort" and policy.config.gripper_dims == [3]
    record = json.loads((out / "policy" / "training_frames.json").read_text())  # how midtrain eval makes its frames
    assert record["camera_keys"] == [CAMERA] and record["image_size"] == [32, 32]
    assert record["sources"][0]["path"] == str(dataset) and record["sources"][0]["video"][CAMERA]["video.codec"] == "h264"
    assert (out / "checkpoints" / "step-000004" / "training_frames.json").is_file()
    last = VLAPolicy.from_pretrained(out / "checkpoints" / "step-000004", device="cpu")
    assert torch.equal(policy.predict_action_chunk(observation()), last.predict_action_chunk(observation()))
    again = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), [f"data.lerobot={dataset}", "policy.head=mlp"]))
    assert json.loads((again / "manifest.json").read_text())["timings"] == man["timings"]  # complete: skipped


def test_reads_a_lerobot_v21_dataset_natively(tiny_vlm, tmp_path):
    from catalog_fixtures import make_lerobot_v21

    episodes = make_lerobot_v21(tmp_path / "v21", lengths=(6, 5, 4))
    out = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), [f"data.lerobot={tmp_path / 'v21'}", "backbone.trainable=frozen"], steps=2))
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["frames"] == 15 and man["counts"]["action_dim"] == 3 and man["counts"]["state_dim"] == 4
    assert man["data"]["camera_keys"] == ["observation.images.top"] and man["data"]["image_size"] == [16, 24]
    policy = VLAPolicy.from_pretrained(out / "policy", device="cpu")
    assert policy.config.gripper_dims == [] and policy.config.action_names == []  # the dataset names no dimension
    frames, state, _, task = episodes[0]
    chunk = policy.predict_action_chunk({"observation.images.top": frames["observation.images.top"][0], "observation.state": state[0], "task": task})
    assert chunk.shape == (1, 4, 3)


def _catalog_and_counted_passes(run_dir: Path, monkeypatch, method: str) -> tuple[list[dict], list[int]]:
    """A small catalog in ``run_dir`` and the batch sizes of every ``Backbone.<method>`` call from now on."""
    from catalog_rows import write_catalog

    from midtrain.policy.backbone import Backbone

    rows = robot_rows(episodes=3, length=4, chunk=4)
    write_catalog(run_dir, {"robot": rows})
    calls: list[int] = []
    real = getattr(Backbone, method)
    monkeypatch.setattr(Backbone, method, lambda self, inputs: calls.append(len(inputs["input_ids"])) or real(self, inputs))
    return rows, calls


def test_frozen_probe_runs_the_backbone_once_per_sample(tiny_vlm, tmp_path, monkeypatch):
    rows, calls = _catalog_and_counted_passes(tmp_path / "run", monkeypatch, "hidden_states")
    out = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), ["policy.head=flow", "backbone.trainable=frozen", "policy.flow.width=32",
                                                           "policy.flow.heads=2", "policy.flow.layers=1"], steps=8))  # fmt: skip
    man = json.loads((out / "manifest.json").read_text())
    assert man["train"]["samples"] == 32 > len(rows)  # several epochs
    assert sum(calls) == len(rows) == man["counts"]["backbone_passes"]  # one pass per sample, evaluation included
    assert man["parameters"]["lora"] == man["parameters"]["backbone"] == 0 and man["parameters"]["head"] > 0
    assert man["data"]["camera_keys"] == ["observation.images.camera0"]  # the fixture catalog records no camera names


def test_vision_tower_probe_pools_image_features_once_per_sample_without_the_language_model(tiny_vlm, tmp_path, monkeypatch):
    from midtrain.policy import VLAPolicy
    from midtrain.policy.backbone import Backbone

    rows, calls = _catalog_and_counted_passes(tmp_path / "run", monkeypatch, "pooled_image_features")
    monkeypatch.setattr(Backbone, "hidden_states", lambda self, inputs: pytest.fail("the language model ran"))
    out = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), ["policy.features=vision_tower", "backbone.trainable=frozen"], steps=8))
    man = json.loads((out / "manifest.json").read_text())
    assert sum(calls) == len(rows) == man["counts"]["backbone_passes"]  # one pass per sample, evaluation included
    assert man["parameters"]["head"] > 0 and man["train"]["samples"] == 32
    policy = VLAPolicy.from_pretrained(out / "policy", device="cpu")
    assert policy.config.settings.features == "vision_tower"  # so `midtrain eval` reads the same features


def test_bad_input_stops_before_training_or_is_skipped(tiny_vlm, tmp_path):
    bad = write_lerobot(tmp_path / "nan", episodes=3, length=6, nan_action=(2, 5))
    base = args(tiny_vlm("qwen2_vl"), [f"data.lerobot={bad}"], steps=2)
    with pytest.raises(SampleError) as info:
        run(tmp_path / "a", base)
    assert f"{bad} episode 2 frame 2" in str(info.value) and "NaN or inf in action" in str(info.value)
    assert not (tmp_path / "a" / "vla" / "checkpoints").exists()
    out = run(tmp_path / "b", base + ["on_error=skip"])
    man = json.loads((out / "manifest.json").read_text())
    assert man["counts"]["skipped"] == {"NaN or inf in action": 4} and man["counts"]["frames"] == 14
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert {e["where"] for e in errors} == {f"{bad} episode 2 frame {f}" for f in range(2, 6)}
    with pytest.raises(StageError, match="camera 'observation.images.wrist' is not in the dataset"):
        run(tmp_path / "c", base + ["data.cameras=[observation.images.wrist]"])


def test_continuing_a_policy_checks_the_action_dimension(tiny_vlm, dataset, tmp_path):
    from midtrain.data.lerobot import LeRobotDatasetWriter

    first = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), [f"data.lerobot={dataset}"], steps=1))
    three = tmp_path / "three"
    with LeRobotDatasetWriter(three, fps=10, robot_type=None, cameras={CAMERA: (32, 32)}, state_dim=4, action_dim=3) as w:
        w.add_episode(frames={CAMERA: np.zeros((6, 32, 32, 3), np.uint8)}, state=np.zeros((6, 4)), action=np.zeros((6, 3)), task="t")
    over = [a for a in args("", [f"data.lerobot={three}"], steps=1) if not a.startswith("model=")]
    with pytest.raises(StageError, match=f"3-D actions, but the policy checkpoint {first / 'policy'} predicts 4-D"):
        run(tmp_path / "run2", over + [f"init_policy={first / 'policy'}"])


@pytest.mark.skipif(importlib.util.find_spec("metaworld") is None, reason="needs the sim extra (metaworld, mujoco)")
def test_closed_loop_success_is_logged_during_training(tiny_vlm, dataset, tmp_path):
    """The training-loop callback runs midtrain eval's protocol on the policy being trained, with
    observations like the training frames (the dataset's camera, size and codec)."""
    from midtrain.eval.rollout import import_triton_before_gl
    from midtrain.sim.metaworld_env import ensure_gl_backend

    ensure_gl_backend()
    import_triton_before_gl()  # episodes render in this process (see midtrain.eval.rollout)
    closed = ["closed_loop_every=2", "closed_loop.tasks=[reach-v3]", "closed_loop.episodes_per_task=1",
              "closed_loop.max_steps=6", "closed_loop.workers=1", "closed_loop.videos_per_task=0"]  # fmt: skip
    out = run(tmp_path / "run", args(tiny_vlm("qwen2_vl"), [f"data.lerobot={dataset}", "backbone.trainable=frozen", *closed], steps=2))
    rows = [r for r in metrics(out) if r.get("callback") == "closed_loop"]
    assert [r["step"] for r in rows] == [2] and 0.0 <= rows[0]["success"] <= 1.0 and "success_reach-v3" in rows[0]
    results = json.loads((out / "closed_loop" / "step-000002" / "results.json").read_text())
    assert results["policy_interface"]["camera_keys"] == [CAMERA] and results["observation"]["height"] == 32


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model: required"):
        load_config(VLAConfig, overrides=[])
    with pytest.raises(ConfigError, match="backbone.trainable: frozen cannot train the tokens head"):
        load_config(VLAConfig, overrides=["model=x", "policy.head=tokens", "backbone.trainable=frozen"])
    with pytest.raises(ConfigError, match="policy.n_action_steps"):
        load_config(VLAConfig, overrides=["model=x", "policy.chunk_size=4", "policy.n_action_steps=5"])
    with pytest.raises(ConfigError, match="data.lerobot: give a LeRobot dataset or catalog"):
        load_config(VLAConfig, overrides=["model=x", "data.lerobot=a", "data.sources=[b]"])


@pytest.mark.slow
def test_sigkill_and_rerun_continues_the_uninterrupted_run(tiny_vlm, dataset, tmp_path):
    overrides = args(tiny_vlm("qwen2_vl"), [f"data.lerobot={dataset}", "policy.head=flow", "policy.flow.width=32",
                                            "policy.flow.heads=2", "policy.flow.layers=1"], steps=16, save_every=4, eval_every=4)  # fmt: skip
    torch.set_num_threads(1)
    reference = run(tmp_path / "reference", overrides)
    cmd = [sys.executable, "-m", "midtrain.cli", "vla", "--run-dir", str(tmp_path / "killed"), *overrides]
    stage = kill_at_checkpoint(cmd, tmp_path / "killed", "vla", 4)  # after its first checkpoint
    assert max(r["step"] for r in metrics(stage)) < 16, "the kill must land mid-run"
    done = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed" / "vla"
    assert _without_times(metrics(out)) == _without_times(metrics(reference))  # loss, eval metrics, lr, grad norm: bit-exact
    a = VLAPolicy.from_pretrained(out / "policy", device="cpu").head_state_dict()
    b = VLAPolicy.from_pretrained(reference / "policy", device="cpu").head_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "manifest.json").read_text())["train"]["resumed_from"] >= 4
    shutil.rmtree(tmp_path / "reference", ignore_errors=True)


@pytest.mark.slow
def test_fsdp_full_fine_tuning_after_sigkill_continues_the_uninterrupted_run(tiny_vlm, dataset, tmp_path):
    """2 FSDP processes (gloo), the whole backbone training: killed after the checkpoint of step 4 and
    rerun, the run reproduces an uninterrupted 2-process run bit for bit, policy included."""
    import socket

    from cli_processes import kill_launch_at_checkpoint

    overrides = args(tiny_vlm("qwen2_vl"), [f"data.lerobot={dataset}", "policy.head=mlp", "backbone.trainable=full"],
                     steps=8, save_every=4, eval_every=4, fsdp="true", batch_size=2)  # fmt: skip

    def launch(root: Path) -> list[str]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
                "-m", "midtrain.cli", "vla", "--run-dir", str(root), *overrides]  # fmt: skip

    for root in (tmp_path / "reference", tmp_path / "killed"):
        if root.name == "killed":
            kill_launch_at_checkpoint(launch(root), root, "vla", 4)
        done = subprocess.run(launch(root), env=cli_env(), capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    reference, out = tmp_path / "reference" / "vla", tmp_path / "killed" / "vla"
    assert json.loads((out / "manifest.json").read_text())["train"]["resumed_from"] == 4
    assert _without_times(metrics(out)) == _without_times(metrics(reference))
    a = VLAPolicy.from_pretrained(out / "policy", device="cpu").state_dict()
    b = VLAPolicy.from_pretrained(reference / "policy", device="cpu").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_times(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
