"""Linear CKA drift and success intervals for ``midtrain recipes`` - a COPY, to be unified.

TEMPORARY: this module copies the parts of helper ``study``'s ``midtrain.study.cka``,
``midtrain.study.drift`` and ``midtrain.study.stats`` that the recipes use (same names, same
behaviour), because that package had not landed on main when the recipes were written. When it
lands, ``midtrain.etc.recipes`` imports them from ``midtrain.study`` and this module is deleted.

**Linear CKA** (Kornblith et al., 2019; etc-two-bridges Section 5): for representations ``X``
(``n x p``) and ``Y`` (``n x q``) of the same ``n`` inputs, columns centred::

    CKA(X, Y) = <K, L>_F / (||K||_F ||L||_F),   K = (HX)(HX)^T,  L = (HY)(HY)^T

1 for identical representations, invariant to rotations and isotropic scaling. A model's
representation at layer ``l`` is its hidden state after layer ``l`` (0: the input embeddings)
mean-pooled over the sample's image tokens.

**Intervals**: success is a mean over a crossed design (training seeds x evaluation episodes whose
initial states are shared by every seed and recipe), so the 95% interval is a two-way bootstrap:
each replicate redraws seeds and, independently, each task's episodes with replacement and
recomputes ``mean_t [sum_{s,e} w_s w_te y_ste / (S E_t)]``; percentile interval of 10,000
replicates. Differences between recipes are paired (the same replicate weights for both).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import StageConfig, option
from ..runs import RunDir, StageError, stage_run, write_json_atomic

# ------------------------------------------------------------------ linear CKA (midtrain.study.cka)

def linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA of two representations of the same ``n`` inputs (rows); see the module docstring.

    Returns 0 when either side has no variance across the inputs (CKA is undefined there).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: expected [n, p] and [n, q] with the same n, got {x.shape} and {y.shape}")
    if x.shape[0] < 2:
        raise ValueError("linear_cka: need at least 2 inputs")
    x = x - x.mean(0, keepdims=True)
    y = y - y.mean(0, keepdims=True)
    k, l_ = x @ x.T, y @ y.T
    denom = np.linalg.norm(k) * np.linalg.norm(l_)
    return float(np.sum(k * l_) / denom) if denom > 0 else 0.0


def cka_per_layer(a: np.ndarray, b: np.ndarray) -> list[float]:
    """CKA of every layer of two stacks of representations ``[layers, n, d]`` (same layers and n)."""
    if a.shape[:2] != b.shape[:2]:
        raise ValueError(f"cka_per_layer: the stacks differ in layers or inputs: {a.shape} vs {b.shape}")
    return [linear_cka(a[i], b[i]) for i in range(a.shape[0])]


def layer_representations(model: str | Path, rows: Sequence[dict[str, Any]], batch_size: int = 8,
                          device: str = "cpu", pooling: str = "image") -> np.ndarray:  # fmt: skip
    """``[layers + 1, n, d]`` float32: the mean-pooled hidden state of every layer of ``model`` (a
    VLM checkpoint) for each row, in row order. Raises StageError if a row cannot be encoded (or,
    with ``pooling="image"``, has no image token)."""
    import torch

    from ..featurize.featurizer import FeatureExtractor
    from ..models.inputs import build_batch
    from ..models.loading import load_vlm

    if pooling not in ("image", "all"):
        raise ValueError(f"pooling: expected image or all, got {pooling!r}")
    vlm, processor = load_vlm(model, dtype="float32", device=device)
    extractor = FeatureExtractor(vlm, device=device)  # its backbone and input filter; all layers are read here
    image_ids = torch.tensor(extractor.image_token_ids, dtype=torch.long)
    out: list[np.ndarray] = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = list(rows[start : start + batch_size])
            batch, info = build_batch(part, processor, include_assistant=False)
            if info.errors or batch is None or len(info.positions) != len(part):
                err = info.errors[0] if info.errors else "no sample could be encoded"
                raise StageError(f"{model}: cannot encode the representation inputs ({err})")
            order = np.argsort(info.positions)  # build_batch may reorder (samples with images first)
            inputs = extractor.model_inputs(batch)
            hidden = extractor.backbone(**inputs, use_cache=False, output_hidden_states=True).hidden_states
            keep = inputs["attention_mask"].bool()
            if pooling == "image":
                keep &= torch.isin(inputs["input_ids"], image_ids.to(keep.device))
                if not bool(keep.any(1).all()):
                    raise StageError(f"{model}: a representation input has no image token to pool over")
            mask = keep.unsqueeze(-1).to(hidden[0].dtype)
            pooled = torch.stack([(h * mask).sum(1) / mask.sum(1).clamp_min(1) for h in hidden])  # [L+1, b, d]
            out.append(pooled.float().cpu().numpy()[:, order])
    del vlm, extractor
    return np.concatenate(out, axis=1)


def evenly_spaced(rows: Sequence[dict], n: int) -> list[dict]:
    """``n`` rows spread evenly over ``rows`` (all of them when there are fewer)."""
    if len(rows) <= n:
        return list(rows)
    idx = np.linspace(0, len(rows) - 1, n).round().astype(int)
    return [rows[i] for i in idx]


# ------------------------------------------------------------------ the drift stage (midtrain.study.drift)

CKA_FILE = "cka.json"


@dataclass
class CKAStageConfig(StageConfig):
    """What the ``cka`` stage compares (its fingerprint)."""

    base: str = option("", "the reference VLM")
    models: dict[str, str] = option(factory=dict, help="label -> VLM checkpoint compared with the base")
    robot_data: str = option("", "the LeRobot dataset the frames come from")
    frames: int = option(64, "frames represented")
    batch_size: int = option(8, "frames per forward pass", throughput=True)


def robot_frames(root: Path, n: int, seed: int) -> list[dict]:
    """``n`` frames spread evenly over a LeRobot dataset (decoding about 4n frames, not all of them)."""
    from ..data.lerobot import load_lerobot_info
    from ..vla.data import read_lerobot

    total = int(load_lerobot_info(root).get("total_frames") or 0)
    stride = max(1, total // (4 * n)) if total else 1

    def refuse(err) -> None:
        raise StageError(f"cka: {err}")

    rows, _ = read_lerobot(root, 1, None, None, stride, seed, refuse)
    if len(rows) < 3:
        raise StageError(f"cka: {root} gives only {len(rows)} frame(s); CKA needs at least 3")
    return evenly_spaced(rows, n)


def measure_drift(config: CKAStageConfig, run_dir: RunDir, name: str = "cka", force: bool = False) -> Path:
    """Compute ``cka.json`` (see the module docstring); returns the stage folder."""
    inputs = {"base": Path(config.base), **{f"model/{k}": Path(v) for k, v in config.models.items()}}
    inputs = {k: v for k, v in inputs.items() if v.exists()}
    with stage_run(run_dir, name, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.final_dir
        with st.timed("frames"):
            frames = robot_frames(Path(config.robot_data), config.frames, config.seed)
        with st.timed("base"):
            base = layer_representations(config.base, frames, config.batch_size)
        out = {"frames": len(frames), "layers": int(base.shape[0]), "base": config.base,
               "frame_ids": [str(f["id"]) for f in frames], "pooling": "mean over image tokens", "models": {}}  # fmt: skip
        for label, path in config.models.items():
            with st.timed(f"model/{label}"):
                reps = layer_representations(path, frames, config.batch_size)
            if reps.shape[:2] != base.shape[:2]:
                raise StageError(f"cka: {path} has {reps.shape[0]} layers, the base {base.shape[0]}; CKA per layer needs the same architecture")
            out["models"][label] = {"path": path, "cka": [round(c, 6) for c in cka_per_layer(base, reps)]}
            st.log.info("cka %s: %s", label, " ".join(f"{c:.3f}" for c in out["models"][label]["cka"]))
        write_json_atomic(Path(st.dir) / CKA_FILE, out)
        st.counts.update(frames=len(frames), models=len(config.models))
    return st.final_dir


# ------------------------------------------------------------------ intervals (midtrain.study.stats)

BOOTSTRAP_REPLICATES = 10_000
INTERVAL_METHOD = ("two-way bootstrap over training seeds and evaluation episodes (tasks fixed), "
                   "95% percentile, 10,000 replicates; paired across rows")  # fmt: skip


def success_array(per_seed: Sequence[dict[str, Sequence[bool]]]) -> tuple[list[str], list[np.ndarray]]:
    """``[{task: [success of episode 0, 1, ...]}, ...]`` (one dict per seed, episodes in index order)
    -> (tasks, per task an array ``[S, E_t]`` of 0/1). Every seed must have the same tasks and episodes."""
    if not per_seed:
        raise ValueError("success_array: no seed")
    tasks = list(per_seed[0])
    arrays = []
    for t in tasks:
        rows = [np.asarray(s[t], dtype=np.float64) if t in s else None for s in per_seed]
        if any(r is None or len(r) != len(rows[0]) for r in rows) or len(rows[0]) == 0:
            raise ValueError(f"success_array: task {t!r} has different episodes across seeds; every seed must run the same protocol")
        arrays.append(np.stack(rows))
    if any(set(s) != set(tasks) for s in per_seed):
        raise ValueError("success_array: seeds evaluated different tasks")
    return tasks, arrays


def _weights(rng: np.random.Generator, n: int, reps: int) -> np.ndarray:
    """Multinomial resampling counts ``[reps, n]`` (each row sums to n)."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=reps).astype(np.float64)


