"""``midtrain recipes``: recipe files load and plan (shared steps run once, a step name means one config,
per-seed steps), and the reduced miniature runs every recipe of ``configs/recipes`` end to end on a tiny
world - mechanics, not findings: every cell filled, intervals computed, files written, rerun skipped."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from torch_threads import one_thread  # noqa: F401  (autouse)

import midtrain
from midtrain.config import ConfigError, load_config
from midtrain.experiments.recipes.config import RecipesConfig
from midtrain.experiments.recipes.stage import fill, load_recipe, plan_recipes, recipe_files, run_recipes, waves
from midtrain.runs import RunDir

RECIPES = Path(midtrain.__file__).parents[2] / "configs" / "recipes"
MINIATURE_RECIPES = [p for p in recipe_files(RECIPES) if p.stem != "etc_pathway_ood"]  # needs a third ETC split
_no_sim = importlib.util.find_spec("mujoco") is None or importlib.util.find_spec("metaworld") is None
VARS = {"run": "/r", "base": "/vlm", "source": "/src", "target": "/tgt"}


def config(**kw) -> RecipesConfig:
    base = {"world": {"source": "/src", "target": "/tgt"}, "eval": {"tasks": ["reach-v3"]}, "recipes": [str(p) for p in MINIATURE_RECIPES]}
    return load_config(RecipesConfig, base={**base, **kw})


def test_placeholders_are_filled_and_a_lone_seed_is_a_number():
    assert fill({"a": "{run}/x", "b": ["{seed}", "s{seed}"], "c": 3}, {**VARS, "seed": 2}) == {"a": "/r/x", "b": [2, "s2"], "c": 3}


def test_the_recipe_files_plan_with_shared_steps_run_once():
    recipes = [load_recipe(p, p.stem) for p in MINIATURE_RECIPES]
    assert {r.name for r in recipes} == {"etc_pathway", "etc_action_only_ob", "etc_only_stage3", "action_only",
                                         "rethinking_route", "rethinking_full_stage1", "direct_vla"}  # fmt: skip
    plan = plan_recipes(config(seeds=[0, 1]), recipes, VARS)
    assert sorted(plan.stages["sft_etc_db"].used_by) == ["etc_action_only_ob", "etc_pathway"]
    assert sorted(plan.stages["vla_ao_base"].used_by) == ["action_only", "etc_only_stage3"]
    assert plan.finals["etc_pathway"] == {0: "vla_etc_ra_s0", 1: "vla_etc_ra_s1"}
    ra = plan.stages["vla_etc_ra_s1"].mapping
    assert ra["train"]["seed"] == 1 and ra["init_policy"] == "/r/vla_etc_ob/policy" and ra["data"]["lerobot"] == "/tgt"
    assert ra["cotrain"]["etc"].startswith("etc_target:") and "cotrain" not in plan.stages["vla_ao_db"].mapping
    assert len(plan.stages) == 8 + 2 * 7  # shared steps once, one final per recipe and seed
    # waves (backend: ray runs each at once): a stage after every earlier step of each recipe naming it
    order = {s.name: i for i, wave in enumerate(waves(plan)) for s in wave}
    assert sorted(order) == sorted(plan.stages)
    for recipe in recipes:
        for seed in (0, 1):
            names = [s.name.replace("{seed}", str(seed)) for s in recipe.steps]
            assert [order[n] for n in names] == sorted(order[n] for n in names) and len(set(order[n] for n in names)) == len(names)
    assert order["vla_etc_ra_s0"] == order["vla_etc_ra_s1"] and order["sft_etc_db"] == 0  # seeds side by side
    assert sum(len(w) for w in waves(plan)) == len(plan.stages) and len(waves(plan)) < len(plan.stages)


def test_a_step_name_means_one_config_and_bad_recipes_name_the_key(tmp_path):
    a = {"name": "a", "steps": [{"name": "vla_x_s{seed}", "stage": "vla", "config": {"model": "{base}"}}]}
    b = {"name": "b", "steps": [{"name": "vla_x_s{seed}", "stage": "vla", "config": {"model": "{base}", "policy": {"head": "flow"}}}]}
    with pytest.raises(ConfigError, match="stage folder 'vla_x_s0' is also a step of a with another config"):
        plan_recipes(config(recipes=[a, b]), [load_recipe(a, "a"), load_recipe(b, "b")], VARS)
    with pytest.raises(ConfigError, match=r"recipes\[0\].steps\[0\]: expected \{name, stage: sft \| vla"):
        load_recipe({"name": "c", "steps": [{"name": "x", "stage": "eval"}]}, "recipes[0]")
    bad = {"name": "d", "steps": [{"name": "vla_d_s{seed}", "stage": "vla", "config": {"model": "{base}", "cotrain": {"batch_share": 9}}}]}
    with pytest.raises(ConfigError, match=r"d.steps\[0\] \(vla_d_s0\): cotrain.batch_share: must be in \(0, 4\]"):
        plan_recipes(config(recipes=[bad]), [load_recipe(bad, "d")], VARS)
    with pytest.raises(ConfigError, match="world.target_tasks: \\['reach-v3'\\] are also source tasks"):
        load_config(RecipesConfig, base={"world": {"source_tasks": ["reach-v3"], "target_tasks": ["reach-v3"]}, "recipes": [a]})


@pytest.mark.slow
@pytest.mark.skipif(_no_sim, reason="needs the sim extra (metaworld, mujoco)")
def test_the_reduced_miniature_runs_every_recipe(tiny_vlm, tmp_path):
    from midtrain.eval.rollout import import_triton_before_gl
    from midtrain.sim.metaworld_env import ensure_gl_backend

    ensure_gl_backend()
    import_triton_before_gl()  # episodes render in this process (see midtrain.eval.rollout)
    train = {"steps": 2, "batch_size": 2, "eval_every": 0, "eval_batches": 2, "save_every": 0, "num_workers": 0, "log_every": 1}
    cfg = load_config(RecipesConfig, base={
        "model": str(tiny_vlm("qwen2_vl")), "seeds": [0, 1],
        "world": {"source_tasks": ["reach-v3", "button-press-topdown-v3"], "target_tasks": ["drawer-open-v3"],
                  "source_episodes": 1, "target_episodes": 1,
                  "collect": {"width": 64, "height": 64, "max_steps": 120, "workers": 1}},
        "etc": {"frame_stride": 6},
        "defaults": {"sft": {"train": train, "mixture": {"budget": 8}, "val_fraction": 0.2, "device": "cpu", "prepare_workers": 0},
                     "vla": {"train": train, "policy": {"chunk_size": 4}, "device": "cpu", "data": {"frame_stride": 4},
                             "cotrain": {"prepare_workers": 0}}},
        "recipes": [str(p) for p in MINIATURE_RECIPES],
        "eval": {"episodes_per_task": 1, "max_steps": 8, "workers": 1, "videos_per_task": 0, "frames": "raw"},  # lossless corpus
        "drift": [{"name": "objective_bridging", "reference": "{run}/sft_etc_db/model", "frames": 4,
                   "models": {"etc_cotrain": "{run}/vla_etc_ob/policy/backbone", "action_only": "{run}/vla_ao_db/policy/backbone"}}],
        "compare": [["etc_pathway", "etc_action_only_ob"], ["rethinking_route", "direct_vla"]],
    })  # fmt: skip
    run = RunDir(tmp_path / "run")
    out = run_recipes(cfg, run)
    results = json.loads((out / "results.json").read_text())
    assert set(results["recipes"]) == {load_recipe(p, "r").name for p in MINIATURE_RECIPES}
    for name, r in results["recipes"].items():
        s = r["success"]
        assert len(s["per_seed"]) == 2 and s["episodes"] == 2 and 0 <= s["ci95"][0] <= s["mean"] <= s["ci95"][1] <= 1, name
        for final in r["finals"].values():
            assert (run.root / "evals" / final / "eval" / "results.json").is_file()
    assert [(c["recipe"], c["reference"]) for c in results["comparisons"]] == [("etc_pathway", "etc_action_only_ob"),
                                                                              ("rethinking_route", "direct_vla")]  # fmt: skip
    drift = results["drift"]["objective_bridging"]
    assert set(drift["models"]) == {"etc_cotrain", "action_only"}
    assert all(len(m["cka"]) == drift["layers"] and all(0 <= c <= 1 + 1e-6 for c in m["cka"]) for m in drift["models"].values())
    table = (out / "results.md").read_text()
    assert "| etc_pathway |" in table and "CKA per layer" in table and "etc_pathway - etc_action_only_ob" in table
    man = json.loads((run.root / "vla_etc_ob" / "manifest.json").read_text())
    assert man["cotrain"]["sources"] and all(s.startswith("etc_source_") for s in man["cotrain"]["sources"])
    assert json.loads((run.root / "etc_target" / "manifest.json").read_text())["dataset"].endswith("worlds/target/sim_collect/lerobot")
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert run_recipes(cfg, run) == out and (out / "manifest.json").stat().st_mtime_ns == stamp  # complete: skipped
