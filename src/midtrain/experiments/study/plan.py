"""The study's stage folders and data references, resolved to ``midtrain sft`` / ``vla`` inputs against
the running study (the folders of a row are named by :func:`midtrain.experiments.study.config.row_stages`).

**Stage folders** (all in the study's run directory, each an ordinary resumable stage)::

    vlm/model                  the study VLM when it is built (vlm.build), else vlm.model is used
    vlm_random/model           its architecture with random weights (rows with init: random_weights)
    selections/<scorer>/       score, select (k = the study's k) and export, a nested run directory
                               sharing the run's catalog (selection:<scorer> references)
    sft_vla_text/              the VLM mid-trained on the robot data as text (the perplexity scorers' model)
    sft_<row> | sft_<row>_<i>  a row's mid-training step (i = the step's 1-based index when the row has several)
    vla_<row>_<i>              a row's intermediate VLA step (e.g. robot-data pretraining, an ETC stage)
    vla_<row>_s<seed>          the common VLA recipe on the row's initialisation, one per seed
    probe_<row>_s<seed>        the frozen-backbone probe of the row's VLM
    cka/                       representation drift of every row from the base VLM
    study/                     study.json, the table and the figures

**Data references** (the ``data:`` key of a step). An sft step's ``data`` is one reference, a list
(the union of their samples) or a mapping ``reference -> weight`` (a fixed-budget composition:
the recipe's ``mixture.budget`` samples drawn with those weights, Rethinking's compositions):

- ``selection:<scorer>``: the top-``k`` selection of that scorer (``proximity`` - the learned
  estimator -, ``random``, ``mean_distance``, ``vla_perplexity``, ``delta_perplexity``), exported
  as a mixture; alone (a selection is one Parquet input of ``midtrain sft``);
- ``robot_text``: the robot data with each frame's action chunk rendered as text (Action-NTP);
- ``etc:<domain>[+<domain>...]`` or ``etc:all``: the ``midtrain etc`` VQA of those Rethinking
  domains (by file slug: grounding, egocentric, spatial, ...), generated from the robot data.

A vla step's ``data`` is ``robot`` (the study's robot data, the default) or
``robot:<task>+<task>`` (only the episodes of those tasks: a target split).

:data:`SFT_DATA` maps a reference kind to its resolver; a new kind of data is one function there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ...config import ConfigError

SCORERS = ("proximity", "random", "mean_distance", "vla_perplexity", "delta_perplexity")
PERPLEXITY_SCORERS = ("vla_perplexity", "delta_perplexity")
ETC_DOMAIN_SLUGS = ("spatial", "grounding", "plan_reasoning", "camera_prediction", "egocentric", "temporal", "action_ntp")
SELECTIONS_DIR = "selections"
VLM_STAGE = "vlm"
RANDOM_VLM_STAGE = "vlm_random"
VLA_TEXT_STAGE = "sft_vla_text"
CKA_STAGE = "cka"
STUDY_STAGE = "study"
_REF = re.compile(r"^(?P<kind>[a-z_]+)(:(?P<arg>[A-Za-z0-9_.+\-]+))?$")


# --------------------------------------------------------------------------- references


@dataclass(frozen=True)
class Ref:
    """A parsed data reference ``kind[:arg]``."""

    kind: str
    arg: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.arg}" if self.arg else self.kind


def parse_ref(text: Any, key: str, allowed: tuple[str, ...]) -> Ref:
    """``"selection:random"`` -> ``Ref("selection", "random")``, checked against what the kind takes."""
    m = _REF.match(text) if isinstance(text, str) else None
    if not m or m["kind"] not in allowed:
        raise ConfigError(f"{key}: {text!r} is not a data reference; expected one of {', '.join(_REF_FORMS[k] for k in allowed)}")
    ref = Ref(m["kind"], m["arg"] or "")
    if ref.kind == "selection" and ref.arg not in SCORERS:
        raise ConfigError(f"{key}: unknown scorer {ref.arg!r} in {text!r}; scorers: {', '.join(SCORERS)}")
    if ref.kind == "etc":
        bad = [d for d in ref.arg.split("+") if d not in (*ETC_DOMAIN_SLUGS, "all")] if ref.arg else [""]
        if bad:
            raise ConfigError(f"{key}: unknown ETC domain {bad[0]!r} in {text!r}; domains: all, {', '.join(ETC_DOMAIN_SLUGS)}")
    if ref.kind == "robot_text" and ref.arg:
        raise ConfigError(f"{key}: robot_text takes no argument, got {text!r}")
    return ref


_REF_FORMS = {"selection": "selection:<scorer>", "robot_text": "robot_text", "etc": "etc:<domain>[+<domain>] | etc:all",
              "robot": "robot | robot:<task>[+<task>]"}  # fmt: skip
SFT_REF_KINDS = ("selection", "robot_text", "etc")
VLA_REF_KINDS = ("robot",)


def sft_data_refs(value: Any, key: str) -> list[tuple[Ref, Optional[float]]]:
    """An sft step's ``data``: one reference, a list, or ``{reference: weight}``; checked."""
    if isinstance(value, dict):
        items = list(value.items())
        if not items:
            raise ConfigError(f"{key}: an empty composition")
        out = []
        for text, w in items:
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not w > 0:
                raise ConfigError(f"{key}.{text}: expected a weight > 0, got {w!r}")
            out.append((parse_ref(text, key, SFT_REF_KINDS), float(w)))
    elif isinstance(value, list):
        if not value:
            raise ConfigError(f"{key}: an empty list of data references")
        out = [(parse_ref(t, key, SFT_REF_KINDS), None) for t in value]
    else:
        out = [(parse_ref(value, key, SFT_REF_KINDS), None)]
    refs = [r for r, _ in out]
    if len(set(refs)) != len(refs):
        raise ConfigError(f"{key}: a data reference is listed twice")
    if any(r.kind == "selection" for r in refs) and len(refs) > 1:
        raise ConfigError(f"{key}: a selection (selection:<scorer>) is one mixture file and cannot be combined with other data")
    return out


