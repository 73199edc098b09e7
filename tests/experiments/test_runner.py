"""The one runner every orchestrator calls: config layering, skip-as-complete, records, errors,
and the per-task successes read back from an evaluation."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from midtrain.config import ConfigError
from midtrain.experiments.runner import StageRunner, deep_merge, episode_successes, stage_config
from midtrain.runs import RunDir


def test_deep_merge_keeps_the_keys_a_step_does_not_name():
    base = {"train": {"steps": 10, "lr": 1e-3}, "model": "a", "data": {"lerobot": "x"}}
    out = deep_merge(base, {"train": {"lr": 5e-4}, "model": "b", "data": "flat"})
    assert out == {"train": {"steps": 10, "lr": 5e-4}, "model": "b", "data": "flat"}
    assert base["train"] == {"steps": 10, "lr": 1e-3}  # the shared recipe is not mutated


def test_config_layers_mapping_then_file_then_overrides(tmp_path, llava_dir):
    path = tmp_path / "catalog.yaml"
    path.write_text("rows_per_part: 7\nrow_group_size: 3\nseed: 1\n")
    datasets = [{"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(llava_dir / "data.jsonl")}]
    # the CLI's order (midtrain.config.load_config): base mapping <- YAML file <- key=value
    config = stage_config("catalog", {"datasets": datasets, "seed": 5, "on_error": "skip"}, path, ["row_group_size=2"])
    assert (config.rows_per_part, config.row_group_size, config.seed, config.on_error) == (7, 2, 1, "skip")


def test_a_bad_key_fails_in_one_line_naming_the_caller_key():
    with pytest.raises(ConfigError, match=r"^rows\.learned\.steps\[0\]\.sft: .*no_such_key"):
        stage_config("catalog", {"no_such_key": 1}, key="rows.learned.steps[0].sft")
    with pytest.raises(ConfigError, match=r"^catalog: "):
        stage_config("catalog", {"no_such_key": 1})


def test_run_records_each_call_and_a_rerun_skips_the_complete_stage(tmp_path, llava_dir):
    datasets = [{"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(llava_dir / "data.jsonl")}]
    runner = StageRunner(RunDir(tmp_path / "run"), name="test")
    out = runner.run("catalog", {"datasets": datasets})
    manifest = (out / "manifest.json").read_text()
    sub = RunDir(tmp_path / "run" / "nested")
    out_sub = runner.run("catalog", {"datasets": datasets}, run_dir=sub, label="nested/catalog")
    again = runner.run("catalog", {"datasets": datasets}, label="again")
    assert out == again == tmp_path / "run" / "catalog" and out_sub == sub.root / "catalog"
    assert (out / "manifest.json").read_text() == manifest  # skipped as complete, not rewritten
    assert [r["stage"] for r in runner.records] == ["catalog", "nested/catalog", "again"]
    assert all(r["wall_s"] >= 0 and r["self_mb"] > 0 for r in runner.records)
    assert list(runner.seconds) == ["catalog", "nested/catalog", "again"]


def test_timed_records_a_step_that_is_no_registered_stage(tmp_path):
    runner = StageRunner(RunDir(tmp_path), name="test")
    assert runner.timed("build", lambda: 42) == 42
    assert runner.records[0]["stage"] == "build" and set(runner.records[0]) == {"stage", "wall_s", "self_mb", "children_mb"}


def test_episode_successes_per_task_in_episode_order(tmp_path):
    path = tmp_path / "episodes.parquet"
    table = pa.table({"task": ["b", "a", "a", "b", "a"], "episode": [3, 2, 0, 1, 4],
                      "success": [True, False, True, False, True], "length": [1, 2, 3, 4, 5]})  # fmt: skip
    pq.write_table(table, path)
    assert episode_successes(path) == {"a": [True, False, True], "b": [False, True]}
