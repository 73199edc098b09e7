"""ETC / VQA co-training of a VLA policy (etc-two-bridges' Objective Bridging and Retentive Adaptation).

The VQA data (``cotrain.etc`` domains, :mod:`midtrain.etc.compositions`, and ``cotrain.datasets``)
is read and measured once, on the main process, with ``midtrain sft``'s own preparation
(:func:`midtrain.sft.data.draw_and_prepare`: every usable row of every source, ``val_fraction``
of each held out) with the policy's processor, into ``<stage>/cotrain/`` (``pool.arrow``,
``samples.parquet``, ``composition.json``); a resumed run reuses it.

Training: a :class:`midtrain.train.AuxStream` named ``vqa`` whose micro-batches of
``max(1, round(batch_share x batch_size))`` samples are drawn from the sources by weight
(:class:`midtrain.train.WeightedBatches`, seeded by the run's training seed), collated as sft
collates (:func:`midtrain.sft.data.collate_sft`: chat template, labels on answer tokens), and
trained through :meth:`midtrain.policy.VLAPolicy.forward`, which gives a batch with ``labels``
the backbone's next-token loss on its answer tokens. The loop accumulates them with the action
micro-batches into one optimizer step: ``L = L_action + loss_weight x L_vqa``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np

from ..runs import RunDir, StageError

COTRAIN_DIR = "cotrain"
STREAM = "vqa"


@dataclass
class CoTrainInputs:
    """The VQA sources of a co-training config and their stream weights (before any row is read)."""

    sources: list  # DatasetSource
    weights: dict[str, float]  # source name -> weight (normalised)
    etc_domains: dict[str, str]  # ETC source name -> domain slug

    def fingerprint_inputs(self) -> dict[str, Path]:
        return {f"cotrain/{s.name}": Path(s.path) for s in self.sources}


def resolve_inputs(cotrain, run_dir: RunDir) -> Optional[CoTrainInputs]:
    """``cotrain`` settings -> sources and weights (None when co-training is off); one-line errors for
    missing ETC stages or domains and weights naming unknown sources."""
    if not cotrain.enabled:
        return None
    sources, weights, domains = [], {}, {}
    if cotrain.etc:
        from ..etc.compositions import resolve_etc

        etc = resolve_etc(cotrain.etc, run_dir.root, "cotrain.etc")
        sources += etc.sources
        weights.update(etc.weights)
        domains.update(etc.domains)
    taken = {s.name for s in sources}
    for d in cotrain.datasets:
        if d.name in taken:
            raise StageError(f"cotrain.datasets: the name {d.name!r} is also an ETC source's; rename the dataset")
        sources.append(d)
    names = [s.name for s in sources]
    if cotrain.weights:
        unknown = sorted(set(cotrain.weights) - set(names))
        if unknown:
            raise StageError(f"cotrain.weights: {unknown[0]!r} is not a co-training source; the sources are {', '.join(names)}")
        weights = {n: float(cotrain.weights.get(n, 0.0)) for n in names}
    elif not cotrain.etc:
        weights = {}  # datasets alone: by size, known once read
    total = sum(weights.values())
    weights = {n: w / total for n, w in weights.items()} if total else {}
    return CoTrainInputs(sources, weights, domains)


def prepare(inputs: CoTrainInputs, cotrain, processor, stage_dir: Path, seed: int, st, main: bool, accelerator) -> dict:
    """Read, measure and split the VQA data into ``<stage>/cotrain/`` once (main process; the others
    wait); returns its ``composition.json``."""
    from ..sft.config import MixtureSettings
    from ..sft.data import COMPOSITION_FILE, InputIndex, draw_and_prepare, materialize_datasets, read_composition

    out = Path(stage_dir) / COTRAIN_DIR
    if main and not (out / COMPOSITION_FILE).exists():
        import shutil

        if out.exists():
            shutil.rmtree(out)  # a preparation cut short: start over
        out.mkdir(parents=True)
        draw = SimpleNamespace(mixture=MixtureSettings(), seed=seed, val_fraction=cotrain.val_fraction,
                               max_length=cotrain.max_length, overlong=cotrain.overlong, vla_as_text=False,
                               action_bins=256, action_range=(-1.0, 1.0), prepare_workers=cotrain.prepare_workers)  # fmt: skip
        with st.timed("prepare_cotrain"):
            files = materialize_datasets(inputs.sources, seed, out / "inputs", st)
            draw_and_prepare(draw, InputIndex.build(files), processor, out, st)
    if not main:
        while not (out / COMPOSITION_FILE).exists():
            time.sleep(2.0)
    accelerator.wait_for_everyone()
    return read_composition(out) or {}


def build_stream(inputs: CoTrainInputs, cotrain, stage_dir: Path, batch_size: int, seed: int, processor):
    """The ``vqa`` :class:`midtrain.train.AuxStream` over the prepared data, and what it holds
    (per source: training samples, weight)."""
    import pyarrow.parquet as pq

    from ..sft.data import SAMPLES_FILE, collate_sft, load_prepared
    from ..train import AuxStream, WeightedBatches

    out = Path(stage_dir) / COTRAIN_DIR
    data = load_prepared(out)
    samples = pq.read_table(out / SAMPLES_FILE, columns=["split", "source"])
    split = samples.column("split").to_numpy(zero_copy_only=False)
    source = samples.column("source").to_numpy(zero_copy_only=False)[split == "train"]
    names = sorted(set(source.tolist()))
    weights = inputs.weights or {n: float(np.sum(source == n)) for n in names}
    kept = [n for n in names if weights.get(n, 0) > 0]
    lost = [n for n, w in weights.items() if w > 0 and n not in names]
    if lost:
        raise StageError(f"cotrain: source {lost[0]!r} has no usable training sample (see errors.jsonl)")
    groups = [np.flatnonzero(source == n) for n in kept]
    micro = max(1, int(round(cotrain.batch_share * batch_size)))
    plan = WeightedBatches(groups, [weights[n] for n in kept], micro, seed)

    def collate(rows: list[dict]) -> dict:
        return collate_sft(rows, processor, cotrain.max_length, cotrain.overlong)

    stream = AuxStream(STREAM, data.train, collate, plan.micro_batch, weight=cotrain.loss_weight,
                       eval_dataset=data.val if len(data.val) else None, eval_batch_size=micro)  # fmt: skip
    total = sum(weights[n] for n in kept)
    info = {"micro_batch": micro, "loss_weight": cotrain.loss_weight,
            "sources": {n: {"train_samples": int(np.sum(source == n)), "weight": weights[n] / total,
                            **({"domain": inputs.etc_domains[n]} if n in inputs.etc_domains else {})} for n in kept},
            "val_samples": len(data.val)}  # fmt: skip
    return stream, info
