"""Does the aligned VLM see? Held-out VQA accuracy per kind: unaligned vs aligned vs chance, linear probes, LM loss by depth.

Held-out set: ``--per-kind`` pictures of each synthetic-web kind from the ``heldout`` split (seeds
disjoint from the ``train`` split ``midtrain align`` trains on, so no picture was seen), one
short-answer question each (``midtrain.sim.web``). Each VLM answers through its own ``generate``
(pixels in, greedy tokens out); exact match after lower-casing and stripping a final period.
Chance is one over the number of answers a kind takes. The headline means are over colour, shape,
count and position (the issue's targets: aligned >= 0.8, every kind >= 2x chance, unaligned within
0.1 of chance).

Linear probes: colour, shape, position (single-shape pictures) and count (count pictures) from the
featurizer's view at ``--probe-depths`` (first d decoder layers, final norm, mean over the neutral
prompt's tokens), 5-fold cross-validated logistic regression, aligned vs unaligned.

LM loss by depth: next-token cross-entropy (nats) of the held-out captions read out at each of
``--loss-depths`` through the final norm and the head, beside uniform guessing (ln vocab): whether a
VLM cut at that depth is still a language model.

    python benchmarks/align.py --unaligned runs/align/align/base --aligned runs/align/align/model

or ``--aligned-delta src/midtrain/models/aligned/demo_smollm2_30layers`` to apply a checked-in
alignment to ``--unaligned`` (the demo VLM) first. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unaligned", type=Path, help="the unaligned VLM (align's base/; default: build the demo's 30-layer VLM)")
    ap.add_argument("--aligned", type=Path, help="the aligned VLM (align's model/)")
    ap.add_argument("--aligned-delta", type=Path, help="or: an alignment (projector + adapter) to apply to --unaligned")
    ap.add_argument("--per-kind", type=int, default=40, help="held-out questions per kind")
    ap.add_argument("--probe-depths", type=int, nargs="+", default=[8, 2])
    ap.add_argument("--loss-depths", type=int, nargs="+", default=[2, 4, 8, 30])
    ap.add_argument("--reference", type=Path, help="another VLM whose caption loss by depth to report beside (e.g. the "
                                                   "unaligned 30-layer demo VLM, for depth 30)")
    ap.add_argument("--only", choices=("unaligned", "aligned"), help="measure one VLM (into --cache) and stop")
    ap.add_argument("--cache", type=Path, help="keep each VLM's measurements here and reuse them when the model and "
                                               "held-out set are the same (run --only unaligned and aligned side by side)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from midtrain.align.evaluate import (answer_accuracy, chance, depth_readout, generate_answers, heldout_samples,
                                         probe_accuracy, uniform_loss)  # fmt: skip
    from midtrain.models import load_vlm
    from midtrain.sim.web import HEADLINE_KINDS, WEB_KINDS

    tmp = tempfile.TemporaryDirectory()
    unaligned = args.unaligned
    if unaligned is None:
        from midtrain.models.causal_demo_vlm import build_causal_demo_vlm

        unaligned = build_causal_demo_vlm(Path(tmp.name) / "demo_vlm", seed=0)
    samples = heldout_samples(args.per_kind, args.seed)
    out: dict = {"heldout_questions": len(samples), "per_kind_questions": args.per_kind, "kinds": list(WEB_KINDS)}
    results = {}
    for label in ("unaligned", "aligned"):
        if args.only and label != args.only:
            continue
        model = str(unaligned if label == "unaligned" else args.aligned or args.aligned_delta)
        key = {"model": model, "per_kind": args.per_kind, "seed": args.seed, "depths": sorted(set(args.probe_depths + args.loss_depths))}
        cached = args.cache / f"{label}.pkl" if args.cache else None
        if cached is not None and cached.exists():
            stored = pickle.loads(cached.read_bytes())
            if stored["key"] == key:
                results[label] = stored["result"]
                print(f"{label}: from {cached}", file=sys.stderr, flush=True)
                continue
        t0 = time.perf_counter()
        if label == "unaligned":
            vlm, processor = load_vlm(unaligned, dtype="float32", device="cpu")
        elif args.aligned is not None:
            vlm, processor = load_vlm(args.aligned, dtype="float32", device="cpu")
        else:
            from midtrain.models.alignment import apply_alignment

            vlm, processor = load_vlm(unaligned, dtype="float32", device="cpu")
            vlm = apply_alignment(vlm, args.aligned_delta)
        layers = vlm.config.text_config.num_hidden_layers
        answers = generate_answers(vlm, processor, samples)
        depths = sorted({d for d in args.probe_depths + args.loss_depths if d <= layers})
        feats, losses = depth_readout(vlm, processor, samples, depths)
        results[label] = {"accuracy": answer_accuracy(samples, answers), "features": feats, "loss": losses,
                          "examples": [(s.kind, s.answer, a) for s, a in zip(samples[:: args.per_kind], answers[:: args.per_kind])],
                          "uniform": uniform_loss(vlm), "seconds": time.perf_counter() - t0}  # fmt: skip
        print(f"{label}: {json.dumps(results[label]['accuracy'])} ({results[label]['seconds']:.0f} s)", file=sys.stderr, flush=True)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            cached.write_bytes(pickle.dumps({"key": key, "result": results[label]}))
        del vlm
    if args.only:
        return

    ch = chance(WEB_KINDS)
    out["per_kind"] = {k: {"aligned": results["aligned"]["accuracy"][k], "unaligned": results["unaligned"]["accuracy"][k],
                           "chance": ch[k]} for k in WEB_KINDS}  # fmt: skip
    for label in ("aligned", "unaligned"):
        out[f"{label}_accuracy"] = float(np.mean([results[label]["accuracy"][k] for k in HEADLINE_KINDS]))
    out["chance_accuracy"] = float(np.mean([ch[k] for k in HEADLINE_KINDS]))
    out["every_kind_at_least_2x_chance"] = all(out["per_kind"][k]["aligned"] >= 2 * ch[k] for k in WEB_KINDS)
    out["examples"] = {label: results[label]["examples"] for label in results}

    objects = [i for i, s in enumerate(samples) if s.kind in ("colour", "shape", "position", "size", "texture")]
    counts = [i for i, s in enumerate(samples) if s.kind == "count"]
    probes = {}
    for d in args.probe_depths:
        row = {}
        for attribute, idx in (("colour", objects), ("shape", objects), ("position", objects), ("count", counts)):
            labels = [samples[i].attributes[attribute] for i in idx]
            row[attribute] = {label: probe_accuracy(results[label]["features"][d][idx], labels) for label in ("aligned", "unaligned")
                              if d in results[label]["features"]}  # fmt: skip
        probes[f"depth_{d}"] = row
    out["probe"] = probes
    out["caption_loss_by_depth"] = {label: {str(d): round(v, 3) for d, v in results[label]["loss"].items()
                                            if d in args.loss_depths} for label in results}  # fmt: skip
    out["uniform_loss"] = round(results["aligned"]["uniform"], 3)
    if args.reference is not None:
        vlm, processor = load_vlm(args.reference, dtype="float32", device="cpu")
        depths = [d for d in args.loss_depths if d <= vlm.config.text_config.num_hidden_layers]
        _, losses = depth_readout(vlm, processor, samples, depths)
        out["reference_caption_loss_by_depth"] = {"model": str(args.reference), **{str(d): round(v, 3) for d, v in losses.items()}}
    out["seconds"] = {label: round(results[label]["seconds"], 1) for label in results}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