def replicate_means(arrays: list[np.ndarray], w_seed: np.ndarray, w_episodes: list[np.ndarray]) -> np.ndarray:
    """The mean over tasks of each bootstrap replicate, from resampling counts: ``w_seed`` ``[B, S]``
    (how often each seed is drawn) and per task ``w_episodes[t]`` ``[B, E_t]``; ``arrays[t]`` is
    ``[S, E_t]``. Equal to recomputing the mean on explicitly resampled seeds and episodes."""
    n_seeds = arrays[0].shape[0]
    per_task = [np.einsum("bs,se,be->b", w_seed, y, w) / (n_seeds * y.shape[1]) for y, w in zip(arrays, w_episodes)]
    return np.mean(per_task, axis=0)


def bootstrap_means(arrays: list[np.ndarray], seed: int = 0, reps: int = BOOTSTRAP_REPLICATES) -> np.ndarray:
    """Replicates ``[reps]`` of the two-way bootstrap (module docstring). Rows compared with
    :func:`paired_interval` use the same ``seed``, hence the same resampling counts."""
    rng = np.random.default_rng(seed)
    w_seed = _weights(rng, arrays[0].shape[0], reps)
    return replicate_means(arrays, w_seed, [_weights(rng, y.shape[1], reps) for y in arrays])


