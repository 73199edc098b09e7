"""The proximity estimator: s(x) = sigmoid(f(standardise(phi(x)))) on frozen VLM features.

Trained with VLA samples as positives and VLM pool samples as negatives (binary
cross-entropy on class-balanced batches), so at optimum
``s*(x) = p_VLA(x) / (p_VLA(x) + p_VLM(x))`` and the logit ``f`` is the log density
ratio ``log p_VLA(x) / p_VLM(x)`` (paper, "Proximity Estimator").

``f`` is linear by default (as in the paper) or an MLP. The feature standardiser
(mean, std fitted on the training split) lives inside the model as buffers, so a saved
estimator is self-contained: ``model.safetensors`` (weights + standardiser) and
``config.json`` (architecture, feature-run fingerprint, metrics). ``load_estimator``
needs only torch and safetensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..devices import torch_threads
from ..runs import load_safetensors, save_safetensors_atomic, write_json_atomic
from .config import TrainSettings

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT_VERSION = 1
MIN_STD = 1e-6  # features with a smaller spread (constant columns) are centred but not scaled


class ProximityEstimator(nn.Module):
    """Raw features ``[n, dim]`` -> logits ``[n]`` (higher = closer to the VLA data).

    ``kind="linear"``: ``f(z) = w.z + b``; ``kind="mlp"``: Linear-ReLU(-Dropout) blocks of
    widths ``hidden`` then a Linear to one logit. ``z = (x - feature_mean) / feature_std``.
    """

    def __init__(self, dim: int, kind: str = "linear", hidden: list[int] | tuple[int, ...] = (256,), dropout: float = 0.0):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"estimator kind must be 'linear' or 'mlp', got {kind!r}")
        self.dim, self.kind = int(dim), kind
        self.hidden = [int(h) for h in hidden] if kind == "mlp" else []
        self.dropout = float(dropout) if kind == "mlp" else 0.0
        self.register_buffer("feature_mean", torch.zeros(dim))
        self.register_buffer("feature_std", torch.ones(dim))
        layers: list[nn.Module] = []
        width = dim
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            width = h
        head = nn.Linear(width, 1)
        nn.init.zeros_(head.weight)  # start at s(x) = 0.5 everywhere, as logistic regression does
        nn.init.zeros_(head.bias)
        layers.append(head)
        self.net = nn.Sequential(*layers)

    def set_standardiser(self, mean: np.ndarray, std: np.ndarray) -> None:
        std = np.where(std < MIN_STD, 1.0, std)
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.feature_mean) / self.feature_std).squeeze(-1)

    @torch.no_grad()
    def score(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """Proximity scores ``s(x)`` in (0, 1) for raw features (float64, to keep resolution near 1)."""
        logits = self.forward(torch.as_tensor(np.asarray(x, dtype=np.float32))).double()
        return torch.sigmoid(logits).numpy()

    def architecture(self) -> dict:
        return {"kind": self.kind, "dim": self.dim, "hidden": self.hidden, "dropout": self.dropout, "activation": "relu"}

    @torch.no_grad()
    def folded_layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Linear layers ``(W, b)`` in order, with the standardiser folded into the first.

        ``W' = W / sigma`` (per input column) and ``b' = b - W (mu / sigma)``, so scoring a
        raw feature chunk is one matmul per layer (ReLU between; dropout is identity at
        inference). This keeps the scoring hot path bandwidth-bound.
        """
        linears = [m for m in self.net if isinstance(m, nn.Linear)]
        out = []
        for i, lin in enumerate(linears):
            w, b = lin.weight.detach().double(), lin.bias.detach().double()
            if i == 0:
                std, mean = self.feature_std.double(), self.feature_mean.double()
                w = w / std
                b = b - w @ mean
            out.append((w.float().contiguous(), b.float().contiguous()))
        return out


# --------------------------------------------------------------------------- save / load


