"""``StudyConfig``: the config of ``midtrain study`` (a light import, for ``--help``).

A study is the seed's experiment in one file: the world (the robot and VLM data), the data
engine's selection size ``k``, the VLM, the mid-training recipe every row shares, the VLA recipe
every row shares, the closed-loop protocol, the seeds, and the **rows** - the initialisations
compared. A row is a named recipe: where its weights start (``init``) and a list of **steps**
applied to the VLM before the common VLA recipe. A step is ``{sft: {...}}`` or ``{vla: {...}}``:
overrides of the common mid-training (``midtrain``) or VLA (``vla``) config, whose ``data:``
names an artefact by reference (see :mod:`midtrain.experiments.study.plan`)::

    rows:
      - {name: base}                                                 # no mid-training
      - {name: learned, steps: [{sft: {data: "selection:proximity"}}]}
      - {name: random,  steps: [{sft: {data: "selection:random"}}]}
      - {name: scratch, init: random_weights}                        # same architecture, random weights
      - name: rethinking_route                                       # staged: domains, then robot text
        steps:
          - {sft: {data: {"etc:grounding": 1, "etc:egocentric": 1}}}
          - {sft: {data: robot_text}}

**Controls** (``{name: blind, control: blind}``, ``{name: vision_tower, control: vision_tower}``) are
rows that say what the world can measure: the study VLM under the common VLA recipe with one input
changed (:data:`CONTROLS`), no steps. study.json reports them like any row and, under ``controls``,
the paired differences baseline - control: how much success comes from vision at all (``blind``) and
what the language model adds or removes (``vision_tower``).

The common recipes are plain mappings of ``midtrain sft`` / ``midtrain vla`` keys (their
``--help`` lists them); they are checked here by building those configs, so a wrong key fails
before anything runs, naming the row and step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ...config import ConfigError, Settings, StageConfig, from_dict, option
from ..demo import DemoConfig
from ..executors import Backend, RaySettings
from ...eval.config import EvalSettings
from ..runner import deep_merge
from .plan import SCORERS, VLA_REF_KINDS, RowStages, StepStage, parse_ref, sft_data_refs

ROW_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
PLACEHOLDER_MODEL = "<study VLM>"  # stands in for the model while a step's config is checked
PLACEHOLDER_DATA = "<study robot data>"  # and for the robot data
# Keys a step may not override: the study sets them (stage folder, input model, seed), or they are
# the shared budget every row must get (so rows are compared at equal mid-training / VLA cost).
SFT_STUDY_KEYS = ("name", "model")
VLA_STUDY_KEYS = ("name", "model", "init_policy", "seed", "closed_loop", "closed_loop_every")

DataRef = Union[str, list[str], dict[str, float]]

# A control row is the study VLM under the common VLA recipe plus these policy settings (recorded in the
# policy directory, so training and closed-loop evaluation see the same input), and what its paired
# difference with the baseline measures.
CONTROLS: dict[str, dict[str, Any]] = {
    "blind": {"vla": {"policy": {"blank_images": True}}, "measures": "vision",
              "what": "every camera image a constant frame (state and instruction only)"},
    "vision_tower": {"vla": {"policy": {"features": "vision_tower"}}, "measures": "language_model",
                     "what": "the VLM's own vision tower features, pooled, with the same head (no language model)"},
}  # fmt: skip


@dataclass
class VLMSettings(Settings):
    """The VLM every row starts from (``init: pretrained``) or whose architecture it copies
    (``init: random_weights``)."""

    model: str = option("", "a VLM checkpoint (hub id or local directory); empty: build the one `build` names")
    build: Literal["causal_demo", "tiny"] = option(
        "causal_demo", "built when model is empty: causal_demo (EfficientNet-Lite0 + SmolLM2-135M-Instruct, LLaVA) "
        "or tiny (a random tiny VLM of tiny_arch, for tests)")  # fmt: skip
    text_layers: int = option(2, "causal_demo: SmolLM2 decoder layers kept (of 30): cost is linear in them")
    tiny_arch: str = option("qwen2_vl", "tiny: the architecture (see midtrain.models.tiny.ARCHS)")
    tiny_size: str = option("test", "tiny: the size preset")

    def validate(self) -> None:
        if not 1 <= self.text_layers <= 30:
            raise ConfigError(f"vlm.text_layers: SmolLM2-135M has 30 decoder layers; got {self.text_layers}")


@dataclass
class StepSpec(Settings):
    """One step of a row: ``sft`` (mid-training) or ``vla`` (policy training, e.g. robot-data
    pretraining or an ETC stage), each a mapping of that stage's config keys on top of the study's
    common recipe; ``data:`` inside it is a data reference (see :mod:`midtrain.experiments.study.plan`)."""

    sft: Optional[dict[str, Any]] = option(None, "midtrain sft keys on top of the study's `midtrain` recipe")
    vla: Optional[dict[str, Any]] = option(None, "midtrain vla keys on top of the study's `vla` recipe")

    def validate(self) -> None:
        if (self.sft is None) == (self.vla is None):
            raise ConfigError("a step is exactly one of {sft: {...}} or {vla: {...}}")

    @property
    def kind(self) -> str:
        return "sft" if self.sft is not None else "vla"

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.sft if self.sft is not None else self.vla or {})


@dataclass
class RowSpec(Settings):
    """One initialisation compared: where the weights start, the steps applied, and (rarely) how
    this row's final VLA training departs from the common recipe."""

    name: str = option("", "row name: lower-case letters, digits, _ and - (stage folders are named after it)")
    init: Literal["pretrained", "random_weights"] = option(
        "pretrained", "pretrained: the study VLM; random_weights: its architecture with random weights (train from scratch)"
    )
    steps: list[StepSpec] = option(factory=list, help="steps applied in order before the common VLA recipe")
    vla: dict[str, Any] = option(
        factory=dict, help="overrides of the common VLA recipe for this row only (e.g. ETC co-training in a staged "
        "recipe); recorded in study.json, since the row then no longer shares the recipe")  # fmt: skip
    control: Optional[Literal["blind", "vision_tower"]] = option(
        None, "a control row (no steps): blind (every image a constant frame) or vision_tower (the VLM's pooled vision "
        "features, no language model), under the common VLA recipe")  # fmt: skip

    def validate(self) -> None:
        if not ROW_NAME.match(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-48 lower-case letters, digits, _ or - (it names stage folders)")
        if self.control is not None:
            if self.steps or self.init != "pretrained":
                raise ConfigError(f"rows ({self.name}): a control row is the study VLM under the common recipe; give it no "
                                  "steps and no init")  # fmt: skip
            self.vla = deep_merge(self.vla, CONTROLS[self.control]["vla"])  # resolved here: the row's own VLA overrides


@dataclass
class ProbeSettings(Settings):
    """The frozen-backbone probe (Rethinking VLA Initialization, Appendix E): a head trained on the
    row's VLM with the backbone frozen (features computed once per frame); its held-out action
    error is a cheap proxy of how good the initialisation is."""

    enabled: bool = option(True, "train the probe for every row")
    seeds: int = option(1, "probe the first n of the study's seeds")
    vla: dict[str, Any] = option(
        factory=dict, help="midtrain vla keys for the probe on top of the common recipe (backbone.trainable is frozen)"
    )

    def validate(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"probe.seeds: must be >= 1, got {self.seeds}")


@dataclass
class CKASettings(Settings):
    """Linear CKA per layer between the base VLM's and each row's representations of the same robot
    frames (``etc-two-bridges``, Section 5)."""

    enabled: bool = option(True, "measure the drift of every row's VLM (and, for vla_seeds, its VLA backbone) from the base")
    frames: int = option(64, "robot frames represented (spread evenly over the episodes the VLAs hold out)")
    vla_seeds: int = option(1, "also compare the VLA backbones of the first n seeds with the base (0: none)")
    batch_size: int = option(8, "frames per forward pass", throughput=True)

    def validate(self) -> None:
        if self.frames < 3:
            raise ConfigError(f"cka.frames: need at least 3 frames for CKA, got {self.frames}")
        if self.vla_seeds < 0:
            raise ConfigError(f"cka.vla_seeds: must be >= 0, got {self.vla_seeds}")


@dataclass
class PowerSettings(Settings):
    """What the study can detect (:mod:`midtrain.experiments.study.power`): for every paired comparison, the
    minimum detectable difference of this run and the seeds x episodes that would reach a target."""

    target_difference: float = option(0.10, "the difference (success, 0-1) the designs in study.json are sized to detect")
    power: float = option(0.8, "power of the minimum detectable difference")
    alpha: float = option(0.05, "two-sided level of the test")
    seed_counts: list[int] = option(factory=lambda: [2, 3, 5, 10], help="seed counts of the designs for the target")

    def validate(self) -> None:
        if not 0 < self.target_difference < 1:
            raise ConfigError(f"power.target_difference: expected a difference in (0, 1), got {self.target_difference}")
        if not 0 < self.power < 1 or not 0 < self.alpha < 1:
            raise ConfigError(f"power: power and alpha must be in (0, 1), got {self.power} and {self.alpha}")
        if not self.seed_counts or min(self.seed_counts) < 1:
            raise ConfigError(f"power.seed_counts: expected seed counts >= 1, got {self.seed_counts}")


@dataclass
class SequentialSettings(Settings):
    """Sequential evaluation (:mod:`midtrain.experiments.study.rounds`): closed-loop episodes in rounds of
    ``eval.episodes_per_task`` per task until every comparison in ``compare`` is decided (alpha
    spending keeps the false-positive rate at ``alpha``) or ``rounds`` are spent."""

    rounds: int = option(1, "at most this many rounds of eval.episodes_per_task episodes per task (1: no sequential evaluation)")
    compare: list[str] = option(factory=lambda: ["learned - random"],
                                help="the paired comparisons ('<row> - <row>') that must be decided to stop early")  # fmt: skip
    spending: Literal["obrien_fleming", "pocock"] = option(
        "obrien_fleming", "alpha-spending function: obrien_fleming (little spent early) or pocock (evenly)")
    alpha: float = option(0.05, "two-sided false-positive rate of each comparison over all rounds")

    def validate(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"sequential.rounds: must be >= 1, got {self.rounds}")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"sequential.alpha: must be in (0, 1), got {self.alpha}")


