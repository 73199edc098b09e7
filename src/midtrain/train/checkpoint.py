"""Checkpoints that a killed run resumes from exactly, and the metrics log that goes with them.

Layout of ``<stage dir>/checkpoints/step-NNNNNN/``::

    <the task's save_pretrained output>   e.g. a Hugging Face model or LoRA adapter + processor
    trainer_state/
      weights.pt        trainable parameters and all buffers (full state dict, CPU)
      optimizer.pt      optimizer state (full, keyed by parameter name)
      scheduler.pt      learning-rate scheduler state
      rng-RRRRR.pt      python / numpy / torch (/ CUDA) RNG states of process R, as tensors
      state.json        step, global batch, processes, running log sums
      checksums.json    blake2b of every file of the checkpoint; written last

Nothing in a checkpoint is unpickled with code: every ``.pt`` part holds tensors, numbers and
strings only and loads with ``torch.load(weights_only=True)`` (a planted pickle is refused, never
run). A resume verifies the checksums of the newest checkpoint and, when a file is damaged
(truncated, rewritten), names it in a warning and resumes from the newest intact one.

Under FSDP (``train.fsdp``, :mod:`midtrain.train.fsdp`) ``weights.pt`` and ``optimizer.pt`` are
replaced by ``shard-RRRRR-of-PPPPP.safetensors`` per process and ``shards.json``.

A checkpoint is written into ``.step-NNNNNN.tmp/`` and renamed into place only when every file
of every process is on disk (fsync'd), so a directory named ``step-NNNNNN`` is always whole and
a killed save leaves only a hidden temporary that the next run deletes. Model and optimizer
states go through ``torch.distributed.checkpoint.state_dict`` (full state dicts gathered to the
main process, loaded back by name), the one API that reads the same for a single process, DDP
and FSDP-wrapped models.

Why the trainable weights are in ``trainer_state`` although the task saved the model beside
them: resuming needs no task-specific loader (the task may save an adapter, a merged model or a
policy directory), and frozen weights are not repeated. For full fine-tuning this is a second
copy of the weights; the optimizer state (two more copies) dominates either way.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..runs import StageError, follow_umask, hash_file, write_json_atomic
from .fsdp import is_sharded, is_sharded_checkpoint, load_sharded_state, save_sharded_state

STATE_DIR = "trainer_state"
CHECKSUMS = "checksums.json"
STEP_DIR = re.compile(r"step-(\d{6,})")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every complete checkpoint under ``root``, oldest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_DIR.fullmatch(p.name)
        if m and (p / STATE_DIR / "state.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _checksums(path: Path) -> dict[str, str]:
    return {f.relative_to(path).as_posix(): hash_file(f) for f in sorted(path.rglob("*"))
            if f.is_file() and f.relative_to(path).as_posix() != f"{STATE_DIR}/{CHECKSUMS}"}  # fmt: skip


def checkpoint_problem(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be resumed from (the damaged file named), or ``None`` if it is intact.

    With ``checksums.json`` every listed file must hash as recorded; a checkpoint from before
    checksums were written is checked by reading each of its parts."""
    sums_file = path / STATE_DIR / CHECKSUMS
    if not sums_file.is_file():
        return _unreadable_part(path)
    try:
        sums = json.loads(sums_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f"{sums_file}: unreadable ({exc})"
    for rel, digest in sums.items():
        f = path / rel
        if not f.is_file():
            return f"{f}: missing"
        if hash_file(f) != digest:
            return f"{f}: content differs from its checksum (truncated or rewritten)"
    return None


def _unreadable_part(path: Path) -> str | None:
    import torch

    state_dir = path / STATE_DIR
    for f in sorted(state_dir.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text())
            elif f.suffix == ".pt":
                torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read the part makes the checkpoint unusable
            return f"{f}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return None


def intact_checkpoints(root: Path, log) -> list[tuple[int, Path]]:
    """:func:`complete_checkpoints` up to the newest intact one: newer damaged ones are named in a
    warning and left out (a resume falls back to the newest checkpoint that verifies)."""
    found = complete_checkpoints(root)
    while found:
        problem = checkpoint_problem(found[-1][1])
        if problem is None:
            break
        log.warning("damaged checkpoint %s: %s; resuming from the previous intact checkpoint", found[-1][1], problem)
        found.pop()
    return found


def remove_partial_checkpoints(root: Path) -> list[str]:
    """Delete the temporaries of interrupted saves; returns their names."""
    gone = []
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".step-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                gone.append(p.name)
    return gone


def _save(obj: Any, path: Path) -> None:
    """``torch.save``; a write that fails (a full disk: torch reports it as a RuntimeError) is a
    one-line error naming the file."""
    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if "write" not in str(exc):
            raise
        why = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(exc).strip().splitlines()[-1])
        raise StageError(f"{path}: cannot write the checkpoint ({why}); is the disk full? "
                         "free space and rerun - the earlier checkpoints are intact and the run resumes from them") from None  # fmt: skip


