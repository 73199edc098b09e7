"""``study.json``: every number of a study with its seed and the file it came from.

Read only from the sub-stages' artefacts (manifests, ``metrics.jsonl``, the closed-loop
``episodes.parquet``, ``selection_metrics.json``, ``cka.json``), so the aggregate can be rebuilt at
any time. Layout::

    {"protocol": {...}, "baseline_row": "base",
     "rows": {<row>: {
        "init", "steps": [{stage, kind, data, samples_seen, train_loss, eval_loss}],
        "recipe_overrides": {...},            # the row's departures from the common VLA recipe
        "mixture": {scorer, k, mmd_to_vla, diversity, source_diversity} | null,
        "seeds": {<seed>: {stage, success, per_task, curve, offline, train_seconds}},
        "success": {mean, ci95, interval, per_seed, per_task, episodes, successes},
        "vs_baseline": {mean, ci95, share_of_replicates_above_0, minimum_detectable_difference},  # study.power
        "offline_l1", "offline_gripper_accuracy": {mean, ci95, n, values},  # ci95 clipped to the quantity's range
        "probe": {seeds: {<seed>: {stage, l1, gripper_accuracy}}, l1},
        "curve": [{step, mean, ci95}],
        "cka": {"vlm": [...] | null, "vla": {<seed>: [...]}}}},
     "pairwise": {"<row a> - <row b>": {mean, ci95, share_of_replicates_above_0,
                                        minimum_detectable_difference}},  # rows other than the baseline and the controls
     "controls": {"<baseline> - <control row>": {control, measures: vision | language_model, mean, ci95,
                                                 share_of_replicates_above_0, minimum_detectable_difference}},
     "warnings": [{kind, subject | subjects, message}],  # midtrain.experiments.study.caveats: saturated tasks, zero-width intervals
     "sequential": {rounds, rounds_run, boundaries, stopped, comparisons: {<a - b>: {z, decided, look}}} | null,
     "budgets": {...}, "cost": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from ...runs import RunDir
from .plan import CKA_STAGE, RANDOM_VLM_STAGE, SELECTIONS_DIR, VLA_TEXT_STAGE, VLM_STAGE, RowStages, sft_data_refs
from .caveats import study_warnings
from .power import comparison_power
from .rounds import episodes_table, first_round, merge_rounds, round_episodes, round_run, sequential_record
from .stats import INTERVAL_METHOD, paired_interval, success_summary, t_interval

WORLD_STAGES = ("sim_collect", "sim_pool", "catalog", "featurize", "gap", "fit", "score", "select", "export", "etc")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def closed_loop_episodes(stage_dir: Path) -> dict[int, dict[str, list[bool]]]:
    """``{step: {task: [success of episode 0, 1, ...]}}`` from a vla stage's ``closed_loop/step-*/``."""
    out: dict[int, dict[str, list[bool]]] = {}
    for folder in sorted((stage_dir / "closed_loop").glob("step-*")):
        path = folder / "episodes.parquet"
        if not path.is_file():
            continue
        out[int(folder.name.split("-")[1])] = episodes_table(path)
    return out


def _offline(manifest: dict) -> dict[str, Optional[float]]:
    train = manifest.get("train", {})
    return {"l1": train.get("eval_l1"), "gripper_accuracy": train.get("eval_gripper_accuracy"),
            "loss": train.get("eval_loss")}  # fmt: skip


def _mixture(step_overrides: dict, run: RunDir) -> Optional[dict]:
    """MMD to the VLA data and diversity of a selection-fed step's mixture (select's own metrics)."""
    if "data" not in step_overrides:
        return None
    refs = sft_data_refs(step_overrides["data"], "data")
    if len(refs) != 1 or refs[0][0].kind != "selection":
        return None
    scorer = refs[0][0].arg
    metrics = _read_json(run.root / SELECTIONS_DIR / scorer / "select" / "selection_metrics.json") or {}
    return {
        "scorer": scorer, "selected": metrics.get("selected", metrics.get("k")),
        "mmd_to_vla": metrics.get("mmd_selection_vla"), "mmd_random_to_vla": metrics.get("mmd_random_vla"),
        "diversity": metrics.get("diversity_selection"), "diversity_pool": metrics.get("diversity_pool"),
        "diversity_metric": metrics.get("diversity_metric"), "source_diversity": metrics.get("source_diversity"),
        "file": str(run.root / SELECTIONS_DIR / scorer / "select" / "selection_metrics.json"),
    }  # fmt: skip


