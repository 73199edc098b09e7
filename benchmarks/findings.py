"""The demo's findings on worlds nobody tuned on: how often each holds, by how much, and what is selected.

The demo (``midtrain demo``) checks five of the EmbodiedMidtrain paper's findings on its own
artefacts (``midtrain.experiments.demo.demo_findings``). Its defaults (the featurizer's pooling, the
estimator's AUC monitor) were chosen while looking at a handful of worlds (the test's reduced
world with seeds 0-4, two larger ones, the full default). This benchmark re-runs the demo's
engine on ``--worlds`` worlds *drawn* from a seed, none of which was looked at while choosing:

- world ``i``: ``numpy.random.default_rng(SeedSequence([--seed, i]))`` draws ``--tasks-per-group``
  Meta-World tasks from each of the two VLA groups of the full MT50 list (``MT50_GROUPS``: tasks
  that move objects / tasks that work articulated parts; 29 and 21 tasks), then a collection seed
  (``sim collect``), a pool seed (``sim pool``) and a seed for everything else (estimator, random
  baseline, Gumbel noise), each in [10,000, 2^31) - disjoint from the seeds 0-4 used while
  choosing defaults;
- at the sizes of the end-to-end test (``tests/experiments/test_demo.py``): 1 episode per task, 30 samples
  per pool source, 64-px images, frame stride 3 (``--episodes-per-task`` etc. change them); the
  simulator may drop an episode whose scripted expert fails within 500 steps (Meta-World's limit;
  the demo stops at 200), and the world keeps what succeeded (``vla_frames`` per group in the
  record); the t-SNE map is skipped (no finding reads it);
- with one featurizer for every world (``--featurizer``: the demo's built VLM with SmolLM2 -
  its first ``--text-layers`` decoder layers, the demo's 8 by default - or MiniLM, or ``--model``
  a real VLM), built once (projector seed 0, as the default demo's), pooled as the demo pools it
  unless ``--pooling`` says otherwise.

Per world it records the five findings and their margins (positive = holds; see
``midtrain.experiments.demo.finding_margins``), the per-source mean proximity scores, and two selections of the
top 20% of the pool from the same scores: the demo's top-K and the Gumbel variant (``method:
gumbel``, temperature 1: sampling in proportion to the estimator's density ratio), each with its
per-source shares, its source diversity (``midtrain.select.diversity``: normalised entropy of the
source shares, sources covered, effective number of sources) and its MMD to the VLA data next to
a random selection's.

Prints three tables (findings; composition; diversity), writes ``findings.json`` (every world) to
``--out``, and ends with one JSON line: ``"worlds"``, ``"<finding>_holds_fraction"`` and
``"<finding>_margin_mean"`` per finding, the mean diversity of both selections, wall time and load.

    MUJOCO_GL=egl python benchmarks/findings.py                      # 10 worlds, the demo's featurizer
    MUJOCO_GL=egl python benchmarks/findings.py --featurizer minilm
    MUJOCO_GL=egl python benchmarks/findings.py --text-layers 30       # SmolLM2 at full depth
    MUJOCO_GL=egl python benchmarks/findings.py --quick                # one world
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from midtrain.config import load_config
from midtrain.experiments.demo import DEMO_SMOLLM2_LAYERS, DEMO_VLM_POOLING, FINDINGS, DemoConfig, run_demo
from midtrain.sim.task_groups import MT50_GROUPS
from midtrain.runs import RunDir
from midtrain.stages import STAGES

SEED = 16  # issue 16; world i's seeds come from SeedSequence([SEED, i]) and are all >= 10,000
SEED_FLOOR = 10_000  # the seeds the defaults were chosen on are 0-4
SELECT_FRACTION = 0.2
# Meta-World's episode limit, not the demo's 200: the slowest expert (push-back) needs ~310 steps,
# and a task whose episode is dropped leaves its VLA group smaller (or empty) in that world.
MAX_STEPS = 500


def draw_world(seed: int, index: int, tasks_per_group: int) -> dict:
    """World ``index`` of the series ``seed``: tasks per VLA group and its own seeds (see module doc)."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
    tasks = {g: sorted(rng.choice(MT50_GROUPS[g], size=tasks_per_group, replace=False).tolist()) for g in sorted(MT50_GROUPS)}
    collect_seed, pool_seed, seed_ = (int(s) for s in rng.integers(SEED_FLOOR, 2**31 - 1, size=3))
    return {"index": index, "tasks": tasks, "collect_seed": collect_seed, "pool_seed": pool_seed, "seed": seed_}