@dataclass
class StudyConfig(StageConfig):
    """Config of ``midtrain study``: compare VLA initialisations end to end in one run directory.

    ``seed`` seeds the world (the embedded world is ``demo`` with ``demo.seed = seed``: sim collect,
    sim pool and the data engine), the study VLM's build, the selections and the mid-training;
    ``seeds`` the VLA trainings (and the closed-loop episodes stay the same for every row and
    seed: ``eval.seed``).
    """

    world: Literal["embedded", "run_dir"] = option(
        "embedded", "embedded: run `midtrain demo`'s data engine on the Meta-World world (`demo` settings); run_dir: "
        "your own data - catalog, featurize and fit already complete in the run directory")  # fmt: skip
    demo: DemoConfig = option(factory=DemoConfig, help="the embedded world and its data engine (midtrain demo's keys)")
    robot_data: Optional[Path] = option(
        None, "the LeRobot dataset the VLAs train on (default: the embedded world's <run>/sim_collect/lerobot)"
    )
    k: int = option(200, "size K of every selection a row references (selection:<scorer>)")
    scorers: dict[str, dict[str, Any]] = option(
        factory=dict, help="midtrain score keys per scorer (e.g. {vla_perplexity: {batch_size: 4}})"
    )
    select: dict[str, Any] = option(factory=dict, help="midtrain select keys shared by every selection (k is the study's)")
    etc: dict[str, Any] = option(factory=dict, help="midtrain etc keys, when a row references etc:<domain> data")
    vlm: VLMSettings = option(factory=VLMSettings, help="the VLM the rows start from")
    midtrain: dict[str, Any] = option(
        factory=dict, help="midtrain sft keys every sft step shares: mode, train.steps, train.batch_size, mixture.budget, ..."
    )
    vla: dict[str, Any] = option(
        factory=dict, help="midtrain vla keys of the VLA recipe every row shares: policy, backbone, train, data.frame_stride, ..."
    )
    eval: EvalSettings = option(factory=EvalSettings, help="the closed-loop protocol, the same for every row and seed "
                                "(tasks default to the embedded world's)")  # fmt: skip
    closed_loop: bool = option(True, "evaluate every VLA in closed loop (false: offline metrics only, e.g. data without a simulator)")
    curve_every: int = option(0, "closed-loop success every N VLA steps as well as after the last (0: after the last only)")
    seeds: list[int] = option(factory=lambda: [0, 1, 2], help="seeds of the VLA trainings; every row runs every seed")
    probe: ProbeSettings = option(factory=ProbeSettings, help="the frozen-backbone probe")
    cka: CKASettings = option(factory=CKASettings, help="representation drift (linear CKA per layer)")
    power: PowerSettings = option(factory=PowerSettings, help="the detectable difference of every paired comparison")
    sequential: SequentialSettings = option(factory=SequentialSettings, help="closed-loop evaluation in rounds, stopped once decided")
    report: bool = option(True, "finish with the run report (`midtrain report`: every stage's section, the study's too)")
    calibrate: bool = option(
        False, "run the baseline row and the control rows only (no selections, mid-training, probe or CKA) and write "
        "calibration/calibration.json: the tasks to drop because the baseline and the controls agree at 0 or at 1")  # fmt: skip
    rows: list[RowSpec] = option(factory=list, help="the initialisations compared (see the module docstring)")
    baseline_row: str = option("base", "the row the others are compared with (paired by seed)")
    num_threads: Optional[int] = option(
        1, "intra-op threads of training and feature passes (null: torch's default; on 2 shared cores 1 was 3x faster "
        "than 2)", throughput=True)  # fmt: skip
    backend: Backend = option("local", "where sub-stages run: local (here, one at a time) or ray (independent ones at "
                              "once, as Ray tasks; see ray)", throughput=True)  # fmt: skip
    ray: RaySettings = option(factory=RaySettings, help="backend: ray - the cluster and each sub-stage's CPUs and GPUs",
                              throughput=True)  # fmt: skip

    def validate(self) -> None:
        if self.k < 1:
            raise ConfigError(f"k: must be >= 1, got {self.k}")
        if not self.seeds:
            raise ConfigError("seeds: at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: listed more than once: {self.seeds}")
        if self.curve_every < 0:
            raise ConfigError(f"curve_every: must be >= 0, got {self.curve_every}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads: must be >= 1, got {self.num_threads}")
        if not self.rows:
            raise ConfigError("rows: at least one row (e.g. {name: base})")
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ConfigError(f"rows: names repeat: {sorted({n for n in names if names.count(n) > 1})}")
        if self.baseline_row not in names:
            raise ConfigError(f"baseline_row: {self.baseline_row!r} is not a row; rows: {', '.join(names)}")
        if next(r for r in self.rows if r.name == self.baseline_row).control:
            raise ConfigError(f"baseline_row: {self.baseline_row!r} is a control row; the controls are compared with the baseline")
        if self.sequential.rounds > 1:
            if not self.closed_loop:
                raise ConfigError("sequential.rounds: needs closed_loop: true (the rounds add closed-loop episodes)")
            if not self.sequential.compare:
                raise ConfigError("sequential.compare: name the comparisons that decide when to stop (e.g. 'learned - random')")
            for c in self.sequential.compare:
                parts = c.split(" - ")
                if len(parts) != 2 or parts[0] == parts[1] or not set(parts) <= set(names):
                    raise ConfigError(f"sequential.compare: {c!r} is not '<row> - <row>' of two rows; rows: {', '.join(names)}")
        if self.demo.seed not in (0, self.seed):
            raise ConfigError(f"demo.seed: the study's `seed` ({self.seed}) seeds the embedded world; set seed, not demo.seed")
        if self.world == "run_dir" and self.robot_data is None:
            raise ConfigError("robot_data: required with world: run_dir (the LeRobot dataset the VLAs train on)")
        check_rows(self)


