"""``StudyConfig``: the config of ``midtrain study`` (a light import, for ``--help``).

A study is the seed's experiment in one file: the world (the robot and VLM data), the data
engine's selection size ``k``, the VLM, the mid-training recipe every row shares, the VLA recipe
every row shares, the closed-loop protocol, the seeds, and the **rows** - the initialisations
compared. A row is a named recipe: where its weights start (``init``) and a list of **steps**
applied to the VLM before the common VLA recipe. A step is ``{sft: {...}}`` or ``{vla: {...}}``:
overrides of the common mid-training (``midtrain``) or VLA (``vla``) config, whose ``data:``
names an artefact by reference (see :mod:`midtrain.study.plan`)::

    rows:
      - {name: base}                                                 # no mid-training
      - {name: learned, steps: [{sft: {data: "selection:proximity"}}]}
      - {name: random,  steps: [{sft: {data: "selection:random"}}]}
      - {name: scratch, init: random_weights}                        # same architecture, random weights
      - name: rethinking_route                                       # staged: domains, then robot text
        steps:
          - {sft: {data: {"etc:grounding": 1, "etc:egocentric": 1}}}
          - {sft: {data: robot_text}}

The common recipes are plain mappings of ``midtrain sft`` / ``midtrain vla`` keys (their
``--help`` lists them); they are checked here by building those configs, so a wrong key fails
before anything runs, naming the row and step.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ..config import ConfigError, Settings, StageConfig, from_dict, option
from ..demo import DemoConfig
from ..eval.config import EvalSettings

ROW_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
PLACEHOLDER_MODEL = "<study VLM>"  # stands in for the model while a step's config is checked
PLACEHOLDER_DATA = "<study robot data>"  # and for the robot data
# Keys a step may not override: the study sets them (stage folder, input model, seed), or they are
# the shared budget every row must get (so rows are compared at equal mid-training / VLA cost).
SFT_STUDY_KEYS = ("name", "model")
VLA_STUDY_KEYS = ("name", "model", "init_policy", "seed", "closed_loop", "closed_loop_every")

DataRef = Union[str, list[str], dict[str, float]]


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
    common recipe; ``data:`` inside it is a data reference (see :mod:`midtrain.study.plan`)."""

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

    def validate(self) -> None:
        if not ROW_NAME.match(self.name):
            raise ConfigError(f"name: {self.name!r} must be 1-48 lower-case letters, digits, _ or - (it names stage folders)")


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
    """What the study can detect (:mod:`midtrain.study.power`): for every paired comparison, the
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
    """Sequential evaluation (:mod:`midtrain.study.rounds`): closed-loop episodes in rounds of
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
    rows: list[RowSpec] = option(factory=list, help="the initialisations compared (see the module docstring)")
    baseline_row: str = option("base", "the row the others are compared with (paired by seed)")
    num_threads: Optional[int] = option(
        1, "intra-op threads of training and feature passes (null: torch's default; on 2 shared cores 1 was 3x faster "
        "than 2)", throughput=True)  # fmt: skip

    def validate(self) -> None:
        from .plan import check_rows

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
    from ..sft.config import SFTConfig

    return _build(SFTConfig, base, overrides, key)


def vla_config(base: dict[str, Any], overrides: dict[str, Any], key: str):
    from ..vla.config import VLAConfig

    return _build(VLAConfig, base, overrides, key)


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested mappings merged key by key (a recipe's ``train:`` keeps the
    keys a step does not name)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


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