def build_featurizer(args, root: Path) -> tuple[str, str, dict]:
    """``(model path, pooling, description)``: the one featurizer every world uses."""
    if args.model:
        return args.model, args.pooling or "mean", {"model": args.model}
    from midtrain.models.demo_vlm import build_demo_vlm

    layers = None if args.featurizer == "minilm" else (args.text_layers or DEMO_SMOLLM2_LAYERS)
    name = args.featurizer + ("" if layers is None else f"_{layers}layers")
    model_dir = root / f"featurizer_{name}"
    if not (model_dir / "midtrain_demo_vlm.json").exists():
        t0 = time.perf_counter()
        build_demo_vlm(model_dir, seed=0, language_model=args.featurizer, text_layers=layers)
        print(f"built the {name} demo featurizer in {time.perf_counter() - t0:.0f} s", flush=True)
    info = json.loads((model_dir / "midtrain_demo_vlm.json").read_text())
    return str(model_dir), args.pooling or DEMO_VLM_POOLING[args.featurizer], {"demo_vlm": name, **info}


def selection_record(select_dir: Path) -> dict:
    m = json.loads((select_dir / "selection_metrics.json").read_text())
    return {
        "shares": {r["source"]: r["selection_share"] for r in m["per_source"]},
        "diversity": {k: m["source_diversity"][k] for k in ("normalised_entropy", "sources_covered", "effective_sources")},
        "mmd_selection_vla": m.get("mmd_selection_vla"),
        "mmd_random_vla": m.get("mmd_random_vla"),
        "mean_score_selection": m.get("mean_score_selection"),
    }


def run_world(world: dict, args, model: str, pooling: str, root: Path) -> dict:
    run = RunDir(root / f"world{world['index']:02d}")
    tasks = [t for g in sorted(world["tasks"]) for t in world["tasks"][g]]
    cfg = load_config(DemoConfig, base={
        "seed": world["seed"], "model": model, "pooling": pooling, "tasks": tasks,
        "episodes_per_task": args.episodes_per_task, "samples_per_source": args.samples_per_source,
        "image_size": args.image_size, "frame_stride": args.frame_stride, "select_fraction": SELECT_FRACTION,
        "report": False, "sft_steps": 0, "overrides": {"sim collect": {"seed": world["collect_seed"], "max_steps": MAX_STEPS},
                      "sim pool": {"seed": world["pool_seed"]}, "gap": {"tsne": False}},
    })  # fmt: skip
    t0 = time.perf_counter()
    run_demo(cfg, run)
    summary = json.loads((run.stage_dir("demo") / "summary.json").read_text())
    # The Gumbel variant: the same scores and features, selected by the select stage in a run of its own.
    config_cls, select = STAGES["select"].load()
    gumbel_run = RunDir(run.root / "gumbel")
    select(load_config(config_cls, base={
        "seed": world["seed"], "fraction": SELECT_FRACTION, "method": "gumbel", "temperature": 1.0,
        "scores": str(run.stage_dir("score") / "proximity_scores.parquet"), "features": str(run.stage_dir("featurize")),
    }), gumbel_run)  # fmt: skip
    vla = {s: v["written"] for s, v in run.manifest("catalog")["sources"].items() if v["kind"] == "vla"}
    f = summary["findings"]
    record = {
        **world,
        "vla_frames": vla,
        "wall_s": round(time.perf_counter() - t0, 1),
        "featurize_s": next(c["wall_s"] for c in summary["stages"] if c["stage"] == "featurize"),
        "stage_s": {c["stage"]: c["wall_s"] for c in summary["stages"]},
        "findings": {k: bool(f[k]) for k in FINDINGS},
        "margins": f["margins"],
        "mean_proximity_by_source": f["mean_proximity_by_source"],
        "mmd": {k: f[k] for k in ("mean_mmd_cross", "mean_mmd_within_vlm", "mean_mmd_within_vla")},
        "top_k": selection_record(run.stage_dir("select")),
        "gumbel": selection_record(gumbel_run.stage_dir("select")),
    }
    if not args.keep:
        shutil.rmtree(run.root)
    return record


