"""``midtrain study``: does mid-training on the selected data make a better VLA? The seed's
experiment end to end, in one run directory.

Top to bottom (:func:`run_study`), every step an ordinary resumable stage (folders in
:mod:`midtrain.experiments.study.plan`), so a killed study rerun continues where it stopped:

1. **the world**: with ``world: embedded``, ``midtrain demo``'s data engine (sim collect, sim pool,
   catalog, featurize, gap, fit, score, select, export) on the ``demo`` settings; with
   ``world: run_dir``, the catalog, features and estimator already in the run directory;
2. **the VLMs**: the study VLM (``vlm.model``, or built into ``vlm/``) and, for rows with
   ``init: random_weights``, the same architecture with random weights (``vlm_random/``);
3. **each row's steps**: mid-training (``sft_<row>``) on the data its ``data:`` reference names
   (selections are made on first use: ``selections/<scorer>/``), or VLA steps;
4. **the common VLA recipe** on every row's result, for every seed (``vla_<row>_s<seed>``), with
   closed-loop success after the last step (and every ``curve_every`` steps: the curves);
5. **the frozen-backbone probe** of every row's VLM (``probe_<row>_s<seed>``);
6. **CKA drift** of every row from the base VLM (``cka/``);
7. **the study** (``study/``): ``study.json`` with every number and its seed, ``study.html`` (the
   table and figures, :func:`midtrain.experiments.study.html.study_section_html`) and the figures as PNGs;
8. **the run report** (``report/``, unless ``report: false``), the study's section in it.

With ``sequential.rounds > 1``, step 4 continues in rounds of new closed-loop episodes
(``rounds/``, :mod:`midtrain.experiments.study.rounds`) until the named comparisons are decided.

Independent sub-stages run as **waves** on the executor ``backend`` names
(:mod:`midtrain.experiments.executors`): step ``i`` of every row at once, then every row x seed
VLA training (with its closed loop) and every probe at once. With ``backend: local`` a wave runs
in order in this process; with ``backend: ray`` as Ray tasks on a cluster (the run directory on a
filesystem every node sees), the driver only scheduling and collecting. A sub-stage whose Ray
worker died is recorded under ``missing`` in ``study.json`` with the reason; the study goes on
with the other rows, and a rerun computes only what is missing.

``--force`` recomputes the ``study/`` folder only (the aggregate); a sub-stage is redone by
deleting its folder or running it with ``--force``.
"""

from __future__ import annotations

from dataclasses import replace
import time
from pathlib import Path
from typing import Any, Optional

from ...runs import RunDir, StageError, stage_run, write_json_atomic, write_text_atomic
from ..executors import make_executor
from ..runner import StageCall, StageRunner, deep_merge, peak_rss_mb
from .calibration import CALIBRATION_FILE, CALIBRATION_STAGE, calibration_config, calibration_record
from .config import (PLACEHOLDER_DATA, PLACEHOLDER_MODEL, StudyConfig, references_kind, referenced_scorers, row_stages,
                     sft_config, vla_config, with_robot_data)  # fmt: skip
from .plan import (CKA_STAGE, PERPLEXITY_SCORERS, RANDOM_VLM_STAGE, SELECTIONS_DIR, STUDY_STAGE, VLA_TEXT_STAGE,
                   VLM_STAGE, RowStages, eval_settings, resolve_sft_data, resolve_vla_data)  # fmt: skip

STUDY_FILE = "study.json"
PAGE = "study.html"
TIMING_KEYS = ("cost", "config", "wall_s", "train_seconds")  # how long and how it ran (the config names the backend)


