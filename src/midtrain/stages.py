"""The stage registry: CLI name -> (module, config class, stage function, one-line help).

Modules are imported only when their stage runs, so ``midtrain --help`` stays fast and
optional dependencies (Ray, simulators) are needed only by the stages that use them.
Names with a space (``sim collect``) are nested subcommands. Every stage function has the signature ``fn(config, run_dir: RunDir, force: bool) -> Path``
and returns its output directory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    config_class: str
    function: str
    help: str
    config_module: str = ""  # where the config class lives, if not in ``module`` (a light import for --help)

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config_class), getattr(mod, self.function)

    def load_config_class(self):
        return getattr(importlib.import_module(self.config_module or self.module), self.config_class)


STAGES: dict[str, StageSpec] = {
    s.name: s
    for s in [
        StageSpec("catalog", "midtrain.data.build", "CatalogConfig", "build_catalog",
                  "read dataset sources (LLaVA JSON, Parquet/HF, LeRobot) into the sample catalog"),
        StageSpec("featurize", "midtrain.featurize.stage", "FeaturizeConfig", "featurize",
                  "pooled last-hidden-state features of every catalog sample from a frozen VLM"),
        StageSpec("gap", "midtrain.gap.stage", "GapConfig", "measure_gap",
                  "pairwise MMD with permutation p-values and a t-SNE map of the datasets"),
        StageSpec("fit", "midtrain.select.fit", "FitConfig", "fit_estimator",
                  "train the proximity estimator (VLA positive, VLM negative) on frozen features"),
        StageSpec("score", "midtrain.select.score", "ScoreConfig", "score_pool",
                  "score every VLM pool sample (proximity estimator or a baseline scorer)"),
        StageSpec("select", "midtrain.select.selection", "SelectConfig", "select_mixture",
                  "choose the top-K (or sampled) mixture from the scores, with a selection report"),
        StageSpec("export", "midtrain.select.export", "ExportConfig", "export_mixture",
                  "write the selected mixture as LLaVA/ShareGPT JSON (LLaMA-Factory) and Parquet"),
        StageSpec("vla", "midtrain.vla.stage", "VLAConfig", "train_vla",
                  "train a VLA policy (VLM backbone + mlp / flow / tokens action head) on robot data",
                  config_module="midtrain.vla.config"),
        StageSpec("report", "midtrain.report.stage", "ReportConfig", "write_report",
                  "one self-contained HTML report of every stage's figures, tables and counts"),
        StageSpec("sim collect", "midtrain.sim.collect", "SimCollectConfig", "collect_robot_corpus",
                  "record scripted-expert Meta-World episodes as a LeRobot v3.0 robot corpus"),
        StageSpec("sim pool", "midtrain.sim.pool", "SimPoolConfig", "generate_vlm_pool",
                  "generate a VLM pool of known character (spatial, captions, book covers, charts, counting)"),
        StageSpec("demo", "midtrain.demo", "DemoConfig", "run_demo",
                  "the whole engine end to end on the embedded Meta-World world, into one run directory"),
    ]
}  # fmt: skip