# --------------------------------------------------------------------------- stage names


@dataclass
class StepStage:
    """One step of a row as a stage: its folder, kind, overrides, and the model it starts from."""

    name: str
    kind: str  # "sft" | "vla"
    overrides: dict[str, Any]
    start: str  # stage folder whose output it starts from ("" = the row's initial VLM)


@dataclass
class RowStages:
    """Every stage of one row."""

    row: str
    init: str
    steps: list[StepStage] = field(default_factory=list)
    finals: dict[int, str] = field(default_factory=dict)  # seed -> vla_<row>_s<seed>
    probes: dict[int, str] = field(default_factory=dict)  # seed -> probe_<row>_s<seed>


# --------------------------------------------------------------------------- resolving references


@dataclass
class DataInput:
    """What an sft step trains on, as ``midtrain sft`` keys, and where it came from (for study.json)."""

    keys: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)


SftResolver = Callable[[Any, Ref], "DataInput"]


def resolve_sft_data(ctx: Any, value: Any, key: str) -> DataInput:
    """The ``midtrain sft`` data keys for an sft step's ``data:`` (see the module docstring).

    ``ctx`` is the running study (:class:`midtrain.experiments.study.stage.StudyContext`): the resolvers ask it
    for artefacts (a selection's mixture, the ETC folder), which it produces on first use.
    """
    refs = sft_data_refs(value, key)
    parts = [SFT_DATA[r.kind](ctx, r) for r, _ in refs]
    if len(parts) == 1 and refs[0][1] is None:
        return parts[0]
    datasets, weights, as_text = [], {}, False
    for (ref, w), part in zip(refs, parts):
        if "datasets" not in part.keys:
            raise ConfigError(f"{key}: {ref} cannot be combined with other data")
        datasets += part.keys["datasets"]
        as_text |= bool(part.keys.get("vla_as_text"))
        if w is not None:
            names = [d["name"] for d in part.keys["datasets"]]
            weights.update({n: w / len(names) for n in names})  # a reference's weight is shared by its files
    keys: dict[str, Any] = {"datasets": datasets}
    if as_text:
        keys["vla_as_text"] = True
    if weights:
        keys["mixture"] = {"weights": weights}
    return DataInput(keys, {"references": {str(r): p.provenance for (r, _), p in zip(refs, parts)},
                            "weights": {str(r): w for r, w in refs if w is not None}})  # fmt: skip