def _stats(values: list) -> dict:
    v = [x for x in values if x is not None]
    if not v:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.fmean(v), "min": min(v), "max": max(v)}


def summarise(records: list[dict]) -> dict:
    n = len(records)
    out: dict = {"worlds": n, "findings": {}, "composition": {}, "diversity": {}}
    for k in FINDINGS:
        holds = sum(r["findings"][k] for r in records)
        out["findings"][k] = {"holds": holds, "holds_fraction": holds / n, "margin": _stats([r["margins"][k] for r in records])}
    sources = sorted({s for r in records for s in r["top_k"]["shares"]})
    for s in sources:
        out["composition"][s] = {m: _stats([r[m]["shares"].get(s, 0.0) for r in records]) for m in ("top_k", "gumbel")}
    for key in ("normalised_entropy", "sources_covered", "effective_sources"):
        out["diversity"][key] = {m: _stats([r[m]["diversity"][key] for r in records]) for m in ("top_k", "gumbel")}
    for key in ("mmd_selection_vla", "mmd_random_vla", "mean_score_selection"):
        out["diversity"][key] = {m: _stats([r[m][key] for r in records]) for m in ("top_k", "gumbel")}
    # each selection against the random one of its own run (same kernel bandwidth)
    out["diversity"]["closer_than_random"] = {
        m: _stats([float(r[m]["mmd_selection_vla"] < r[m]["mmd_random_vla"]) for r in records if r[m]["mmd_selection_vla"] is not None])
        for m in ("top_k", "gumbel")
    }  # fmt: skip
    out["lowest_scoring_source"] = _count(min(r["mean_proximity_by_source"], key=r["mean_proximity_by_source"].get) for r in records)
    out["highest_scoring_source"] = _count(max(r["mean_proximity_by_source"], key=r["mean_proximity_by_source"].get) for r in records)
    return out


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[x] = out.get(x, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _fmt(s: dict, digits: int = 3) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:+.{digits}f} ({s['min']:+.{digits}f} .. {s['max']:+.{digits}f})"