def sft_config(base: dict[str, Any], overrides: dict[str, Any], key: str):
    """An ``SFTConfig`` from the study's recipe and a step's overrides (one-line errors naming ``key``)."""
    from ...sft.config import SFTConfig

    return _build(SFTConfig, base, overrides, key)


def vla_config(base: dict[str, Any], overrides: dict[str, Any], key: str):
    from ...vla.config import VLAConfig

    return _build(VLAConfig, base, overrides, key)


def with_robot_data(recipe: dict[str, Any], path: Any) -> dict[str, Any]:
    """``recipe`` training on ``path`` (the study's robot data) unless it names its own data."""
    data = recipe.get("data") or {}
    if data.get("lerobot") is None and data.get("catalog") is None:
        return deep_merge(recipe, {"data": {"lerobot": str(path)}})
    return recipe


def _build(cls, base: dict[str, Any], overrides: dict[str, Any], key: str):
    try:
        return from_dict(cls, deep_merge(base, overrides))
    except ConfigError as exc:
        raise ConfigError(f"{key}: {exc}") from None


# --------------------------------------------------------------------------- rows as stages


def row_stages(row: RowSpec, seeds: list[int], probe_seeds: int, probe: bool = True) -> RowStages:
    """The stage folders of ``row`` (see the module docstring)."""
    out = RowStages(row.name, row.init)
    start = ""
    for i, step in enumerate(row.steps, start=1):
        suffix = f"_{i}" if len(row.steps) > 1 or step.kind == "vla" else ""
        name = f"{step.kind}_{row.name}{suffix}"
        out.steps.append(StepStage(name, step.kind, step.overrides, start))
        start = name
    out.finals = {s: f"vla_{row.name}_s{s}" for s in seeds}
    if probe and row.control is None:  # a control's VLM is the study VLM: the baseline's probe already measures it
        out.probes = {s: f"probe_{row.name}_s{s}" for s in seeds[:probe_seeds]}
    return out