def percentile_interval(replicates: np.ndarray) -> list[float]:
    lo, hi = np.percentile(replicates, [2.5, 97.5])
    return [round(float(lo), 4), round(float(hi), 4)]


def success_summary(per_seed: Sequence[dict[str, Sequence[bool]]], seed: int = 0) -> dict:
    """Mean success over tasks (and seeds) with its interval, per-seed means and per-task means."""
    tasks, arrays = success_array(per_seed)
    point = float(np.mean([y.mean() for y in arrays]))
    reps = bootstrap_means(arrays, seed)
    seed_means = [float(np.mean([y[s].mean() for y in arrays])) for s in range(arrays[0].shape[0])]
    return {
        "mean": round(point, 4), "ci95": percentile_interval(reps), "interval": INTERVAL_METHOD,
        "per_seed": [round(m, 4) for m in seed_means],
        "per_task": {t: round(float(y.mean()), 4) for t, y in zip(tasks, arrays)},
        "episodes": int(sum(y.size for y in arrays)), "successes": int(sum(y.sum() for y in arrays)),
    }  # fmt: skip


def paired_interval(row: Sequence[dict[str, Sequence[bool]]], base: Sequence[dict[str, Sequence[bool]]],
                    seed: int = 0) -> dict:  # fmt: skip
    """The difference ``row - base`` of mean success, paired by seed index and episode, with its
    two-way bootstrap interval (the same replicate weights for both)."""
    t_row, a_row = success_array(row)
    t_base, a_base = success_array(base)
    if t_row != t_base or [a.shape for a in a_row] != [a.shape for a in a_base]:
        raise ValueError("paired_interval: the rows were not evaluated under the same protocol and seeds")
    diff = bootstrap_means(a_row, seed) - bootstrap_means(a_base, seed)
    point = float(np.mean([y.mean() for y in a_row]) - np.mean([y.mean() for y in a_base]))
    return {"mean": round(point, 4), "ci95": percentile_interval(diff),
            "share_of_replicates_above_0": round(float(np.mean(diff > 0)), 4)}  # fmt: skip