def _row_result(config, run: RunDir, row, rs: RowStages, cka: dict, models, rounds_run: int = 1) -> dict[str, Any]:
    steps = []
    mixture = None
    for spec, step in zip(row.steps, rs.steps):
        man = run.manifest(step.name) or {}
        train = man.get("train", {})
        steps.append({"stage": step.name, "kind": step.kind, "data": step.overrides.get("data"),
                      "samples_seen": train.get("samples"), "steps": train.get("steps"),
                      "train_loss": train.get("train_loss"), "eval_loss": train.get("eval_loss"),
                      "wall_s": man.get("timings", {}).get("wall_s")})  # fmt: skip
        if step.kind == "sft":
            mixture = _mixture(step.overrides, run) or mixture
    seeds: dict[int, dict] = {}
    episodes_final: dict[int, dict[str, list[bool]]] = {}
    curves: dict[int, dict[int, dict[str, list[bool]]]] = {}
    for seed, name in rs.finals.items():
        man = run.manifest(name) or {}
        eps = closed_loop_episodes(run.stage_dir(name))
        last = max(eps) if eps else None
        seeds[seed] = {
            "stage": name, "status": man.get("status"),
            "success": None, "per_task": None,
            "curve": [{"step": s, "success": round(_mean_over_tasks(e), 4)} for s, e in sorted(eps.items())],
            "offline": _offline(man), "train_seconds": man.get("train", {}).get("train_seconds"),
            "samples_seen": man.get("train", {}).get("samples"), "wall_s": man.get("timings", {}).get("wall_s"),
        }  # fmt: skip
        if last is not None:
            final = merge_rounds([eps[last], *(round_episodes(run, row.name, seed, k) for k in range(2, rounds_run + 1))])
            episodes_final[seed] = final  # with the sequential rounds after the first (study.rounds)
            seeds[seed]["success"] = round(_mean_over_tasks(final), 4)
            seeds[seed]["per_task"] = {t: round(sum(v) / len(v), 4) for t, v in final.items()}
            seeds[seed]["episodes_file"] = str(run.stage_dir(name) / "closed_loop" / f"step-{last:06d}" / "episodes.parquet")
            if rounds_run > 1:
                seeds[seed]["round_files"] = [str(round_run(run, row.name, seed, k).stage_dir("eval") / "episodes.parquet")
                                              for k in range(2, rounds_run + 1)]  # fmt: skip
            curves[seed] = eps
    out: dict[str, Any] = {
        "init": row.init, "control": row.control, "steps": steps, "recipe_overrides": row.vla, "mixture": mixture, "seeds": seeds,
        "vlm": models[row.name][0],
        "success": success_summary([episodes_final[s] for s in sorted(episodes_final)], config.seed)
        if len(episodes_final) == len(rs.finals) and episodes_final else None,
        "offline_l1": t_interval([seeds[s]["offline"]["l1"] for s in seeds], bounds=(0.0, None)),
        "offline_gripper_accuracy": t_interval([seeds[s]["offline"]["gripper_accuracy"] for s in seeds], bounds=(0.0, 1.0)),
    }  # fmt: skip
    out["_episodes"] = [episodes_final[s] for s in sorted(episodes_final)]
    common = sorted(set.intersection(*(set(c) for c in curves.values()))) if len(curves) == len(rs.finals) and curves else []
    out["curve"] = [{"step": step, **_short(success_summary([curves[s][step] for s in sorted(curves)], config.seed))}
                    for step in common]  # fmt: skip
    probes = {}
    for seed, name in rs.probes.items():
        man = run.manifest(name) or {}
        probes[seed] = {"stage": name, **{k: v for k, v in _offline(man).items() if k != "loss"}}
    out["probe"] = {"seeds": probes, "l1": t_interval([p["l1"] for p in probes.values()], bounds=(0.0, None)),
                    "gripper_accuracy": t_interval([p["gripper_accuracy"] for p in probes.values()], bounds=(0.0, 1.0))}  # fmt: skip
    models_cka = (cka or {}).get("models", {})
    vlm_cka = models_cka.get(row.name, {}).get("cka")
    if vlm_cka is None and cka and models[row.name][0] == cka.get("base"):
        vlm_cka = [1.0] * int(cka["layers"])  # the base VLM itself
    out["cka"] = {"vlm": vlm_cka, "vla": {int(k.rsplit("_s", 1)[1]): v["cka"] for k, v in models_cka.items()
                                          if k.startswith(f"{row.name}/vla_s")}}  # fmt: skip
    return out


def _power(config, row: list, other: list) -> dict:
    p = config.power
    return comparison_power(row, other, p.target_difference, p.power, p.alpha, p.seed_counts)


def control_comparisons(config, rows: dict[str, dict]) -> dict[str, dict]:
    """``{"<baseline> - <control>": paired interval + power}`` for every control row (``CONTROLS``):
    baseline - blind is how much success comes from vision, baseline - vision_tower what the
    language model adds (or, below 0, removes) over the VLM's own pooled vision features."""
    from .config import CONTROLS

    base = rows[config.baseline_row]
    out = {}
    for row in config.rows:
        r = rows[row.name]
        if row.control is None or not r["success"] or not base["success"]:
            continue
        d = paired_interval(base["_episodes"], r["_episodes"], config.seed)
        d["minimum_detectable_difference"] = _power(config, base["_episodes"], r["_episodes"])
        out[f"{config.baseline_row} - {row.name}"] = {"control": row.control, "measures": CONTROLS[row.control]["measures"],
                                                      "what": CONTROLS[row.control]["what"], **d}  # fmt: skip
    return out


