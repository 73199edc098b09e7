"""A small regression task for the training loop's tests: fast, with dropout (so RNG state matters),
variable per-sample "lengths" (so length grouping has something to group) and per-batch weights."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from midtrain.config import StageConfig, option
from midtrain.train import TrainSettings


@dataclass
class ToyConfig(StageConfig):
    train: TrainSettings = option(factory=TrainSettings, help="training settings")
    n: int = option(96, "samples")


class ToyModel(torch.nn.Module):
    def __init__(self, dim: int = 8, dropout: float = 0.2, nan_after: int | None = None):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, 32), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(32, 1))
        self.frozen = torch.nn.Linear(dim, dim)
        self.frozen.requires_grad_(False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.nan_after = nan_after

    def forward(self, batch):
        if self.training:
            self.calls += 1
        pred = self.net(self.frozen(batch["x"]) + batch["x"]).squeeze(-1)
        err = (pred - batch["y"]).abs() * batch["w"]
        loss = err.sum() / batch["w"].sum()
        if self.nan_after is not None and self.training and int(self.calls) > self.nan_after:
            loss = loss * float("nan")
        return loss, {"mae": float(err.detach().mean())}


class ToyTask:
    def __init__(self, n: int = 96, dim: int = 8, seed: int = 0, nan_after: int | None = None, n_eval: int = 24):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n + n_eval, dim, generator=g)
        y = x @ torch.randn(dim, generator=g) + 0.1 * torch.randn(n + n_eval, generator=g)
        w = torch.randint(1, 5, (n + n_eval,), generator=g).float()  # units per sample (like answer tokens)
        rows = [{"id": f"toy/{i}", "x": x[i], "y": y[i], "w": w[i]} for i in range(n + n_eval)]
        self.train_dataset, self.eval_dataset = rows[:n], rows[n:]
        self.lengths = [int(r["w"]) for r in self.train_dataset]
        self.eval_lengths = [int(r["w"]) for r in self.eval_dataset]
        torch.manual_seed(seed)
        self.model = ToyModel(dim, nan_after=nan_after)

    def collate(self, samples):
        w = torch.stack([s["w"] for s in samples])
        return {"x": torch.stack([s["x"] for s in samples]), "y": torch.stack([s["y"] for s in samples]), "w": w,
                "sample_ids": [s["id"] for s in samples], "loss_weight": float(w.sum()), "num_tokens": int(w.sum())}

    def save_pretrained(self, directory: Path) -> None:
        torch.save(self.model.state_dict(), Path(directory) / "toy_model.pt")
