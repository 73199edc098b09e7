"""``midtrain recipes``: staged recipes from a VLM to policies for a held-out target split, each
evaluated in closed loop, with representation drift and one table (``docs/recipes.md``).

Top to bottom (:func:`run_recipes`), every piece an ordinary resumable stage of the run directory:

1. **the world** (:class:`~midtrain.experiments.recipes.config.WorldSettings`): the source split (Stages 1-2)
   and the target split (Stage 3, evaluation) - two LeRobot datasets, given or recorded by
   ``sim collect`` into ``worlds/source/`` and ``worlds/target/`` from disjoint task lists;
2. **the VLM** (``model``, or the causal demo VLM built into ``vlm/model``);
3. **ETC** of both splits: ``midtrain etc`` into ``etc_source/`` and ``etc_target/``, so recipes
   reference ``etc_source:<domains>`` (Stages 1-2) and ``etc_target:<domains>`` (Stage 3);
4. **the recipes** (:mod:`midtrain.experiments.recipes.config`): every step a ``midtrain sft`` / ``vla``
   stage named by the recipe; a step several recipes name alike runs once (a step name must
   always mean the same config: checked before anything runs), steps with ``{seed}`` in the name
   once per seed;
5. **evaluation** of each recipe's last step per seed on the target tasks
   (``evals/<step>/eval/``, ``midtrain eval``'s protocol: the same episodes for every recipe);
6. **drift**: linear CKA per layer between a reference and other backbones (``cka_<name>/``,
   :func:`midtrain.experiments.study.drift.measure_drift`, the study's);
7. **the table** (``recipes/``): ``results.json`` (per recipe: success per seed and task, the mean
   with its interval, the paired differences of ``compare``; drift; stage timings) and
   ``results.md``. Intervals are :mod:`midtrain.experiments.study.stats`': a two-way bootstrap over seeds and
   episodes, paired across recipes.

Steps 4 and 5 run in **waves** of independent stages on the executor ``backend`` names
(:mod:`midtrain.experiments.executors`): every stage whose earlier steps are complete at once
(every recipe's first step and every seed's, then the next, ...), then every evaluation at once.
With ``backend: ray`` they are Ray tasks; a stage whose worker died is left out with the stages
after it, and the run ends with one line naming them (a rerun computes only those).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import ConfigError, load_yaml
from ...runs import RunDir, StageError, stage_run, write_json_atomic, write_text_atomic
from ..executors import make_executor
from ..runner import StageCall, StageRunner, deep_merge, episode_successes, peak_rss_mb, stage_config
from .config import STEP_STAGES, RecipesConfig

STAGE = "recipes"
RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLACEHOLDER = re.compile(r"\{(run|base|source|target|seed)\}")
STEP_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*(\{seed\}[a-z0-9_.-]*)?$")


# --------------------------------------------------------------------------- recipes


@dataclass
class Step:
    name: str  # may hold {seed}
    stage: str
    config: dict[str, Any]

    @property
    def per_seed(self) -> bool:
        return "{seed}" in self.name


@dataclass
class Recipe:
    name: str
    description: str
    steps: list[Step]
    source: str = ""  # the file it came from


def load_recipe(spec: Path | dict, where: str) -> Recipe:
    """A recipe from a YAML file or a mapping (``name``, ``description``, ``steps``); checked."""
    data = load_yaml(Path(spec)) if not isinstance(spec, dict) else dict(spec)
    src = str(spec) if not isinstance(spec, dict) else ""
    where = f"{where} ({src})" if src else where
    unknown = sorted(set(data) - {"name", "description", "steps"})
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; a recipe has name, description, steps")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
        raise ConfigError(f"{where}.name: a lower-case name (letters, digits, _ and -), got {name!r}")
    steps = data.get("steps")
    if not isinstance(steps, list) or not steps:
        raise ConfigError(f"{where}.steps: a non-empty list of {{name, stage, config}}")
    out = []
    for i, s in enumerate(steps):
        key = f"{where}.steps[{i}]"
        if not isinstance(s, dict) or set(s) - {"name", "stage", "config"} or s.get("stage") not in STEP_STAGES:
            raise ConfigError(f"{key}: expected {{name, stage: {' | '.join(STEP_STAGES)}, config: {{...}}}}, got {s!r}")
        if not isinstance(s.get("name"), str) or not STEP_NAME.match(s["name"]):
            raise ConfigError(f"{key}.name: a stage folder name (lower-case, digits, _ . -; {{seed}} for per-seed steps), got {s.get('name')!r}")
        if not isinstance(s.get("config") or {}, dict):
            raise ConfigError(f"{key}.config: a mapping of midtrain {s['stage']} keys")
        out.append(Step(s["name"], s["stage"], dict(s.get("config") or {})))
    return Recipe(name, str(data.get("description") or "").strip(), out, src)


def fill(value: Any, variables: dict[str, Any]) -> Any:
    """Replace ``{run}``, ``{base}``, ``{source}``, ``{target}``, ``{seed}`` in strings (nested); a
    string that is exactly one placeholder takes the variable's value (so ``"{seed}"`` is a number)."""
    if isinstance(value, dict):
        return {k: fill(v, variables) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, variables) for v in value]
    if not isinstance(value, str):
        return value
    whole = PLACEHOLDER.fullmatch(value)
    if whole:
        return variables[whole.group(1)]
    return PLACEHOLDER.sub(lambda m: str(variables[m.group(1)]), value)


