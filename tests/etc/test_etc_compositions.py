"""ETC domains as training data: references (``etc:grounding+egocentric``) resolved to the domain files an
``etc`` stage wrote, and ``midtrain sft`` drawing compositions of them at a fixed budget (Rethinking
Tables 1-2: the same number of samples for every composition, evenly over its domains)."""

from __future__ import annotations

import json

import pytest
from etc_runs import WRITTEN, etc_run
from torch_threads import one_thread  # noqa: F401  (autouse)

from midtrain.config import ConfigError, load_config
from midtrain.etc.compositions import parse_reference, parse_spec, resolve_etc
from midtrain.runs import RunDir, StageError
from midtrain.sft.config import SFTConfig
from midtrain.sft.stage import run_sft


def test_references_name_a_stage_folder_and_domains():
    r = parse_reference("grounding+egocentric")
    assert (r.folder, r.domains) == ("etc", ("grounding", "egocentric"))
    r = parse_reference("etc_target:Egocentric Understanding+action-ntp")
    assert (r.folder, r.domains, r.prefix) == ("etc_target", ("egocentric", "action_ntp"), "etc_target")
    r = parse_reference("/data/lab/etc_lab:all")
    assert r.is_path and r.domains is None and r.prefix == "etc_lab"
    shares = parse_spec({"etc_target:all": 94, "etc_ood:grounding": 6})
    assert sorted(shares.values()) == pytest.approx([0.06, 0.94])
    with pytest.raises(ConfigError, match=r"unknown domain 'grasping'; domains: spatial, grounding"):
        parse_reference("etc:grounding+grasping")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_reference("grounding+Grounding")
    assert sorted(parse_spec({"etc:grounding": 2, "etc:spatial": 1}).values()) == pytest.approx([1 / 3, 2 / 3])
    with pytest.raises(ConfigError, match="'etc:all' and 'spatial' both take a domain of 'etc'"):
        parse_spec({"etc:all": 1, "spatial": 1})
    with pytest.raises(ConfigError, match="etc: .*expected domains joined by"):
        load_config(SFTConfig, overrides=["model=x", "etc=grounding++spatial"])


def test_resolving_finds_the_written_domains_and_names_what_is_missing(tmp_path):
    run = RunDir(tmp_path / "run")
    etc_run(run, tmp_path / "data")
    every = resolve_etc("etc:all", run.root)
    assert sorted(every.domains.values()) == sorted(WRITTEN)
    assert sum(every.weights.values()) == pytest.approx(1.0) and len(set(every.weights.values())) == 1
    assert {s.name for s in every.sources} == {f"etc_{d}" for d in WRITTEN}
    assert all(s.path.is_file() and s.format == "llava_json" for s in every.sources)
    with pytest.raises(StageError, match=r"no samples of domain 'grounding' .* it has plan_reasoning, camera_prediction"):
        resolve_etc("grounding+egocentric", run.root)
    with pytest.raises(StageError, match=r"holds no etc output .* run `midtrain etc name=etc_target` first"):
        resolve_etc("etc_target:all", run.root)


def _draw(run: RunDir, model, name: str, etc, budget: int, **kw) -> dict:
    config = SFTConfig(model=str(model), name=name, etc=etc, mixture={"budget": budget}, val_fraction=0.1,
                       train={"steps": 1, "batch_size": 2, "eval_every": 0, "num_workers": 0, "save_every": 0}, **kw)  # fmt: skip
    out = run_sft(config, run)
    return json.loads((out / "composition.json").read_text())


def test_compositions_at_one_budget_draw_the_same_number_of_samples_evenly_over_their_domains(tmp_path, tiny_vlm):
    run = RunDir(tmp_path / "run")
    etc_run(run, tmp_path / "data")
    etc_run(run, tmp_path / "data", name="etc_b", generators=["frame_order"])  # a second stage: Temporal only
    model = tiny_vlm("qwen2_vl")
    budget = 20
    pair = _draw(run, model, "sft_pair", "etc:egocentric+temporal", budget)
    uniform = _draw(run, model, "sft_all", "all", budget)
    shares = _draw(run, model, "sft_shares", {"etc:egocentric": 0.75, "etc_b:temporal": 0.25}, budget)
    for comp in (pair, uniform, shares):
        assert comp["train_samples"] == budget and comp["budget"] == budget
    assert {s: v["train_samples"] for s, v in pair["sources"].items()} == {"etc_egocentric": 10, "etc_temporal": 10}
    assert {s: v["train_samples"] for s, v in uniform["sources"].items()} == {f"etc_{d}": 4 for d in WRITTEN}
    assert {s: v["train_samples"] for s, v in shares["sources"].items()} == {"etc_egocentric": 15, "etc_b_temporal": 5}
    assert all(v["val_samples"] == 1 for v in pair["sources"].values())  # held out on top of the budget