def _fmt_plain(s: dict, digits: int = 2) -> str:
    if s["mean"] is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def print_tables(summary: dict) -> None:
    n = summary["worlds"]
    print(f"\n| finding | holds in | margin: mean (min .. max) |\n|---|---|---|")
    for k, v in summary["findings"].items():
        print(f"| {k} | {v['holds']}/{n} | {_fmt(v['margin'])} |")
    print(f"\nlowest mean proximity: {summary['lowest_scoring_source']}; highest: {summary['highest_scoring_source']}")
    print("\n| source | share of the top-K 20%: mean (min-max) | share of the Gumbel 20% |\n|---|---|---|")
    for s, v in summary["composition"].items():
        print(f"| {s} | {_fmt_plain(v['top_k'])} | {_fmt_plain(v['gumbel'])} |")
    print("\n| selection metric | top-K: mean (min-max) | Gumbel (T = 1) |\n|---|---|---|")
    for k, v in summary["diversity"].items():
        if k == "closer_than_random":  # a fraction of worlds: no range
            print(f"| MMD to VLA below random's, in | {v['top_k']['mean']:.0%} of worlds | {v['gumbel']['mean']:.0%} |")
        else:
            print(f"| {k} | {_fmt_plain(v['top_k'], 3)} | {_fmt_plain(v['gumbel'], 3)} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, default=10, help="number of worlds drawn (default 10)")
    p.add_argument("--first-world", type=int, default=0, help="index of the first world (to extend a series)")
    p.add_argument("--seed", type=int, default=SEED, help=f"the series' seed (default {SEED})")
    p.add_argument("--tasks-per-group", type=int, default=2, help="tasks drawn per VLA group (default 2, as the test's world)")
    p.add_argument("--episodes-per-task", type=int, default=1)
    p.add_argument("--samples-per-source", type=int, default=30)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--frame-stride", type=int, default=3)
    p.add_argument("--featurizer", choices=sorted(DEMO_VLM_POOLING), default=DemoConfig().demo_vlm,
                   help="the built demo VLM's language model (default: the demo's)")  # fmt: skip
    p.add_argument("--text-layers", type=int, default=None,
                   help=f"smollm2: decoder layers kept, of 30 (default: the demo's, {DEMO_SMOLLM2_LAYERS})")  # fmt: skip
    p.add_argument("--model", default="", help="a real VLM (hub id or path) instead of the built demo featurizer")
    p.add_argument("--pooling", default="", help="override the featurizer's pooling (default: as the demo pools it)")
    p.add_argument("--out", type=Path, default=None, help="directory for findings.json, the featurizer and the runs "
                   "(default: a temporary directory, deleted)")  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep every world's run directory")
    p.add_argument("--quick", action="store_true", help="one world (a smoke run of a minute or two)")
    p.add_argument("--report", type=Path, default=None, help="print the tables of an earlier run's findings.json; run nothing")
    args = p.parse_args(argv)
    if args.report is not None:
        report(json.loads(args.report.read_text()))
        return 0
    if args.quick:
        args.worlds = 1

    os.environ.setdefault("MIDTRAIN_PROGRESS", "off")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    tmp = None
    if args.out is None:
        tmp = tempfile.TemporaryDirectory(prefix="midtrain-findings-")
        args.out = Path(tmp.name)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    model, pooling, featurizer = build_featurizer(args, args.out)
    print(f"featurizer {featurizer.get('demo_vlm', model)}, pooling {pooling}; {args.worlds} worlds of series {args.seed}", flush=True)
    records, loads = [], []
    for i in range(args.first_world, args.first_world + args.worlds):
        world = draw_world(args.seed, i, args.tasks_per_group)
        r = run_world(world, args, model, pooling, args.out)
        records.append(r)
        loads.append(os.getloadavg()[0])
        held = " ".join(f"{k}={'Y' if v else 'n'}" for k, v in r["findings"].items())
        print(f"world {i}: {', '.join(t for ts in world['tasks'].values() for t in ts)}; "
              f"{r['wall_s']:.0f} s (featurize {r['featurize_s']:.0f} s), load {loads[-1]:.1f}; {held}", flush=True)  # fmt: skip
    run = {"wall_s": round(time.perf_counter() - t0, 1), "load_avg_start": round(load_start, 2),
           "load_avg_max": round(max(loads), 2), "cpu_cores": os.cpu_count()}  # fmt: skip
    result = {"featurizer": featurizer, "pooling": pooling, "seed": args.seed, "run": run,
              "args": {k: str(v) for k, v in vars(args).items()}, "worlds": records}  # fmt: skip
    (args.out / "findings.json").write_text(json.dumps({**result, "summary": summarise(records)}, indent=1) + "\n")
    report(result)
    if tmp is not None:
        tmp.cleanup()
    return 0


def report(result: dict) -> dict:
    """Print the tables and the final JSON line of a finished series (``findings.json``'s content)."""
    records = result["worlds"]
    summary = summarise(records)
    print_tables(summary)
    featurizer = result["featurizer"]
    line = {"bench": "findings", "featurizer": featurizer.get("demo_vlm", featurizer.get("model")),
            "pooling": result["pooling"], "seed": result["seed"], "worlds": len(records)}  # fmt: skip
    for k, v in summary["findings"].items():
        line[f"{k}_holds_fraction"] = round(v["holds_fraction"], 3)
        line[f"{k}_margin_mean"] = None if v["margin"]["mean"] is None else round(v["margin"]["mean"], 4)
    for m in ("top_k", "gumbel"):
        line[f"{m}_normalised_entropy_mean"] = round(summary["diversity"]["normalised_entropy"][m]["mean"], 3)
        line[f"{m}_sources_covered_mean"] = round(summary["diversity"]["sources_covered"][m]["mean"], 2)
    line.update(result["run"])
    print(json.dumps(line))
    return line

if __name__ == "__main__":
    sys.exit(main())