@dataclass
class Planned:
    """One stage to run: its folder, kind, resolved config mapping, and the recipes that use it."""

    name: str
    stage: str
    mapping: dict[str, Any]
    used_by: list[str] = field(default_factory=list)
    after: set[str] = field(default_factory=set)  # the earlier steps of its recipes (its inputs)


@dataclass
class Plan:
    stages: dict[str, Planned]  # in running order
    finals: dict[str, dict[int, str]]  # recipe -> seed -> its last step's stage folder


def plan_recipes(config: RecipesConfig, recipes: list[Recipe], variables: dict[str, Any]) -> Plan:
    """Every stage of every recipe and seed, resolved and checked (configs build; one config per
    stage folder), before anything runs."""
    names = [r.name for r in recipes]
    if len(set(names)) != len(names):
        raise ConfigError(f"recipes: names repeat: {sorted({n for n in names if names.count(n) > 1})}")
    for i, pair in enumerate(config.compare):
        bad = [n for n in pair if n not in names]
        if bad:
            raise ConfigError(f"compare[{i}]: {bad[0]!r} is not a recipe; recipes: {', '.join(names)}")
    stages: dict[str, Planned] = {}
    finals: dict[str, dict[int, str]] = {}
    common = {"seed": config.seed, "on_error": config.on_error}
    for recipe in recipes:
        finals[recipe.name] = {}
        for seed in config.seeds:
            vars_ = {**variables, "seed": seed}
            earlier: set[str] = set()
            for i, step in enumerate(recipe.steps):
                name = step.name.replace("{seed}", str(seed))
                key = f"{recipe.name}.steps[{i}] ({name})"
                mapping = fill(deep_merge(deep_merge(common, config.defaults.get(step.stage, {})), step.config), vars_)
                mapping["name"] = name
                stage_config(step.stage, mapping, key=key)  # builds, or fails naming the step
                have = stages.get(name)
                if have is None:
                    stages[name] = Planned(name, step.stage, mapping, [recipe.name])
                elif have.mapping != mapping or have.stage != step.stage:
                    raise ConfigError(f"{key}: the stage folder {name!r} is also a step of {have.used_by[0]} with another "
                                      "config; a shared step must be the same everywhere (rename one)")  # fmt: skip
                elif recipe.name not in have.used_by:
                    have.used_by.append(recipe.name)
                stages[name].after |= earlier
                earlier = earlier | {name}
            finals[recipe.name][seed] = recipe.steps[-1].name.replace("{seed}", str(seed))
    for recipe in recipes:
        last = recipe.steps[-1]
        if last.stage != "vla":
            raise ConfigError(f"{recipe.name}: the last step is evaluated in closed loop, so it must be a vla step")
        if not last.per_seed and len(config.seeds) > 1:
            raise ConfigError(f"{recipe.name}: the last step ({last.name}) must be per seed ({{seed}} in its name)")
    return Plan(stages, finals)


