"""``RecipesConfig``: the config of ``midtrain recipes`` (a light import, for ``--help``).

A recipe is a named list of stage steps (``midtrain sft`` / ``vla`` / ``etc`` configs) that turns a
VLM into a policy for a *target* split: etc-two-bridges' ETC pathway (Distribution Bridging ->
Objective Bridging -> Retentive Adaptation), Rethinking-VLA-Initialization's staged route, and
their ablations (``configs/recipes/*.yaml``, documented in ``docs/recipes.md``). A recipe file::

    name: etc_pathway
    description: one paragraph
    steps:
      - name: sft_etc_db              # the stage folder; recipes share a step by naming it alike
        stage: sft
        config: {model: "{base}", etc: "etc_source:all", mode: full, vision: full}
      - name: vla_etc_ob
        stage: vla
        config: {model: "{run}/sft_etc_db/model", data: {lerobot: "{source}"}, cotrain: {etc: "etc_source:all"}}
      - name: "vla_etc_ra_s{seed}"    # {seed} in a name: the step runs once per seed
        stage: vla
        config: {init_policy: "{run}/vla_etc_ob/policy", data: {lerobot: "{target}"}, train: {seed: "{seed}"}}

``{run}`` (the run directory), ``{base}`` (the VLM), ``{source}`` / ``{target}`` (the two LeRobot
datasets) and ``{seed}`` are filled in; a value that is exactly ``"{seed}"`` becomes the number.
The last step is the recipe's policy, evaluated in closed loop on the target tasks. Each step's
config is ``defaults.<stage>`` (the run's budgets) with the step's keys on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ...config import ConfigError, Settings, StageConfig, option
from ...eval.config import EvalSettings
from ..executors import Backend, RaySettings

STEP_STAGES = ("sft", "vla")


@dataclass
class WorldSettings(Settings):
    """The source split (Stages 1-2) and the target split (Retentive Adaptation, evaluation): two
    LeRobot datasets, given, or recorded by ``sim collect`` from disjoint Meta-World task lists."""

    source: Optional[Path] = option(None, "LeRobot dataset of the source split (null: sim collect source_tasks)")
    target: Optional[Path] = option(None, "LeRobot dataset of the target split (null: sim collect target_tasks)")
    source_tasks: list[str] = option(factory=list, help="Meta-World tasks of the source split (when recorded)")
    target_tasks: list[str] = option(factory=list, help="Meta-World tasks held out of Stages 1-2: the target split")
    source_episodes: int = option(6, "episodes recorded per source task")
    target_episodes: int = option(3, "episodes recorded per target task: the few demonstrations of Stage 3")
    collect: dict[str, Any] = option(factory=dict, help="midtrain sim collect keys for both splits (width, max_steps, ...)")

    def validate(self) -> None:
        shared = sorted(set(self.source_tasks) & set(self.target_tasks))
        if shared:
            raise ConfigError(f"world.target_tasks: {shared} are also source tasks; the target split must be held out")
        for key in ("source_episodes", "target_episodes"):
            if getattr(self, key) < 1:
                raise ConfigError(f"world.{key}: must be >= 1, got {getattr(self, key)}")


@dataclass
class DriftSettings(Settings):
    """Representation drift (etc-two-bridges, Section 5): linear CKA per layer between a reference
    VLM and other backbones on the same robot frames (:mod:`midtrain.experiments.study.drift`)."""

    name: str = option("", "label of the comparison (the stage folder is cka_<name>)")
    reference: str = option("", "the reference checkpoint, e.g. {run}/sft_etc_db/model (the Distribution-Bridged VLM)")
    models: dict[str, str] = option(factory=dict, help="label -> checkpoint compared with the reference (a VLA's {run}/<step>/policy/backbone)")
    data: str = option("{source}", "the LeRobot dataset whose frames are represented")
    frames: int = option(32, "frames represented (spread evenly over the dataset)")

    def validate(self) -> None:
        if not self.name or not self.reference or not self.models:
            raise ConfigError("drift: each comparison needs name, reference and models")
        if self.frames < 3:
            raise ConfigError(f"drift.frames: CKA needs at least 3 frames, got {self.frames}")


@dataclass
class RecipesConfig(StageConfig):
    """Config of ``midtrain recipes``: staged recipes (and their ablations) from one VLM to policies for
    a target split, each evaluated in closed loop over ``seeds``; representation drift; one table."""

    world: WorldSettings = option(factory=WorldSettings, help="the source and target splits")
    model: str = option("", "the VLM every recipe starts from ({base}); empty: build the causal demo VLM")
    text_layers: int = option(2, "decoder layers of the causal demo VLM built when model is empty (of 30)")
    etc: dict[str, Any] = option(factory=dict, help="midtrain etc keys for the ETC of both splits (etc_source, etc_target)")
    defaults: dict[str, dict[str, Any]] = option(
        factory=dict, help="per stage kind (sft, vla): keys every step of that kind starts from (the run's budgets)"
    )
    recipes: list[Union[Path, dict[str, Any]]] = option(
        factory=list, help="recipe files (e.g. configs/recipes/etc_pathway.yaml, from the repository root) or inline recipes"
    )
    seeds: list[int] = option(factory=lambda: [0], help="seeds of the per-seed steps (those with {seed} in their name)")
    eval: EvalSettings = option(factory=EvalSettings, help="closed-loop protocol on the target split (tasks default to its tasks)")
    drift: list[DriftSettings] = option(factory=list, help="CKA comparisons (etc-two-bridges Figure 3a)")
    compare: list[tuple[str, str]] = option(
        factory=list, help="[recipe, reference] pairs reported as paired differences of success (same seeds and episodes)"
    )
    num_threads: Optional[int] = option(1, "intra-op threads of training and feature passes (null: torch's default)", throughput=True)
    backend: Backend = option("local", "where stages run: local (here, one at a time) or ray (independent ones at once, "
                              "as Ray tasks; see ray)", throughput=True)  # fmt: skip
    ray: RaySettings = option(factory=RaySettings, help="backend: ray - the cluster and each stage's CPUs and GPUs",
                              throughput=True)  # fmt: skip

    def validate(self) -> None:
        for split in ("source", "target"):
            if getattr(self.world, split) is None and not getattr(self.world, f"{split}_tasks"):
                raise ConfigError(f"world.{split}: give a LeRobot dataset or world.{split}_tasks to record")
        if not self.recipes:
            raise ConfigError("recipes: at least one recipe (a file from configs/recipes/ or an inline mapping)")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: distinct seeds, at least one; got {self.seeds}")
        if not 1 <= self.text_layers <= 30:
            raise ConfigError(f"text_layers: the causal demo VLM has 30 decoder layers; got {self.text_layers}")
        unknown = sorted(set(self.defaults) - set(STEP_STAGES))
        if unknown:
            raise ConfigError(f"defaults.{unknown[0]}: steps are {' or '.join(STEP_STAGES)} stages")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: must be >= 1, got {self.num_threads}")