def study_findings(value: Any) -> Any:
    """``study.json`` without its timing and cost fields: what two runs of one study must agree on
    whichever backend ran them."""
    if isinstance(value, dict):
        return {k: study_findings(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [study_findings(v) for v in value]
    return value


class StudyContext:
    """The running study: its config, run directory and the artefacts steps ask for (made on first use)."""

    def __init__(self, config: StudyConfig, run: RunDir, executor: Any = None):
        self.config, self.run = config, run
        self.robot_data = Path(config.robot_data) if config.robot_data else run.stage_dir("sim_collect") / "lerobot"
        recipe = vla_config(with_robot_data({**config.vla, "model": PLACEHOLDER_MODEL}, PLACEHOLDER_DATA), {}, "vla")
        self.chunk_size = recipe.policy.chunk_size
        self.frame_stride = recipe.data.frame_stride
        self.base_vlm = ""
        self.random_vlm = ""
        self.runner = StageRunner(run, name="study", executor=executor)  # runs and times every sub-stage
        self._selections: dict[str, tuple[Path, Path]] = {}
        self._vla_text: Optional[str] = None

    def run_stage(self, stage: str, mapping: dict[str, Any], key: str, run_dir: Optional[RunDir] = None,
                  label: Optional[str] = None) -> Path:  # fmt: skip
        """Run the registered ``stage`` with ``mapping`` (a complete stage with the same config and
        inputs is skipped, as always); errors name ``key``."""
        return self.runner.run(stage, mapping, run_dir=run_dir, label=label or mapping.get("name") or key, key=key)

    @property
    def common(self) -> dict[str, Any]:
        return {"seed": self.config.seed, "on_error": self.config.on_error}

    # -- artefacts data references ask for ---------------------------------------------------
    def selection(self, scorer: str) -> tuple[Path, Path]:
        """``(mixture.parquet, selection_metrics.json)`` of ``scorer``'s top-k selection, made in the
        nested run directory ``selections/<scorer>/`` (which shares this run's catalog)."""
        if scorer in self._selections:
            return self._selections[scorer]
        cfg = self.config
        sub = RunDir(self.run.root / SELECTIONS_DIR / scorer)
        catalog = self.run.require("catalog").resolve()
        link = sub.root / "catalog"
        if not link.exists():
            link.symlink_to(catalog, target_is_directory=True)
        elif link.resolve() != catalog:
            raise StageError(f"{link}: points to {link.resolve()}, not this run's catalog {catalog}; remove it and rerun")
        features = str(self.run.require("featurize"))
        score: dict[str, Any] = {**self.common, "scorer": scorer}
        if scorer in PERPLEXITY_SCORERS:
            score["vla_model"] = self.vla_text_model()
            if scorer == "delta_perplexity":
                score["base_model"] = self.base_vlm
        else:
            score["features"] = features
        if scorer == "proximity":
            score["estimator"] = str(self.run.require("fit") / "estimator")
        key = f"selection:{scorer}"
        self.run_stage("score", deep_merge(score, cfg.scorers.get(scorer, {})), f"{key} score", sub, f"{SELECTIONS_DIR}/{scorer}/score")
        from ...score.stage import SCORES_FILE

        select = deep_merge(cfg.select, {**self.common, "k": cfg.k, "fraction": None, "features": features,
                                         "scores": str(sub.stage_dir("score") / SCORES_FILE)})  # fmt: skip
        self.run_stage("select", select, f"{key} select", sub, f"{SELECTIONS_DIR}/{scorer}/select")
        export = {**self.common, "image_mode": "reference", "parquet": True, "dataset_name": f"selection_{scorer}",
                  "selection": str(sub.stage_dir("select") / "selection.parquet")}  # fmt: skip
        out = self.run_stage("export", export, f"{key} export", sub, f"{SELECTIONS_DIR}/{scorer}/export")
        self._selections[scorer] = (Path(out) / "mixture.parquet", sub.stage_dir("select") / "selection_metrics.json")
        return self._selections[scorer]

    def vla_text_model(self) -> str:
        """The study VLM mid-trained on the robot data as text (the perplexity scorers' VLA model)."""
        if self._vla_text is None:
            from .plan import Ref, SFT_DATA

            data = SFT_DATA["robot_text"](self, Ref("robot_text")).keys
            mapping = deep_merge(deep_merge(self.config.midtrain, data),
                                 {**self.common, "name": VLA_TEXT_STAGE, "model": self.base_vlm})  # fmt: skip
            out = self.run_stage("sft", mapping, VLA_TEXT_STAGE)
            self._vla_text = str(Path(out) / "model")
        return self._vla_text

    def etc_llava_dir(self) -> Path:
        """``<run>/etc/llava``: the ETC VQA of the robot data (``midtrain etc``, run on first use)."""
        mapping = deep_merge({**self.common, "dataset": str(self.robot_data)}, self.config.etc)
        out = self.run_stage("etc", mapping, "etc", label="etc")
        return Path(out) / "llava"


# --------------------------------------------------------------------------- the steps


def _world(ctx: StudyContext) -> None:
    cfg = ctx.config
    if cfg.world == "embedded":
        from ..demo import run_demo

        world = replace(cfg.demo, seed=cfg.seed)  # the study's seed reseeds the world
        ctx.runner.call("demo", run_demo, world, ctx.run)
    else:
        for stage in ("catalog", "featurize"):
            ctx.run.require(stage)
    if not (ctx.robot_data / "meta" / "info.json").is_file():
        raise StageError(f"robot_data: {ctx.robot_data} is not a LeRobot dataset (meta/info.json is missing)")


def _vlms(ctx: StudyContext) -> None:
    from .models import BuildVLMConfig, build_vlm_stage

    cfg = ctx.config
    if cfg.vlm.model:
        ctx.base_vlm = cfg.vlm.model
    else:
        build = BuildVLMConfig(seed=cfg.seed, build=cfg.vlm.build, text_layers=cfg.vlm.text_layers,
                               tiny_arch=cfg.vlm.tiny_arch, tiny_size=cfg.vlm.tiny_size)  # fmt: skip
        ctx.base_vlm = str(ctx.runner.call(VLM_STAGE, build_vlm_stage, build, ctx.run, VLM_STAGE))
    if any(r.init == "random_weights" for r in cfg.rows):
        rnd = BuildVLMConfig(seed=cfg.seed, build="random_weights", source=str(ctx.base_vlm))
        ctx.random_vlm = str(ctx.runner.call(RANDOM_VLM_STAGE, build_vlm_stage, rnd, ctx.run, RANDOM_VLM_STAGE))


def vla_mapping(ctx: StudyContext, recipe: dict[str, Any], name: str, seed: int, vlm: str, policy: Optional[str],
                closed_loop: bool) -> dict[str, Any]:  # fmt: skip
    """A ``midtrain vla`` config: the recipe, the robot data unless the recipe names its own, the
    model (or the policy to continue), the seed (stage and training), the closed-loop protocol."""
    out = deep_merge(recipe, {"name": name, "seed": seed, "on_error": ctx.config.on_error, "train": {"seed": seed}})
    out = with_robot_data(out, ctx.robot_data)
    if policy:
        out["init_policy"] = policy
        out.pop("model", None)
        out.pop("policy", None)  # a continued policy keeps its head and chunking
    else:
        out["model"] = vlm
    if closed_loop and ctx.config.closed_loop:
        steps = vla_config({**out, "model": PLACEHOLDER_MODEL, "init_policy": None}, {}, name).train.steps
        out["closed_loop_every"] = ctx.config.curve_every or steps
        out["closed_loop"] = eval_settings(ctx)
    else:
        out["closed_loop_every"] = 0
    return out


Models = dict[str, tuple[str, Optional[str]]]  # row -> (its VLM, its policy if its last step was a vla step)


def _step_call(ctx: StudyContext, row, i: int, step, vlm: str, policy: Optional[str]) -> StageCall:
    """Step ``i`` of ``row`` (an sft or vla stage) starting from ``vlm`` / ``policy``."""
    cfg = ctx.config
    key = f"rows.{row.name}.steps[{i}].{step.kind}"
    over = dict(step.overrides)
    data = over.pop("data", None)
    if step.kind == "sft":
        keys = resolve_sft_data(ctx, data, f"{key}.data").keys if data is not None else {}
        mapping = deep_merge(deep_merge(cfg.midtrain, over), keys)
        mapping.update(ctx.common, name=step.name, model=vlm)
    else:
        recipe = deep_merge(deep_merge(cfg.vla, over), resolve_vla_data(ctx, data, f"{key}.data") if data else {})
        mapping = vla_mapping(ctx, recipe, step.name, cfg.seed, vlm, policy, closed_loop=False)
    return StageCall(step.kind, mapping, label=step.name, key=key)


def _run_rows(ctx: StudyContext, plans: list[RowStages]) -> Models:
    """Every row's steps, in waves: the first step of every row at once, then the second, ...
    A row whose step did not finish (its Ray worker died) stops there and is left out of ``models``."""
    cfg = ctx.config
    models: Models = {row.name: (ctx.random_vlm if row.init == "random_weights" else ctx.base_vlm, None) for row in cfg.rows}
    for i in range(max(len(rs.steps) for rs in plans)):
        steps = {row.name: rs.steps[i] for row, rs in zip(cfg.rows, plans) if i < len(rs.steps) and row.name in models}
        calls = [_step_call(ctx, row, i, steps[row.name], *models[row.name]) for row in cfg.rows if row.name in steps]
        done = ctx.runner.run_wave(calls)
        for row_name, step in steps.items():
            stage = done[step.name]
            if stage is None:
                del models[row_name]
            elif step.kind == "sft":
                models[row_name] = (str(Path(stage) / "model"), None)
            else:
                models[row_name] = (str(Path(stage) / "policy" / "backbone"), str(Path(stage) / "policy"))
    return models


def _final_calls(ctx: StudyContext, plans: list[RowStages], models: Models) -> list[StageCall]:
    """The common VLA recipe on every row, seed by seed (all rows of the first seed first, so a
    local study stopped early still compares every row), each with its closed loop."""
    cfg = ctx.config
    out = []
    for seed in cfg.seeds:
        for row, rs in zip(cfg.rows, plans):
            if row.name in models:
                vlm, policy = models[row.name]
                mapping = vla_mapping(ctx, deep_merge(cfg.vla, row.vla), rs.finals[seed], seed, vlm, policy, closed_loop=True)
                out.append(StageCall("vla", mapping, key=rs.finals[seed]))
    return out


def _probe_calls(ctx: StudyContext, plans: list[RowStages], models: Models) -> list[StageCall]:
    cfg = ctx.config
    recipe = deep_merge(deep_merge(cfg.vla, cfg.probe.vla), {"backbone": {"trainable": "frozen", "vision": "frozen"}})
    out = []
    for row, rs in zip(cfg.rows, plans):
        if row.name in models:
            for seed, name in rs.probes.items():
                out.append(StageCall("vla", vla_mapping(ctx, recipe, name, seed, models[row.name][0], None, False), key=name))
    return out


def _run_cka(ctx: StudyContext, plans: list[RowStages], models: Models) -> Optional[Path]:
    from .drift import CKAStageConfig, measure_drift

    cfg = ctx.config
    if not cfg.cka.enabled:
        return None
    targets: dict[str, str] = {}
    for row, rs in zip(cfg.rows, plans):
        if row.name not in models:
            continue
        vlm, _ = models[row.name]
        if vlm != ctx.base_vlm:
            targets[row.name] = vlm
        for seed in cfg.seeds[: cfg.cka.vla_seeds]:
            if (ctx.run.manifest(rs.finals[seed]) or {}).get("status") == "complete":
                targets[f"{row.name}/vla_s{seed}"] = str(ctx.run.stage_dir(rs.finals[seed]) / "policy" / "backbone")
    drift = CKAStageConfig(seed=cfg.seed, base=str(ctx.base_vlm), models=targets, frames=cfg.cka.frames,
                           robot_data=str(ctx.robot_data), batch_size=cfg.cka.batch_size)  # fmt: skip
    return ctx.runner.call(CKA_STAGE, measure_drift, drift, ctx.run)


# --------------------------------------------------------------------------- the study


def run_study(config: StudyConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run the study into ``run_dir`` (see the module docstring); returns ``<run>/study``."""
    from ...devices import torch_threads

    t0 = time.perf_counter()
    if config.calibrate:
        config = calibration_config(config)  # the baseline and the controls only
    plans = [row_stages(r, config.seeds, config.probe.seeds, config.probe.enabled) for r in config.rows]
    executor = make_executor(config.backend, config.ray, config.num_threads)  # ray: the cluster answers, or one line
    try:
        ctx = StudyContext(config, run_dir, executor)
        ctx.runner.check([sft_config({**config.midtrain, "model": PLACEHOLDER_MODEL}, {}, "midtrain").device,
                          vla_config(with_robot_data({**config.vla, "model": PLACEHOLDER_MODEL}, PLACEHOLDER_DATA), {}, "vla").device])  # fmt: skip
        with torch_threads(config.num_threads):
            _world(ctx)
            _vlms(ctx)
            for scorer in referenced_scorers(config):
                ctx.selection(scorer)
            if references_kind(config, "etc"):
                ctx.etc_llava_dir()
            models = _run_rows(ctx, plans)
            ctx.runner.run_wave(_final_calls(ctx, plans, models) + _probe_calls(ctx, plans, models))
            if config.sequential.rounds > 1:
                from .rounds import run_rounds

                run_rounds(ctx, plans, eval_settings(ctx), ctx.runner.run_wave)
            cka_dir = _run_cka(ctx, plans, models)
        return _aggregate(ctx, plans, models, cka_dir, t0, force)
    finally:
        executor.close()


def _aggregate(ctx: StudyContext, plans: list[RowStages], models: Models, cka_dir: Optional[Path], t0: float,
               force: bool) -> Path:  # fmt: skip
    """The ``study/`` stage: ``study.json`` (with what is missing), the page, the figures, then the report."""
    from .results import collect_results
    from .html import study_page_html, write_figures

    config, run_dir = ctx.config, ctx.run
    missing = _missing(ctx, plans)
    stages = [s.name for rs in plans for s in rs.steps] + [n for rs in plans for n in (*rs.finals.values(), *rs.probes.values())]
    inputs = {s: run_dir.stage_dir(s) / "manifest.json" for s in stages if s not in missing}
    if cka_dir is not None:
        inputs[CKA_STAGE] = Path(cka_dir) / "manifest.json"
    inputs.update({f"{SELECTIONS_DIR}/{s}": run_dir.root / SELECTIONS_DIR / s / "select" / "manifest.json"
                   for s in referenced_scorers(config)})  # fmt: skip
    if config.sequential.rounds > 1:
        from .rounds import round_manifests

        inputs.update(round_manifests(run_dir))
    folder = CALIBRATION_STAGE if config.calibrate else STUDY_STAGE  # beside a study/ of the same run, not over it
    with stage_run(run_dir, folder, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return _with_report(ctx, st.final_dir)
        results = collect_results(config, run_dir, plans, {r.name: models.get(r.name, ("", None)) for r in config.rows}, ctx)
        results["missing"] = [{"stage": s, "reason": why} for s, why in missing.items()]
        results["cost"]["this_invocation"] = {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss": peak_rss_mb(),
                                              "stages_s": ctx.runner.seconds}  # fmt: skip
        figures = write_figures(results, Path(st.dir))
        results["figures"] = figures
        write_json_atomic(Path(st.dir) / STUDY_FILE, results)
        if config.calibrate:
            write_json_atomic(Path(st.dir) / CALIBRATION_FILE, calibration_record(results))
        write_text_atomic(Path(st.dir) / PAGE, study_page_html(Path(st.dir), json_path=st.final_dir / STUDY_FILE))
        st.counts.update(rows=len(config.rows), seeds=len(config.seeds))
        st.extra["headline"] = {r: (v.get("success") or {}).get("mean") for r, v in results["rows"].items()}
        for r, v in results["rows"].items():
            s = v.get("success") or {}
            st.log.info("%-16s success %s %s", r, s.get("mean"), s.get("ci95"))
        for w in results["warnings"]:
            st.log.warning("%s", w["message"])
        for m in results["missing"]:
            st.log.warning("missing: %s (%s); rerun the study to compute it", m["stage"], m["reason"])
    return _with_report(ctx, st.final_dir)


def _missing(ctx: StudyContext, plans: list[RowStages]) -> dict[str, str]:
    """``{stage: why}`` of every row sub-stage that is not complete: its Ray worker died (the reason
    the executor recorded), or a step of its row before it did not finish."""
    failed = {f["stage"]: f["reason"] for f in ctx.runner.failures}

    def complete(name: str) -> bool:
        return (ctx.run.manifest(name) or {}).get("status") == "complete"

    out = {}
    for rs in plans:
        steps = [s.name for s in rs.steps]
        broken = next((name for name in steps if not complete(name)), None)
        for name in [*steps, *rs.finals.values(), *rs.probes.values()]:
            if not complete(name):
                out[name] = failed.get(name) or (f"not run: {broken} did not finish" if broken and broken != name else "not run")
    out.update({name: why for name, why in failed.items() if name not in out})  # a sequential round, CKA
    return out


def _with_report(ctx: StudyContext, study_dir: Path) -> Path:
    """The run report (``report/report.html``, the study's section in it) unless ``report: false``."""
    if ctx.config.report:
        mapping = {**ctx.common, "title": "midtrain study: does mid-training make a better VLA?"}
        ctx.run_stage("report", mapping, "report")
    return study_dir
