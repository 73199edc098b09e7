"""``midtrain eval`` as a stage: manifest, page, resume, and a missing checkpoint."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("metaworld")

from midtrain.cli import main  # noqa: E402
from midtrain.config import load_config  # noqa: E402
from midtrain.eval.config import EvalConfig  # noqa: E402
from midtrain.eval.stage import run_eval  # noqa: E402
from midtrain.runs import RunDir, StageError  # noqa: E402


def test_stage_writes_its_outputs_and_is_not_redone(tmp_path, expert_dir):
    run = RunDir(tmp_path / "run")
    overrides = [f"policy={expert_dir}", "tasks=[reach-v3]", "episodes_per_task=1", "max_steps=80", "workers=1"]
    out = run_eval(load_config(EvalConfig, overrides=overrides), run)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["episodes"] == 1
    assert manifest["success"]["reach-v3"]["successes"] == 1 and manifest["mean_success"] == 1.0
    assert {"episodes.parquet", "results.json", "eval.html"} <= {p.name for p in out.iterdir()}
    assert (out / "videos" / "reach-v3" / "episode_000.mp4").is_file()
    first = manifest["timings"]["started"], manifest["fingerprint"]
    run_eval(load_config(EvalConfig, overrides=overrides[:-1] + ["workers=2"]), run)  # throughput only
    again = json.loads((out / "manifest.json").read_text())
    assert (again["timings"]["started"], again["fingerprint"]) == first


def test_cli_names_a_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(StageError, match="not a directory"):
        run_eval(load_config(EvalConfig, overrides=[f"policy={tmp_path / 'nope'}"]), RunDir(tmp_path / "run"))
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "episodes_per_task" in capsys.readouterr().out