def save_estimator(model: ProximityEstimator, out_dir: Path, metadata: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` (atomically, weights first)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_safetensors_atomic(out_dir / WEIGHTS_FILE, state, metadata={"format": "pt", "midtrain": "proximity_estimator"})
    config = {
        "format_version": FORMAT_VERSION,
        "model_type": "midtrain_proximity_estimator",
        **model.architecture(),
        "score": "sigmoid(f((x - feature_mean) / feature_std)); positive class = VLA",
        **(metadata or {}),
    }
    write_json_atomic(out_dir / CONFIG_FILE, config)
    return out_dir


def read_estimator_config(path: Path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists() or not (path / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"{path}: not a proximity estimator directory (expected {CONFIG_FILE} and {WEIGHTS_FILE})")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "midtrain_proximity_estimator":
        raise ValueError(f"{cfg_path}: model_type is {cfg.get('model_type')!r}, not a midtrain proximity estimator")
    return cfg


def load_estimator(path: Path) -> ProximityEstimator:
    """Load a saved estimator (eval mode) from its directory."""
    cfg = read_estimator_config(path)
    model = ProximityEstimator(cfg["dim"], cfg["kind"], cfg.get("hidden") or [], cfg.get("dropout", 0.0))
    state = load_safetensors(Path(path) / WEIGHTS_FILE)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path / WEIGHTS_FILE}: weights do not match config.json (missing {missing}, unexpected {unexpected})")
    return model.eval()


# --------------------------------------------------------------------------- training


def stratified_split(n_pos: int, n_neg: int, val_fraction: float, rng: np.random.Generator):
    """Per-class permutations split into (train, val) index arrays, each class keeping
    ``val_fraction`` (at least one sample) for validation."""

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        perm = rng.permutation(n)
        n_val = max(1, int(round(val_fraction * n)))
        return np.sort(perm[n_val:]), np.sort(perm[:n_val])

    pos_tr, pos_val = split(n_pos)
    neg_tr, neg_val = split(n_neg)
    return pos_tr, pos_val, neg_tr, neg_val


def balanced_batches(n_pos: int, n_neg: int, batch_size: int, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch of class-balanced batches: ``batch_size // 2`` positives and as many negatives.

    An epoch is one pass over the larger class; the smaller class is cycled through fresh
    permutations, so every sample of both classes is seen (the smaller one repeatedly).
    """
    half = max(1, batch_size // 2)
    steps = math.ceil(max(n_pos, n_neg) / half)

    def stream(n: int) -> np.ndarray:
        reps = math.ceil(steps * half / n)
        return np.concatenate([rng.permutation(n) for _ in range(reps)])[: steps * half]

    pos, neg = stream(n_pos), stream(n_neg)
    for s in range(steps):
        yield pos[s * half : (s + 1) * half], neg[s * half : (s + 1) * half]


def mean_std(parts: list[tuple[np.ndarray, np.ndarray]], block: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and (population) std of the rows ``rows`` of each ``array``, accumulated
    in float64 over row blocks (no full-size temporary)."""
    dim = parts[0][0].shape[1]
    total, sq, n = np.zeros(dim), np.zeros(dim), 0
    for array, rows in parts:
        for s in range(0, len(rows), block):
            x = array[rows[s : s + block]].astype(np.float64)
            total += x.sum(0)
            sq += np.square(x).sum(0)
            n += len(x)
    mean = total / n
    return mean, np.sqrt(np.maximum(sq / n - mean**2, 0.0))


def _balanced_eval(model: ProximityEstimator, pos: torch.Tensor, neg: torch.Tensor) -> dict:
    """Class-balanced BCE (the training objective), balanced accuracy at s=0.5, and ROC AUC."""
    from sklearn.metrics import roc_auc_score

    bce = nn.functional.binary_cross_entropy_with_logits
    with torch.no_grad():
        lp, ln = model(pos), model(neg)
        loss = 0.5 * (bce(lp, torch.ones_like(lp)).item() + bce(ln, torch.zeros_like(ln)).item())
        acc = 0.5 * ((lp > 0).double().mean().item() + (ln <= 0).double().mean().item())
    y = np.concatenate([np.ones(len(lp)), np.zeros(len(ln))])
    auc = float(roc_auc_score(y, np.concatenate([lp.numpy(), ln.numpy()])))
    return {"loss": loss, "accuracy": acc, "auc": auc}


def train_estimator(
    positives: np.ndarray,
    negatives: np.ndarray,
    settings: TrainSettings,
    log: Callable[[str], None] | None = None,
) -> tuple[ProximityEstimator, dict]:
    """Fit the estimator on float32 feature matrices ``[n_pos, d]`` (VLA) and ``[n_neg, d]`` (VLM).

    Stratified held-out split (``val_fraction`` per class), standardiser fitted on the
    training split, AdamW on class-balanced batches, early stopping when the monitored
    validation metric (``settings.monitor``: AUC, higher is better, or loss) has not improved
    by ``min_delta`` for ``patience`` epochs (the earliest best epoch's weights are kept) or
    when the validation balanced accuracy reaches ``target_val_accuracy`` (that epoch's
    weights are kept). Deterministic for ``settings.seed`` (fixed thread count).

    Returns the model (eval mode) and metrics: ``val_auc``, ``val_accuracy``, ``val_loss``
    of the returned weights, ``best_epoch``, ``epochs_run``, ``stopped_because`` and
    ``curve`` (per epoch: train_loss, val_loss, val_accuracy, val_auc).
    """
    s = settings
    n_pos, n_neg = len(positives), len(negatives)
    if n_pos < 2 or n_neg < 2:
        raise ValueError(f"need at least 2 positives and 2 negatives to train with a held-out split, got {n_pos} and {n_neg}")
    dim = positives.shape[1]
    say = log or (lambda msg: None)
    rng = np.random.default_rng(s.seed)
    with torch_threads(s.num_threads):
        torch.manual_seed(s.seed)
        pos_tr, pos_val, neg_tr, neg_val = stratified_split(n_pos, n_neg, s.val_fraction, rng)
        P, N = torch.from_numpy(np.ascontiguousarray(positives, dtype=np.float32)), torch.from_numpy(
            np.ascontiguousarray(negatives, dtype=np.float32)
        )
        Pval, Nval = P[pos_val], N[neg_val]  # the training rows are indexed per batch, never copied
        mean, std = mean_std([(positives, pos_tr), (negatives, neg_tr)])
        model = ProximityEstimator(dim, s.model, s.hidden, s.dropout)
        model.set_standardiser(mean, std)
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
        bce = nn.functional.binary_cross_entropy_with_logits
        curve: list[dict] = []
        # the monitored metric as "lower is better"
        key = (lambda v: -v["auc"]) if s.monitor == "val_auc" else (lambda v: v["loss"])
        best, best_key = {"loss": math.inf, "auc": float("nan"), "accuracy": float("nan")}, math.inf
        best_state, best_epoch, wait, stopped = None, -1, 0, "max_epochs"
        for epoch in range(s.max_epochs):
            model.train()
            total, steps = 0.0, 0
            for bp, bn in balanced_batches(len(pos_tr), len(neg_tr), s.batch_size, rng):
                x = torch.cat([P[pos_tr[bp]], N[neg_tr[bn]]])
                y = torch.cat([torch.ones(len(bp)), torch.zeros(len(bn))])
                loss = bce(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
            model.eval()
            val = _balanced_eval(model, Pval, Nval)
            curve.append({"epoch": epoch, "train_loss": total / steps, "val_loss": val["loss"],
                          "val_accuracy": val["accuracy"], "val_auc": val["auc"]})  # fmt: skip
            say(f"epoch {epoch}: train_loss {total / steps:.4f} val_loss {val['loss']:.4f} "
                f"val_acc {val['accuracy']:.4f} val_auc {val['auc']:.4f}")  # fmt: skip
            if s.target_val_accuracy is not None and val["accuracy"] >= s.target_val_accuracy:
                best, best_epoch, best_state, stopped = val, epoch, None, "target_val_accuracy"
                break
            if key(val) < best_key - s.min_delta:
                best, best_key, best_epoch, wait = val, key(val), epoch, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                wait += 1
                if wait >= s.patience:
                    stopped = "patience"
                    break
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
    metrics = {
        "val_auc": best["auc"], "val_accuracy": best["accuracy"], "val_loss": best["loss"],
        "best_epoch": best_epoch, "epochs_run": len(curve), "stopped_because": stopped, "monitor": s.monitor,
        "n_train_pos": int(len(pos_tr)), "n_train_neg": int(len(neg_tr)),
        "n_val_pos": int(len(pos_val)), "n_val_neg": int(len(neg_val)),
        "curve": curve,
    }  # fmt: skip
    return model, metrics