def _selection(ctx: Any, ref: Ref) -> DataInput:
    mixture, metrics = ctx.selection(ref.arg)
    return DataInput({"mixture_file": str(mixture)}, {"scorer": ref.arg, "k": ctx.config.k, "mixture": str(mixture),
                                                      "selection_metrics": str(metrics)})  # fmt: skip


def _robot_text(ctx: Any, ref: Ref) -> DataInput:
    source = {"name": "robot_text", "kind": "vla", "format": "lerobot", "path": str(ctx.robot_data),
              "chunk_size": ctx.chunk_size, "frame_stride": ctx.frame_stride}  # fmt: skip
    return DataInput({"datasets": [source], "vla_as_text": True}, {"robot_data": str(ctx.robot_data)})


def _etc(ctx: Any, ref: Ref) -> DataInput:
    folder = ctx.etc_llava_dir()
    slugs = ETC_DOMAIN_SLUGS if ref.arg == "all" else tuple(ref.arg.split("+"))
    files = [(s, folder / f"domain_{s}.json") for s in slugs]
    present = [(s, f) for s, f in files if f.is_file()]
    missing = [s for s, f in files if not f.is_file()]
    if ref.arg != "all" and missing:
        raise ConfigError(f"{ref}: the ETC stage wrote no samples of domain {missing[0]!r} ({folder}); see its manifest")
    if not present:
        raise ConfigError(f"{ref}: the ETC stage wrote no samples ({folder})")
    sources = [{"name": f"etc_{s}", "kind": "vlm", "format": "llava_json", "path": str(f)} for s, f in present]
    return DataInput({"datasets": sources}, {"etc": str(folder), "domains": [s for s, _ in present]})


SFT_DATA: dict[str, SftResolver] = {"selection": _selection, "robot_text": _robot_text, "etc": _etc}


def robot_episodes(lerobot_root: Path, tasks: list[str]) -> list[int]:
    """Episode indices of a LeRobot dataset whose task (Meta-World name or instruction) is in ``tasks``."""
    from ...sim.task_groups import episodes_by_group

    groups = episodes_by_group(Path(lerobot_root), {t: [t] for t in tasks})
    missing = [t for t in tasks if not groups.get(t)]
    if missing:
        raise ConfigError(f"robot:{'+'.join(tasks)}: {lerobot_root} has no episode of task {missing[0]!r}")
    return sorted(e for t in tasks for e in groups[t])


def resolve_vla_data(ctx: Any, value: Any, key: str) -> dict[str, Any]:
    """The ``midtrain vla`` data keys for a vla step's ``data:`` (``robot`` or ``robot:<tasks>``)."""
    ref = parse_ref(value, key, VLA_REF_KINDS)
    data: dict[str, Any] = {"lerobot": str(ctx.robot_data)}
    if ref.arg:
        data["episodes"] = robot_episodes(ctx.robot_data, ref.arg.split("+"))
    return {"data": data}


def eval_settings(ctx: Any) -> dict[str, Any]:
    """The closed-loop protocol as ``closed_loop`` keys: the study's ``eval``, tasks defaulting to the
    embedded world's."""
    from ...sim.metaworld_env import DEFAULT_TASKS

    cfg = ctx.config
    settings = cfg.eval.to_dict()
    if not settings["tasks"] and cfg.eval.benchmark == "metaworld" and cfg.world == "embedded":
        settings["tasks"] = list(cfg.demo.tasks or DEFAULT_TASKS)
    settings["corpus"] = str(settings["corpus"] or ctx.robot_data)
    return settings
