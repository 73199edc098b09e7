"""The stage registry: CLI name -> (modules, config class, stage function, one-line help), in
pipeline order.

A stage is one package ``midtrain/<stage>/`` with ``config.py`` (its config dataclass, light
imports only, so ``midtrain <stage> --help`` is fast) and ``stage.py`` (the stage function); adding
a stage is that folder plus one line here. Modules are imported only when their stage runs, so
``midtrain --help`` stays fast and optional dependencies (Ray, simulators) are needed only by the
stages that use them. Names with a space (``sim collect``) are nested subcommands; their run
directory folder is the name with ``_`` (``sim_collect``). Every stage function has the signature
``fn(config, run_dir: RunDir, force: bool) -> Path`` and returns its output directory.

:data:`PIPELINE` is the order the stages run in (the registry order of the pipeline steps); the
demo, the report and the CLI read it from here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str  # where the stage function lives (imported only when the stage runs)
    config_class: str
    function: str
    help: str
    config_module: str = ""  # where the config class lives, if not in ``module`` (a light import for --help)
    pipeline: bool = True  # a step of the pipeline (False: ``demo``, which runs the pipeline)

    @property
    def dir_name(self) -> str:
        """The stage's folder in a run directory."""
        return self.name.replace(" ", "_")

    def load(self):
        mod = importlib.import_module(self.module)
        return self.load_config_class(), getattr(mod, self.function)

    def load_config_class(self):
        return getattr(importlib.import_module(self.config_module or self.module), self.config_class)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("sim collect", "midtrain.sim.collect", "SimCollectConfig", "collect_robot_corpus",
                  "record scripted-expert Meta-World episodes as a LeRobot v3.0 robot corpus"),
        StageSpec("sim pool", "midtrain.sim.pool", "SimPoolConfig", "generate_vlm_pool",
                  "generate a VLM pool of known character (spatial, captions, book covers, charts, counting)"),
        StageSpec("align", "midtrain.align.stage", "AlignConfig", "run_align",
                  "align a VLM assembled from a pretrained vision tower and causal LM (LLaVA's two stages)",
                  "midtrain.align.config", pipeline=False),
        StageSpec("catalog", "midtrain.catalog.stage", "CatalogConfig", "build_catalog",
                  "read dataset sources (LLaVA JSON, Parquet/HF, LeRobot) into the sample catalog",
                  "midtrain.catalog.config"),
        StageSpec("featurize", "midtrain.featurize.stage", "FeaturizeConfig", "featurize",
                  "pooled last-hidden-state features of every catalog sample from a frozen VLM",
                  "midtrain.featurize.config"),
        StageSpec("gap", "midtrain.gap.stage", "GapConfig", "measure_gap",
                  "pairwise MMD with permutation p-values and a t-SNE map of the datasets", "midtrain.gap.config"),
        StageSpec("fit", "midtrain.fit.stage", "FitConfig", "fit_estimator",
                  "train the proximity estimator (VLA positive, VLM negative) on frozen features", "midtrain.fit.config"),
        StageSpec("score", "midtrain.score.stage", "ScoreConfig", "score_pool",
                  "score every VLM pool sample (proximity estimator or a baseline scorer)", "midtrain.score.config"),
        StageSpec("select", "midtrain.select.stage", "SelectConfig", "select_mixture",
                  "choose the top-K (or sampled) mixture from the scores, with a selection report",
                  "midtrain.select.config"),
        StageSpec("export", "midtrain.export.stage", "ExportConfig", "export_mixture",
                  "write the selected mixture as LLaVA/ShareGPT JSON (LLaMA-Factory) and Parquet",
                  "midtrain.export.config"),
        StageSpec("sft", "midtrain.sft.stage", "SFTConfig", "run_sft",
                  "supervised fine-tuning (mid-training) of a VLM on the mixture: full or LoRA, resumable, multi-GPU",
                  "midtrain.sft.config"),
        StageSpec("vla", "midtrain.vla.stage", "VLAConfig", "train_vla",
                  "train a VLA policy (VLM backbone + mlp / flow / tokens action head) on robot data", "midtrain.vla.config"),
        StageSpec("report", "midtrain.report.stage", "ReportConfig", "write_report",
                  "one self-contained HTML report of every stage's figures, tables and counts", "midtrain.report.config"),
        StageSpec("etc", "midtrain.etc.stage", "EtcConfig", "generate_etc",
                  "trajectory-coupled VQA (ETC) from a LeRobot dataset, as LLaVA JSON per capability domain",
                  "midtrain.etc.config", pipeline=False),
        StageSpec("recipes", "midtrain.experiments.recipes.stage", "RecipesConfig", "run_recipes",
                  "staged recipes (ETC pathway, Rethinking route, ablations) to policies for a held-out target split",
                  "midtrain.experiments.recipes.config", pipeline=False),
        StageSpec("eval", "midtrain.eval.stage", "EvalConfig", "run_eval",
                  "run a policy checkpoint in closed loop (Meta-World, LIBERO): success rates with Wilson intervals, videos",
                  config_module="midtrain.eval.config", pipeline=False),
        StageSpec("study", "midtrain.experiments.study.stage", "StudyConfig", "run_study",
                  "compare VLA initialisations (base, mid-trained on selections, scratch, ...) end to end, over seeds",
                  "midtrain.experiments.study.config", pipeline=False),
        StageSpec("demo", "midtrain.experiments.demo", "DemoConfig", "run_demo",
                  "the whole engine end to end on the embedded Meta-World world, into one run directory",
                  pipeline=False),
    ]
}  # fmt: skip

PIPELINE: tuple[str, ...] = tuple(name for name, spec in STAGES.items() if spec.pipeline)