def waves(plan: Plan) -> list[list[Planned]]:
    """The stages in waves: a stage runs in the wave after the last of its earlier steps."""
    level: dict[str, int] = {}
    for name, stage in plan.stages.items():  # running order: earlier steps come first
        level[name] = 1 + max((level[d] for d in stage.after), default=-1)
    out: list[list[Planned]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for name, stage in plan.stages.items():
        out[level[name]].append(stage)
    return out


# --------------------------------------------------------------------------- the run


def _world(config: RecipesConfig, run: RunDir, runner: StageRunner) -> tuple[Path, Path]:
    w = config.world
    out = []
    for split in ("source", "target"):
        given = getattr(w, split)
        if given is not None:
            out.append(Path(given).expanduser().resolve())
            continue
        sub = RunDir(run.root / "worlds" / split)
        mapping = {**w.collect, "seed": config.seed, "tasks": getattr(w, f"{split}_tasks"),
                   "episodes_per_task": getattr(w, f"{split}_episodes")}  # fmt: skip
        folder = runner.run("sim collect", mapping, run_dir=sub, label=f"worlds/{split}", key=f"world.{split}")
        out.append((Path(folder) / "lerobot").resolve())
    return out[0], out[1]


def _base_model(config: RecipesConfig, run: RunDir, runner: StageRunner) -> str:
    if config.model:
        return config.model
    folder = run.root / "vlm" / "model"
    if not (folder / "config.json").is_file():
        try:
            from ...models.demo_vlm import build_demo_vlm
        except ImportError as exc:  # pragma: no cover - the demo extra
            raise StageError(f"model: empty, and the causal demo VLM cannot be built ({exc}); give model=<a VLM>") from None
        runner.timed("vlm", lambda: build_demo_vlm(folder, seed=config.seed, language_model="smollm2", text_layers=config.text_layers))
    return str(folder)


def run_recipes(config: RecipesConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run ``midtrain recipes`` (module docstring) into ``run_dir``; returns ``<run>/recipes``."""
    recipes = [load_recipe(r, f"recipes[{i}]") for i, r in enumerate(config.recipes)]
    executor = make_executor(config.backend, config.ray, config.num_threads)  # ray: the cluster answers, or one line
    try:
        return _run(config, recipes, run_dir, StageRunner(run_dir, name="recipes", executor=executor), force)
    finally:
        executor.close()


def _run(config: RecipesConfig, recipes: list[Recipe], run_dir: RunDir, runner: StageRunner, force: bool) -> Path:
    from ...devices import torch_threads

    with torch_threads(config.num_threads), stage_run(run_dir, STAGE, config, force=force) as st:
        if st.skipped_as_complete:
            return st.final_dir
        # a cheap check of every recipe before the world is recorded: placeholders stand in for paths
        checked = plan_recipes(config, recipes, {"run": str(run_dir.root.resolve()), "base": "<base>",
                                                 "source": "<source>", "target": "<target>"})  # fmt: skip
        runner.check([stage_config(s.stage, s.mapping).device for s in checked.stages.values()])
        source, target = _world(config, run_dir, runner)
        base = _base_model(config, run_dir, runner)
        variables = {"run": str(run_dir.root.resolve()), "base": base, "source": str(source), "target": str(target)}
        plan = plan_recipes(config, recipes, variables)
        for split, dataset in (("source", source), ("target", target)):
            mapping = {**config.etc, "seed": config.seed, "name": f"etc_{split}", "dataset": str(dataset)}
            runner.run("etc", mapping, key=f"etc ({split})")
        missing: dict[str, str] = {}
        for wave in waves(plan):
            ready = [s for s in wave if not s.after & set(missing)]
            missing.update({s.name: f"not run: {sorted(s.after & set(missing))[0]} did not finish" for s in wave if s not in ready})
            runner.run_wave([StageCall(s.stage, s.mapping, key=f"{s.used_by[0]}: {s.name}") for s in ready])
            missing.update({f["stage"]: f["reason"] for f in runner.failures})

        # -- closed loop on the target split ---------------------------------------------------
        eval_map = {**config.eval.to_dict(), "seed": config.eval.seed, "corpus": str(target)}
        if not eval_map.get("tasks"):
            if not config.world.target_tasks:
                raise ConfigError("eval.tasks: required when the target split is a given dataset")
            eval_map["tasks"] = list(config.world.target_tasks)
        evals = {final: StageCall("eval", {**eval_map, "policy": str(run_dir.stage_dir(final) / "policy")},
                                  RunDir(run_dir.root / "evals" / final), f"evals/{final}", f"{recipe}: eval {final}")
                 for recipe, per_seed in plan.finals.items() for final in per_seed.values() if final not in missing}  # fmt: skip
        folders = runner.run_wave(list(evals.values()))
        missing.update({f["stage"]: f["reason"] for f in runner.failures})
        if missing:
            raise StageError(f"recipes: {len(missing)} stage(s) did not finish ({'; '.join(f'{k}: {v}' for k, v in missing.items())}); "
                             "rerun to compute only those")  # fmt: skip
        success = {recipe: [episode_successes(folders[f"evals/{final}"] / "episodes.parquet") for final in per_seed.values()]
                   for recipe, per_seed in plan.finals.items()}  # fmt: skip

        # -- drift -------------------------------------------------------------------------------
        drift = {}
        if config.drift:
            from ..study.drift import CKA_FILE, CKAStageConfig, measure_drift

            for d in config.drift:
                cfg = CKAStageConfig(seed=config.seed, base=fill(d.reference, variables),
                                     models={k: fill(v, variables) for k, v in d.models.items()},
                                     robot_data=fill(d.data, variables), frames=d.frames)  # fmt: skip
                folder = runner.call(f"cka_{d.name}", measure_drift, cfg, run_dir, f"cka_{d.name}")
                drift[d.name] = json.loads((Path(folder) / CKA_FILE).read_text())

        # -- the table ---------------------------------------------------------------------------
        results = summarize(config, recipes, plan, success, drift)
        results["seconds"] = runner.seconds
        results["peak_rss_mb"] = peak_rss_mb()["self_mb"]
        write_json_atomic(Path(st.dir) / RESULTS_FILE, results)
        write_text_atomic(Path(st.dir) / TABLE_FILE, results_table(results))
        st.extra.update({"recipes": {r: v["success"] for r, v in results["recipes"].items()}, "stages": len(plan.stages)})
        st.counts.update(recipes=len(recipes), stages=len(plan.stages), seeds=len(config.seeds))
    return st.final_dir


def summarize(config: RecipesConfig, recipes: list[Recipe], plan: Plan, success: dict, drift: dict) -> dict[str, Any]:
    """``results.json``: per recipe its steps, per-seed successes, mean with interval, paired difference."""
    from ..study.stats import INTERVAL_METHOD, paired_interval, success_summary

    out: dict[str, Any] = {"seeds": list(config.seeds), "interval": INTERVAL_METHOD, "recipes": {}, "comparisons": [],
                           "drift": drift}  # fmt: skip
    for recipe in recipes:
        per_seed = success[recipe.name]
        out["recipes"][recipe.name] = {
            "description": recipe.description, "file": recipe.source, "steps": [s.name for s in recipe.steps],
            "finals": plan.finals[recipe.name], "success": success_summary(per_seed, config.seed), "episodes": per_seed,
        }  # fmt: skip
    for a, b in config.compare:
        out["comparisons"].append({"recipe": a, "reference": b, **paired_interval(success[a], success[b], config.seed)})
    return out


def results_table(results: dict[str, Any]) -> str:
    """A Markdown table of ``results.json``: success (mean, 95% interval, per seed, per task), the
    paired differences, then the CKA per layer of each drift comparison."""
    lines = ["| recipe | success | 95% interval | per seed | per task |", "|---|---|---|---|---|"]
    for name, r in results["recipes"].items():
        s = r["success"]
        tasks = ", ".join(f"{t} {v:.2f}" for t, v in s["per_task"].items())
        lines.append(f"| {name} | {s['mean']:.3f} | [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}] | "
                     f"{' '.join(f'{v:.2f}' for v in s['per_seed'])} | {tasks} |")  # fmt: skip
    if results.get("comparisons"):
        lines += ["", "| recipe - reference | difference | 95% interval | share of replicates > 0 |", "|---|---|---|---|"]
        for c in results["comparisons"]:
            lines.append(f"| {c['recipe']} - {c['reference']} | {c['mean']:+.3f} | [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}] "
                         f"| {c['share_of_replicates_above_0']:.2f} |")  # fmt: skip
    for name, d in (results.get("drift") or {}).items():
        lines += ["", f"CKA per layer to `{d['base']}` ({d['frames']} frames; layer 0 = embeddings):", "",
                  "| model | " + " | ".join(str(i) for i in range(d["layers"])) + " |",
                  "|---|" + "---|" * d["layers"]]  # fmt: skip
        for label, m in d["models"].items():
            lines.append(f"| {label} | " + " | ".join(f"{c:.3f}" for c in m["cka"]) + " |")
    lines += ["", f"Intervals: {results['interval']}."]
    return "\n".join(lines) + "\n"


def recipe_files(directory: Path) -> list[Path]:
    """The recipe files of a folder (``configs/recipes/*.yaml`` without the run configs)."""
    return sorted(p for p in Path(directory).glob("*.yaml") if "steps" in (load_yaml(p) or {}))


