"""The row format: references parse and resolve to the sft / vla inputs they name, every step's
config is checked before anything runs (errors name the row and step), stage folders are named
and never collide, and every final VLA gets the same recipe, seed and protocol."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from midtrain.config import ConfigError, load_config
from midtrain.experiments.study.config import StudyConfig, referenced_scorers, row_stages
from midtrain.experiments.study.plan import Ref, parse_ref, resolve_sft_data, resolve_vla_data, sft_data_refs, SFT_REF_KINDS
from midtrain.experiments.study.stage import StudyContext, vla_mapping
from midtrain.runs import RunDir

ROWS = [
    {"name": "base"},
    {"name": "learned", "steps": [{"sft": {"data": "selection:proximity", "mode": "lora"}}]},
    {"name": "random", "steps": [{"sft": {"data": "selection:random"}}]},
    {"name": "scratch", "init": "random_weights"},
]


def study(**extra) -> StudyConfig:
    base = {"rows": ROWS, "vla": {"policy": {"chunk_size": 4}, "data": {"frame_stride": 2}, "train": {"steps": 30}},
            "midtrain": {"train": {"steps": 5}, "mixture": {"budget": 40}}, "seeds": [0, 1]}  # fmt: skip
    base.update(extra)
    return load_config(StudyConfig, base=base)


def test_references_parse_and_bad_ones_name_the_choices():
    assert parse_ref("selection:mean_distance", "k", SFT_REF_KINDS) == Ref("selection", "mean_distance")
    assert parse_ref("etc:grounding+egocentric", "k", SFT_REF_KINDS) == Ref("etc", "grounding+egocentric")
    with pytest.raises(ConfigError, match="unknown scorer 'proximty'.*proximity, random"):
        parse_ref("selection:proximty", "k", SFT_REF_KINDS)
    with pytest.raises(ConfigError, match="unknown ETC domain 'ground'"):
        parse_ref("etc:ground", "k", SFT_REF_KINDS)
    with pytest.raises(ConfigError, match="not a data reference"):
        parse_ref("robot", "k", SFT_REF_KINDS)  # robot data is for vla steps
    assert [w for _, w in sft_data_refs({"etc:grounding": 1, "etc:egocentric": 3}, "k")] == [1.0, 3.0]
    with pytest.raises(ConfigError, match="cannot be combined"):
        sft_data_refs(["selection:random", "robot_text"], "k")


def test_bad_rows_fail_before_anything_runs_naming_the_row_and_step():
    bad_key = [{"name": "base"}, {"name": "x", "steps": [{"sft": {"data": "selection:random", "trian": {}}}]}]
    with pytest.raises(ConfigError, match=r"rows\[1\] \(x\)\.steps\[0\]\.sft: trian: unknown key"):
        study(rows=bad_key)
    with pytest.raises(ConfigError, match=r"steps\[0\]\.sft\.model: set by the study"):
        study(rows=[{"name": "base"}, {"name": "x", "steps": [{"sft": {"data": "robot_text", "model": "m"}}]}])
    with pytest.raises(ConfigError, match="no data"):
        study(rows=[{"name": "base"}, {"name": "x", "steps": [{"sft": {"mode": "full"}}]}])
    with pytest.raises(ConfigError, match="names repeat"):
        study(rows=[{"name": "base"}, {"name": "base"}])
    with pytest.raises(ConfigError, match="exactly one of"):
        study(rows=[{"name": "base"}, {"name": "x", "steps": [{"sft": {}, "vla": {}}]}])
    with pytest.raises(ConfigError, match="needs mixture.budget"):
        study(rows=[{"name": "base"}, {"name": "x", "steps": [{"sft": {"data": {"etc:grounding": 1}}}]}],
              midtrain={"train": {"steps": 5}})
    with pytest.raises(ConfigError, match="baseline_row"):
        study(rows=[{"name": "learned", "steps": [{"sft": {"data": "robot_text"}}]}])
    with pytest.raises(ConfigError, match=r"vla\.closed_loop_every: set by the study"):
        study(vla={"closed_loop_every": 5})
    with pytest.raises(ConfigError, match=r"rows\[0\] \(base\)\.vla: train\.steps: must be >= 1"):
        study(rows=[{"name": "base", "vla": {"train": {"steps": 0}}}])
    # stage folders: row a's first of two steps is sft_a_1, as is the only step of a row named a_1
    with pytest.raises(ConfigError, match="both write the stage folder sft_a_1"):
        study(rows=[{"name": "base"}, {"name": "a", "steps": [{"sft": {"data": "robot_text"}}, {"sft": {"data": "robot_text"}}]},
                    {"name": "a_1", "steps": [{"sft": {"data": "robot_text"}}]}])  # fmt: skip


def test_stage_folders_of_a_row():
    cfg = study(rows=[*ROWS, {"name": "staged", "steps": [{"sft": {"data": "etc:grounding"}}, {"sft": {"data": "robot_text"}},
                                                          {"vla": {"data": "robot:reach-v3"}}]}])  # fmt: skip
    learned = row_stages(cfg.rows[1], cfg.seeds, 1)
    assert [s.name for s in learned.steps] == ["sft_learned"] and learned.finals == {0: "vla_learned_s0", 1: "vla_learned_s1"}
    assert learned.probes == {0: "probe_learned_s0"}
    staged = row_stages(cfg.rows[-1], cfg.seeds, 2)
    assert [(s.name, s.start) for s in staged.steps] == [("sft_staged_1", ""), ("sft_staged_2", "sft_staged_1"),
                                                         ("vla_staged_3", "sft_staged_2")]  # fmt: skip
    assert referenced_scorers(cfg) == ["proximity", "random"]


class FakeContext:
    """What the resolvers ask of a running study, without running one."""

    def __init__(self, root: Path):
        self.robot_data = root / "robot"
        self.chunk_size, self.frame_stride = 4, 2
        self.config = study()
        self.asked: list[str] = []
        self.etc = root / "etc" / "llava"
        self.etc.mkdir(parents=True)
        for slug in ("grounding", "egocentric"):
            (self.etc / f"domain_{slug}.json").write_text("[]")

    def selection(self, scorer):
        self.asked.append(scorer)
        return Path(f"/sel/{scorer}/mixture.parquet"), Path(f"/sel/{scorer}/metrics.json")

    def etc_llava_dir(self):
        return self.etc


def test_references_resolve_to_sft_inputs(tmp_path):
    ctx = FakeContext(tmp_path)
    sel = resolve_sft_data(ctx, "selection:random", "d")
    assert sel.keys == {"mixture_file": "/sel/random/mixture.parquet"} and ctx.asked == ["random"]
    text = resolve_sft_data(ctx, "robot_text", "d").keys
    assert text["vla_as_text"] is True
    assert text["datasets"] == [{"name": "robot_text", "kind": "vla", "format": "lerobot", "path": str(tmp_path / "robot"),
                                 "chunk_size": 4, "frame_stride": 2}]  # fmt: skip
    comp = resolve_sft_data(ctx, {"etc:grounding": 1, "etc:egocentric": 3}, "d").keys
    assert [d["name"] for d in comp["datasets"]] == ["etc_grounding", "etc_egocentric"]
    assert comp["mixture"] == {"weights": {"etc_grounding": 1.0, "etc_egocentric": 3.0}}
    both = resolve_sft_data(ctx, ["etc:grounding", "robot_text"], "d").keys
    assert [d["name"] for d in both["datasets"]] == ["etc_grounding", "robot_text"] and both["vla_as_text"] is True
    alle = resolve_sft_data(ctx, "etc:all", "d").keys  # the domains the ETC stage wrote
    assert [d["name"] for d in alle["datasets"]] == ["etc_grounding", "etc_egocentric"]
    with pytest.raises(ConfigError, match="no samples of domain 'spatial'"):
        resolve_sft_data(ctx, "etc:spatial", "d")


def test_robot_task_references_pick_those_episodes(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from midtrain.sim.metaworld_env import TASK_INSTRUCTIONS

    ctx = FakeContext(tmp_path)
    meta = ctx.robot_data / "meta" / "episodes" / "chunk-000"
    meta.mkdir(parents=True)
    tasks = [[TASK_INSTRUCTIONS["reach-v3"]], [TASK_INSTRUCTIONS["push-v3"]], [TASK_INSTRUCTIONS["reach-v3"]]]
    pq.write_table(pa.table({"episode_index": [0, 1, 2], "tasks": tasks}), meta / "file-000.parquet")
    assert resolve_vla_data(ctx, "robot:reach-v3", "d") == {"data": {"lerobot": str(ctx.robot_data), "episodes": [0, 2]}}
    assert resolve_vla_data(ctx, "robot", "d") == {"data": {"lerobot": str(ctx.robot_data)}}
    with pytest.raises(ConfigError, match="no episode of task 'door-open-v3'"):
        resolve_vla_data(ctx, "robot:door-open-v3", "d")


def test_every_final_vla_gets_the_recipe_the_seed_and_the_protocol(tmp_path):
    cfg = study(eval={"episodes_per_task": 3, "tasks": ["reach-v3"]}, curve_every=10)
    ctx = StudyContext(cfg, RunDir(tmp_path / "run"))
    m = vla_mapping(ctx, cfg.vla, "vla_learned_s1", 1, "/models/learned", None, closed_loop=True)
    assert m["model"] == "/models/learned" and "init_policy" not in m
    assert m["seed"] == 1 and m["train"]["seed"] == 1 and m["train"]["steps"] == 30
    assert m["data"] == {"frame_stride": 2, "lerobot": str(tmp_path / "run" / "sim_collect" / "lerobot")}
    assert m["closed_loop_every"] == 10 and m["closed_loop"]["episodes_per_task"] == 3
    assert m["closed_loop"]["corpus"] == m["data"]["lerobot"]  # observations as the policy was trained on
    cont = vla_mapping(ctx, cfg.vla, "vla_x_s0", 0, "/p/backbone", "/p", closed_loop=True)
    assert cont["init_policy"] == "/p" and "model" not in cont and "policy" not in cont
    assert vla_mapping(ctx, cfg.vla, "p", 0, "/m", None, closed_loop=False)["closed_loop_every"] == 0
    final_only = StudyContext(study(), RunDir(tmp_path / "run2"))
    assert vla_mapping(final_only, cfg.vla, "v", 0, "/m", None, closed_loop=True)["closed_loop_every"] == 30
    json.dumps(m)  # plain data: it goes into the manifest
