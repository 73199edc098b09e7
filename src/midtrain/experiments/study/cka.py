"""Representation drift: linear CKA per layer between two VLMs on the same inputs.

Linear centred kernel alignment (Kornblith et al., 2019), as ``etc-two-bridges.txt`` (Section 5)
uses it to show how far action training moves a backbone from its initialisation. For
representations ``X`` (``n x p``) and ``Y`` (``n x q``) of the same ``n`` inputs, with columns
centred (``H X``, ``H = I - 11^T / n``)::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)
              = <K, L>_F / (||K||_F ||L||_F),   K = (HX)(HX)^T,  L = (HY)(HY)^T

It is 1 for identical representations, invariant to rotations and isotropic scaling of either
side (so two models of different widths compare), and not to arbitrary invertible maps. The Gram
form is what is computed here (``n`` is small: tens to hundreds of frames; float64).

A model's representation of an input at layer ``l`` is its hidden state after layer ``l``
(``l = 0``: the input embeddings, where the projected image features enter), mean-pooled over the
sample's image tokens (``pooling="image"``, the default: what the model makes of the frame; in a
causal model they precede the instruction and do not see it) or over all attended tokens
(``"all"``). Pooling over all tokens lets the instruction dominate: frames of a few tasks then
fall into a few clusters, and any two models that separate the clusters score CKA near 1
whatever they make of the scenes. Inputs are catalog rows - robot frames (image + instruction, as
the policy's prompt shows them without its action placeholders) or VLM samples - built with the
model's own processor and chat template (:func:`midtrain.models.inputs.build_batch`).

Reused by the study (base VLM vs each row's mid-trained VLM and VLA backbone) and by the ETC
recipes (drift with and without ETC co-training).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ...runs import StageError


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

    from ...featurize.featurizer import FeatureExtractor
    from ...models.inputs import build_batch
    from ...models.loading import load_vlm

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