def check_rows(config: StudyConfig) -> None:
    """Every row's steps parse and their configs build (with a placeholder model), before any work.

    Also refuses what would make the comparison unfair or ambiguous: a step naming keys the study
    sets (stage name, model, seed), two rows whose stage folders collide.
    """
    sft_base = {**config.midtrain, "model": PLACEHOLDER_MODEL}
    vla_base = with_robot_data({**config.vla, "model": PLACEHOLDER_MODEL}, PLACEHOLDER_DATA)
    for key, recipe, forbidden in (("midtrain", config.midtrain, SFT_STUDY_KEYS), ("vla", config.vla, VLA_STUDY_KEYS)):
        bad = [k for k in forbidden if k in recipe]
        if bad:
            raise ConfigError(f"{key}.{bad[0]}: set by the study for every stage; leave it out of the recipe")
    sft_config(sft_base, {}, "midtrain")
    vla_config(vla_base, {}, "vla")
    vla_config(vla_base, config.probe.vla, "probe.vla")
    for i, row in enumerate(config.rows):
        where = f"rows[{i}] ({row.name})"
        for j, step in enumerate(row.steps):
            key = f"{where}.steps[{j}].{step.kind}"
            over = step.overrides
            forbidden = SFT_STUDY_KEYS if step.kind == "sft" else VLA_STUDY_KEYS
            bad = [k for k in forbidden if k in over]
            if bad:
                raise ConfigError(f"{key}.{bad[0]}: set by the study (the stage folder, the model from the previous step, the seed)")
            if step.kind == "sft":
                refs = sft_data_refs(over["data"], f"{key}.data") if "data" in over else []
                rest = {k: v for k, v in over.items() if k != "data"}
                if refs and any(k in rest for k in ("mixture_file", "sources", "datasets")):
                    raise ConfigError(f"{key}: give data: (a reference) or mixture_file / sources / datasets, not both")
                cfg = sft_config(sft_base, rest, key)
                weighted = any(w is not None for _, w in refs)
                if weighted and not cfg.mixture.budget:
                    raise ConfigError(f"{key}.data: a weighted composition needs mixture.budget (samples drawn) in the recipe")
                if not refs and not any(k in rest for k in ("mixture_file", "sources", "datasets")):
                    raise ConfigError(f"{key}: no data; set data: (e.g. selection:proximity, robot_text, etc:grounding)")
            else:
                if "data" in over:
                    parse_ref(over["data"], f"{key}.data", VLA_REF_KINDS)
                vla_config(vla_base, {k: v for k, v in over.items() if k != "data"}, key)
        bad = [k for k in VLA_STUDY_KEYS if k in row.vla]
        if bad:
            raise ConfigError(f"{where}.vla.{bad[0]}: set by the study")
        vla_config(vla_base, row.vla, f"{where}.vla")
    names = {}
    for row in config.rows:
        for stage in _all_names(row_stages(row, config.seeds, config.probe.seeds)):
            if stage in names:
                raise ConfigError(f"rows: {row.name} and {names[stage]} would both write the stage folder {stage}; rename one")
            names[stage] = row.name


def _all_names(rs: RowStages) -> list[str]:
    return [s.name for s in rs.steps] + list(rs.finals.values()) + list(rs.probes.values())


def referenced_scorers(config: StudyConfig) -> list[str]:
    """The scorers whose selections some row uses, in :data:`SCORERS` order."""
    used = set()
    for row in config.rows:
        for step in row.steps:
            if step.kind == "sft" and "data" in step.sft:
                used |= {r.arg for r, _ in sft_data_refs(step.sft["data"], "data") if r.kind == "selection"}
    return [s for s in SCORERS if s in used]


def references_kind(config: StudyConfig, kind: str) -> bool:
    return any(
        r.kind == kind
        for row in config.rows
        for step in row.steps
        if step.kind == "sft" and "data" in step.sft
        for r, _ in sft_data_refs(step.sft["data"], "data")
    )