def _fsync_tree(path: Path) -> None:
    for sub in sorted(path.rglob("*")):
        if sub.is_file():
            with open(sub, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [path, *sorted(p for p in path.rglob("*") if p.is_dir())]:
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _full_state(model, optimizer) -> tuple[dict, dict]:
    """Full (unsharded) model and optimizer state dicts on the main process, CPU tensors.
    A collective under DDP/FSDP: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def rng_state() -> dict[str, Any]:
    """The python / numpy / torch (/ CUDA) RNG states as tensors and numbers (loadable with ``weights_only``)."""
    import torch

    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }  # fmt: skip
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))  # fmt: skip
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(accelerator, root: Path, step: int, task, model, optimizer, scheduler, state: dict,
                    keep: int) -> Path:  # fmt: skip
    """Write checkpoint ``step`` atomically (every process calls this); returns its path.

    ``model`` / ``optimizer`` are the prepared (possibly wrapped) objects; the task saves its own
    directory from its unwrapped model on the main process. ``keep`` > 0 deletes older complete
    checkpoints beyond the newest ``keep``.
    """
    final = root / step_dir_name(step)
    tmp = root / f".{step_dir_name(step)}.tmp"
    main = accelerator.is_main_process
    if main:
        if tmp.exists():
            shutil.rmtree(tmp)
        (tmp / STATE_DIR).mkdir(parents=True)
    accelerator.wait_for_everyone()
    _save(rng_state(), tmp / STATE_DIR / f"rng-{accelerator.process_index:05d}.pt")
    if is_sharded(model):  # FSDP: every process writes its own shards (train/fsdp.py)
        save_sharded_state(accelerator, tmp, tmp / STATE_DIR, task, model, optimizer, _resume_names(model))
    else:
        weights, optim = _full_state(model, optimizer)
    if main and not is_sharded(model):
        task.save_pretrained(tmp)
        keep_names = _resume_names(accelerator.unwrap_model(model))
        _save({k: v for k, v in weights.items() if k in keep_names}, tmp / STATE_DIR / "weights.pt")
        _save(optim, tmp / STATE_DIR / "optimizer.pt")
    if main:
        _save(scheduler.state_dict(), tmp / STATE_DIR / "scheduler.pt")
    accelerator.wait_for_everyone()
    if main:
        write_json_atomic(tmp / STATE_DIR / "state.json", {**state, "step": step})
        follow_umask(tmp)
        write_json_atomic(tmp / STATE_DIR / CHECKSUMS, _checksums(tmp))
        _fsync_tree(tmp)
        if final.exists():  # a complete checkpoint of this step from an earlier attempt: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_tree_dir(root)
        if keep > 0:
            for _, old in complete_checkpoints(root)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _resume_names(model) -> set[str]:
    """State-dict names a resume must restore: trainable parameters and the persistent buffers (e.g.
    batch-norm statistics); frozen parameters are reloaded from the model the task starts from."""
    saved = set(model.state_dict().keys())  # persistent buffers only (not e.g. rotary inv_freq, rebuilt at init)
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    names |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    return names & saved


def load_checkpoint(accelerator, path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and this process's RNG from ``path``; returns state.json.

    Raises :class:`~midtrain.runs.StageError` naming the checkpoint when its files do not match
    the model being trained (a changed model or trainable set behind an unchanged config)."""
    state_dir = path / STATE_DIR
    state = _read_part(state_dir, "state.json")
    scheduler_state = _read_part(state_dir, "scheduler.pt")
    rng_name = f"rng-{accelerator.process_index:05d}.pt"
    rng = _read_part(state_dir, rng_name) if (state_dir / rng_name).exists() else None
    if is_sharded_checkpoint(state_dir):  # FSDP shards (train/fsdp.py)
        load_sharded_state(accelerator, state_dir, model, optimizer, _resume_names(model))
    else:
        _load_full_state(accelerator, state_dir, model, optimizer)
    scheduler.load_state_dict(scheduler_state)
    if rng is not None:
        set_rng_state(rng)
    return state


def _read_part(state_dir: Path, name: str):
    """One checkpoint part, tensors and plain data only; a file that is not is a one-line error naming it."""
    import torch

    f = state_dir / name
    try:
        if name.endswith(".json"):
            return json.loads(f.read_text())
        return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refused, truncated zip, bad JSON: all name the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise StageError(f"{f}: cannot resume from this checkpoint file ({type(exc).__name__}: {first}); "
                         "delete the checkpoint folder to resume from an older one, or rerun with --force") from None  # fmt: skip


def _load_full_state(accelerator, state_dir: Path, model, optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    weights = _read_part(state_dir, "weights.pt")
    optim = _read_part(state_dir, "optimizer.pt")
    expected = _resume_names(accelerator.unwrap_model(model))
    missing = sorted(expected - set(weights))
    if missing:
        raise StageError(f"{state_dir}: checkpoint lacks {len(missing)} trainable weight(s) of this model (first: {missing[0]}); "
                         "it was written for another model or trainable set - rerun with --force to start over")  # fmt: skip
    opts = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, weights, options=opts)
    set_optimizer_state_dict(model, optimizer, optim, options=opts)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed by the main process.

    On resume from step ``s`` the rows after ``s`` (written by the killed run after its last
    checkpoint) are dropped first, so the file reads as if the run had never stopped.
    """

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.fh = None
        if not enabled:
            return
        rows = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by the kill
                if row.get("step", 0) <= resume_step:
                    rows.append(line)
        from ..runs import write_text_atomic

        write_text_atomic(path, "".join(r + "\n" for r in rows))
        self.fh = open(path, "a")

    def write(self, row: dict) -> None:
        if self.fh is not None:
            self.fh.write(json.dumps(row) + "\n")
            self.fh.flush()

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def read_metrics(path: Path) -> list[dict]:
    """The rows of a ``metrics.jsonl``."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