def _mean_over_tasks(tasks: dict[str, list[bool]]) -> float:
    return sum(sum(v) / len(v) for v in tasks.values()) / len(tasks)


def _short(summary: dict) -> dict:
    return {"mean": summary["mean"], "ci95": summary["ci95"], "per_seed": summary["per_seed"]}


def _cost(run: RunDir, names: list[str]) -> dict[str, Any]:
    stages = {}
    for name in names:
        man = run.manifest(name)
        if man is not None:
            stages[name] = man.get("timings", {}).get("wall_s")
    sel_root = run.root / SELECTIONS_DIR
    for sub in sorted(sel_root.glob("*")) if sel_root.is_dir() else []:
        for stage in ("score", "select", "export"):
            man = _read_json(sub / stage / "manifest.json")
            if man:
                stages[f"{SELECTIONS_DIR}/{sub.name}/{stage}"] = man.get("timings", {}).get("wall_s")
    return {"stages_wall_s": stages, "total_wall_s": round(sum(v for v in stages.values() if v), 1),
            "note": "compute time of each sub-stage when it ran (from its manifest), whatever invocation ran it"}  # fmt: skip


def collect_results(config, run: RunDir, plans: list[RowStages], models: dict, ctx=None) -> dict[str, Any]:
    """``study.json``'s content (see the module docstring)."""
    cka = _read_json(run.stage_dir(CKA_STAGE) / "cka.json") if config.cka.enabled else None
    sequential = sequential_record(config, first_round(run, config, plans), run)
    rounds_run = sequential["rounds_run"] if sequential else 1
    rows = {row.name: _row_result(config, run, row, rs, cka, models, rounds_run) for row, rs in zip(config.rows, plans)}
    base = rows[config.baseline_row]
    for name, r in rows.items():
        if name != config.baseline_row and r["success"] and base["success"]:
            r["vs_baseline"] = paired_interval(r["_episodes"], base["_episodes"], config.seed)
            r["vs_baseline"]["minimum_detectable_difference"] = _power(config, r["_episodes"], base["_episodes"])
        else:
            r["vs_baseline"] = None
    # Every other pair of rows too (learned - random is the seed's headline comparison): row order is
    # the config's, each difference is "first - second", paired over the same seeds and episodes.
    controls = control_comparisons(config, rows)
    names_in_order = [r.name for r in config.rows if rows[r.name]["success"] and not r.control]
    pairs = {
        f"{a} - {b}": paired_interval(rows[a]["_episodes"], rows[b]["_episodes"], config.seed)
        for i, a in enumerate(names_in_order) for b in names_in_order[i + 1 :]
        if config.baseline_row not in (a, b)
    }  # fmt: skip
    for key, d in pairs.items():
        a, b = key.split(" - ")
        d["minimum_detectable_difference"] = _power(config, rows[a]["_episodes"], rows[b]["_episodes"])
    for r in rows.values():
        r.pop("_episodes")
    sft_samples = {name: sum(s["samples_seen"] or 0 for s in r["steps"] if s["kind"] == "sft") for name, r in rows.items()}
    mid = {n: v for n, v in sft_samples.items() if any(s["kind"] == "sft" for s in rows[n]["steps"])}
    vla_samples = {name: sorted({s["samples_seen"] for s in r["seeds"].values()} - {None}) for name, r in rows.items()}
    settings = ctx and getattr(ctx, "config", None)
    protocol = {
        "benchmark": config.eval.benchmark, "eval": config.eval.to_dict(), "seeds": list(config.seeds),
        "closed_loop": config.closed_loop, "curve_every": config.curve_every, "success_interval": INTERVAL_METHOD,
        "offline_interval": "Student-t 95% over seeds (none with one seed)", "k": config.k,
        "robot_data": str(ctx.robot_data) if ctx is not None else None, "base_vlm": str(ctx.base_vlm) if ctx else None,
    }  # fmt: skip
    if settings is not None:
        from .plan import eval_settings

        protocol["eval"] = eval_settings(ctx)
    names = [*WORLD_STAGES, VLM_STAGE, RANDOM_VLM_STAGE, VLA_TEXT_STAGE, CKA_STAGE]
    names += [s.name for rs in plans for s in rs.steps] + [n for rs in plans for n in (*rs.finals.values(), *rs.probes.values())]
    return {
        "protocol": protocol, "baseline_row": config.baseline_row, "rows": rows, "pairwise": pairs, "controls": controls,
        "warnings": study_warnings(rows, pairs, config.baseline_row),
        "sequential": sequential,
        "budgets": {"midtrain_samples": mid, "midtrain_equal": len(set(mid.values())) <= 1,
                    "vla_samples": vla_samples,
                    "vla_equal": len({tuple(v) for v in vla_samples.values()}) <= 1},  # fmt: skip
        "cka": {k: v for k, v in (cka or {}).items() if k != "models"} or None,
        "cost": _cost(run, names),
        "config": config.to_dict(),
    }
