"""Checkpoints hold data, never code, and a damaged one is named and skipped: a planted pickle in
any part is refused without running, a truncated or rewritten file makes the resume fall back to
the newest intact checkpoint, bit for bit."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_loop import losses, run_toy
from toy_task import ToyTask

from midtrain.runs import StageError
from midtrain.train import Callback
from midtrain.train.checkpoint import CHECKSUMS, STATE_DIR, _checksums


class Payload:
    """Unpickling this runs ``os.system`` (what a hostile file in a shared run directory would do)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def crash_at(step):
    def crash(ctx):
        if ctx.step == step:
            raise KeyboardInterrupt("killed")

    return Callback(1, crash)


def cut_run(tmp_path, name, at=10):
    """A run killed at step ``at`` (checkpoints at 4 and 8); returns its partial folder."""
    with pytest.raises(KeyboardInterrupt):
        run_toy(tmp_path, name, steps=12, save_every=4, callbacks=[crash_at(at)])
    return tmp_path / name / ".partial" / "toy"


@pytest.mark.parametrize("part", ["weights.pt", "optimizer.pt", "scheduler.pt", "rng-00000.pt"])
def test_a_pickle_planted_in_any_checkpoint_part_is_refused_and_never_runs(tmp_path, part):
    cut = cut_run(tmp_path, "cut", at=6)
    ckpt = cut / "checkpoints" / "step-000004"
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, ckpt / STATE_DIR / part)
    (ckpt / STATE_DIR / CHECKSUMS).write_text(json.dumps(_checksums(ckpt)))  # the planter fixes the checksums too
    with pytest.raises(StageError, match=rf"{ckpt / STATE_DIR / part}: cannot resume from this checkpoint file \(Unpickl"):
        run_toy(tmp_path, "cut", steps=12, save_every=4)
    assert not marker.exists()


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damaged, checksums", [
    (f"{STATE_DIR}/optimizer.pt", True), (f"{STATE_DIR}/state.json", True), (f"{STATE_DIR}/weights.pt", True),
    ("toy_model.pt", True), (f"{STATE_DIR}/optimizer.pt", False),  # a checkpoint from before checksums
])  # fmt: skip
def test_a_damaged_newest_checkpoint_is_named_and_the_resume_falls_back_bit_for_bit(tmp_path, caplog, damaged, checksums):
    _, ref = run_toy(tmp_path, "ref", steps=12, save_every=4)
    cut = cut_run(tmp_path, "cut")
    newest = cut / "checkpoints" / "step-000008"
    _truncate(newest / damaged)
    if not checksums:
        for ckpt in (cut / "checkpoints").iterdir():
            (ckpt / STATE_DIR / CHECKSUMS).unlink()
    with caplog.at_level(logging.WARNING, logger="midtrain.toy"):
        result, resumed = run_toy(tmp_path, "cut", steps=12, save_every=4)
    assert result.resumed_from == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"damaged checkpoint {newest}: {newest / damaged}" in w for w in warnings), warnings
    assert losses(resumed) == losses(ref)
    w_ref = torch.load(ref / "checkpoints" / "step-000012" / "toy_model.pt")
    w_res = torch.load(resumed / "checkpoints" / "step-000012" / "toy_model.pt")
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_every_checkpoint_damaged_starts_over_with_a_warning_per_checkpoint(tmp_path, caplog):
    _, ref = run_toy(tmp_path, "ref", steps=12, save_every=4)
    cut = cut_run(tmp_path, "cut")
    for ckpt in (cut / "checkpoints").iterdir():
        _truncate(ckpt / STATE_DIR / "weights.pt")
    with caplog.at_level(logging.WARNING, logger="midtrain.toy"):
        result, resumed = run_toy(tmp_path, "cut", steps=12, save_every=4)
    assert result.resumed_from is None and losses(resumed) == losses(ref)
    assert sum("damaged checkpoint" in r.getMessage() for r in caplog.records) == 2



def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_the_earlier_checkpoints_resume(tmp_path, monkeypatch):
    _, ref = run_toy(tmp_path, "ref", steps=12, save_every=4)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step-000008" in str(path):
            raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StageError, match=r"step-000008.tmp/trainer_state/rng-00000.pt: cannot write the checkpoint "
                                         r"\(PytorchStreamWriter failed writing file data/0: file write failed\); is the disk full"):
        run_toy(tmp_path, "cut", steps=12, save_every=4)
    monkeypatch.undo()
    result, resumed = run_toy(tmp_path, "cut", steps=12, save_every=4)
    assert result.resumed_from == 4 and losses(resumed) == losses(ref)


class SafetensorsToyTask(ToyTask):
    """Saves its model as a library does (safetensors' own save: mode 0600 whatever the umask)."""

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(directory / "model.safetensors"))


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_checkpoint_files_follow_the_umask_while_the_run_is_going(tmp_path, umask, mode):
    import os

    old = os.umask(umask)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_toy(tmp_path, "cut", task=SafetensorsToyTask(), steps=12, save_every=4, callbacks=[crash_at(6)])
    finally:
        os.umask(old)
    ckpt = tmp_path / "cut/.partial/toy/checkpoints/step-000004"
    files = [p for p in ckpt.rglob("*") if p.is_file()]
    assert ckpt / "model.safetensors" in files
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: oct(mode) for p in files}
