"""The demo's findings as numbers (margins), the MT50 task table, and the worlds ``benchmarks/findings.py`` draws."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from midtrain.config import ConfigError, load_config
from midtrain.experiments.demo import FINDINGS, DemoConfig, finding_margins
from midtrain.sim.task_groups import MT50_GROUPS
from midtrain.sim.metaworld_env import DEFAULT_TASKS, TASK_INSTRUCTIONS


def _bench():
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "findings.py"
    spec = importlib.util.spec_from_file_location("findings_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_mt50_task_is_in_exactly_one_vla_group():
    listed = [t for tasks in MT50_GROUPS.values() for t in tasks]
    assert sorted(listed) == sorted(TASK_INSTRUCTIONS) and len(listed) == len(set(listed)) == 50
    # the demo's default tasks keep the groups they had: 5 moving objects, 5 articulated
    objects = {"reach-v3", "push-v3", "pick-place-v3", "coffee-push-v3", "basketball-v3"}
    assert {t for t in DEFAULT_TASKS if t in MT50_GROUPS["metaworld_objects"]} == objects
    assert set(DEFAULT_TASKS) - objects <= set(MT50_GROUPS["metaworld_articulated"])


def test_margins_are_positive_exactly_when_a_finding_holds():
    findings = {"mean_mmd_cross": 0.6, "mean_mmd_within_vlm": 0.5, "mean_mmd_within_vla": 0.2,
                "mmd_selection_vla": 0.45, "mmd_random_vla": 0.6}  # fmt: skip
    scores = {"spatial_pointing": 0.5, "captions": 0.2, "book_covers": 0.1, "chart_qa": 0.3}
    mmd = {"spatial_pointing": 0.4, "captions": 0.7, "book_covers": 0.65, "chart_qa": 0.6}
    m = finding_margins(findings, scores, mmd)
    assert set(m) == set(FINDINGS)
    assert m["cross_group_exceeds_within_group"] == pytest.approx(0.1)  # 0.6 - max(0.5, 0.2)
    assert m["embodied_source_highest"] == pytest.approx(0.2)  # 0.5 - 0.3
    assert m["text_centric_source_lowest"] == pytest.approx(0.1)  # 0.2 - 0.1
    assert m["text_centric_source_farthest_by_mmd"] == pytest.approx(-0.05)  # 0.65 - 0.7: captions is farther
    assert m["selection_closer_than_random"] == pytest.approx(0.15)
    none = finding_margins({"mean_mmd_cross": None}, {}, {})
    assert all(v is None for v in none.values())


def test_demo_vlm_layers_need_the_causal_language_model():
    assert load_config(DemoConfig, base={"demo_vlm": "smollm2", "demo_vlm_layers": 30}).demo_vlm_layers == 30
    with pytest.raises(ConfigError, match="demo_vlm_layers"):
        load_config(DemoConfig, base={"demo_vlm": "minilm", "demo_vlm_layers": 8})
    with pytest.raises(ConfigError, match="demo_vlm_layers"):
        load_config(DemoConfig, base={"demo_vlm": "smollm2", "demo_vlm_layers": 31})


def test_worlds_are_drawn_reproducibly_from_both_groups_with_fresh_seeds():
    bench = _bench()
    worlds = [bench.draw_world(16, i, 2) for i in range(20)]
    assert worlds == [bench.draw_world(16, i, 2) for i in range(20)]
    assert worlds[0] != bench.draw_world(17, 0, 2)
    for w in worlds:
        for group, tasks in w["tasks"].items():
            assert len(tasks) == len(set(tasks)) == 2 and set(tasks) <= set(MT50_GROUPS[group])
        assert min(w["collect_seed"], w["pool_seed"], w["seed"]) >= 10_000  # never a seed defaults were chosen on
    assert len({tuple(sorted(sum(w["tasks"].values(), []))) for w in worlds}) > 15  # drawn, not a fixed list


def test_summary_counts_holds_and_margins_per_finding():
    bench = _bench()

    def record(holds: bool, margin: float, spatial_share: float) -> dict:
        sel = {"shares": {"spatial_pointing": spatial_share, "book_covers": 1 - spatial_share},
               "diversity": {"normalised_entropy": 0.5, "sources_covered": 2, "effective_sources": 1.5},
               "mmd_selection_vla": 0.4, "mmd_random_vla": 0.6, "mean_score_selection": 0.7}  # fmt: skip
        return {"findings": {k: holds for k in FINDINGS}, "margins": {k: margin for k in FINDINGS},
                "mean_proximity_by_source": {"spatial_pointing": 0.6, "book_covers": 0.1}, "top_k": sel, "gumbel": sel}  # fmt: skip

    s = bench.summarise([record(True, 0.2, 1.0), record(False, -0.1, 0.5), record(True, 0.05, 0.9)])
    for k in FINDINGS:
        assert s["findings"][k]["holds"] == 2 and s["findings"][k]["holds_fraction"] == pytest.approx(2 / 3)
        assert s["findings"][k]["margin"] == pytest.approx({"mean": 0.05, "min": -0.1, "max": 0.2})
    assert s["composition"]["spatial_pointing"]["top_k"] == pytest.approx({"mean": 0.8, "min": 0.5, "max": 1.0})
    assert s["lowest_scoring_source"] == {"book_covers": 3}
