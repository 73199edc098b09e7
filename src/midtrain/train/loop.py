"""The training loop shared by SFT (mid-training) and VLA policy training.

A task (:class:`TrainTask`) brings the model, the data and how to save itself; :func:`train`
does the rest, the same way for every task, on one process or many (``accelerate launch``).

The loss of an optimizer step is the weighted mean over everything the step saw, on every
process::

    L = sum_i w_i * l_i / sum_i w_i

where micro-batch ``i`` has loss ``l_i`` (the model's mean over its own units) and weight
``w_i = batch["loss_weight"]`` (the number of units: answer tokens for SFT; the number of
samples when the batch does not say). Each micro-batch is back-propagated with the factor
``w_i * P / sum w`` (``P`` processes; DDP averages gradients over processes), so the gradient
is that of ``L`` whatever the split into processes and accumulation steps: one process with
``grad_accum = 2`` and two processes with ``grad_accum = 1`` take the same step. Token-weighted
means (rather than a mean of per-batch means) are what torchtune and recent transformers
``Trainer`` versions use for SFT; they keep long answers from being down-weighted.

**Co-training streams** (:class:`AuxStream`, e.g. ETC / VQA next-token batches beside the action
batches of etc-two-bridges' Objective Bridging): the step's loss becomes ::

    L = L_task + sum_s lambda_s L_s,    L_s = sum_j w_j l_j / sum_j w_j  over stream s's micro-batches

Each stream contributes one micro-batch per accumulation step, forward and backward separately
(its activations are freed before the next pass), scaled by ``lambda_s w_j P / sum w``; the
stream's micro-batch for (step, process, accumulation index) is a pure function of those, like
the task's own, so resuming stays exact. ``loss`` in ``metrics.jsonl`` stays the task's loss;
each stream logs ``loss_<name>`` (and ``eval_loss_<name>`` on its held-out split).

Per step: ``grad_accum`` forward/backward passes (gradient sync only on the last), a check
that the loss is finite on every process, gradient clipping to ``max_grad_norm``, an AdamW
update, the learning-rate schedule; then, when due, a metrics row, a validation pass,
callbacks, and a checkpoint (last, so a resumed run restarts from a state that already
includes them). Data order, dropout and every other random draw are functions of the seed and
the restored state, so a run resumed after SIGKILL reproduces an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from ..runs import StageError
from .batches import BatchPlan, StepBatches, eval_batches
from .checkpoint import MetricsLog, complete_checkpoints, load_checkpoint, remove_partial_checkpoints, save_checkpoint
from .fsdp import fsdp_active, gather_into_plain_module, local_state_bytes, shard_model
from .settings import TrainSettings


@runtime_checkable
class TrainTask(Protocol):
    """What a training stage hands to :func:`train`.

    Required:

    - ``model``: an ``nn.Module`` with ``model(batch) -> (loss, logs)``: ``loss`` a scalar tensor
      (the mean over the batch's units), ``logs`` a dict of floats with the same keys for every
      batch (the lerobot policy contract; logged as weighted means like the loss);
    - ``train_dataset`` / ``eval_dataset``: map-style datasets (``len`` and ``[i]``); the
      evaluation one may be None;
    - ``collate(samples) -> batch``: a dict; ``batch["sample_ids"]`` names its samples (used in
      errors); optional ``batch["loss_weight"]`` (units the loss averages over; default the number
      of samples) and ``batch["num_tokens"]`` (non-padding tokens, for throughput). Tensors are
      moved to the device by the loop. ``collate`` runs in DataLoader workers: it must be a
      deterministic function of the samples (randomness belongs in the model's forward, whose RNG
      the checkpoints restore);
    - ``save_pretrained(directory)``: write the self-describing checkpoint (called on the main
      process only).

    Optional: ``lengths`` (token length per training sample, for length-grouped batches),
    ``eval_lengths``, ``evaluate(model, batches) -> dict`` (extra held-out metrics, called on
    every process with its share of the evaluation batches; values are averaged over processes),
    ``param_groups() -> list[dict]`` (AdamW groups: ``params`` plus optional ``weight_decay`` and
    ``lr_scale``), ``find_unused_parameters`` (bool, for DDP), ``gradient_checkpointing_enable()``
    on the model.
    """

    model: Any
    train_dataset: Any
    eval_dataset: Any

    def collate(self, samples: list) -> dict: ...

    def save_pretrained(self, directory: Path) -> None: ...


@dataclass
class StepContext:
    """What a callback sees: the step just finished, the unwrapped model, the accelerator and the
    stage directory. Callbacks run on every process (use ``accelerator.is_main_process``)."""

    step: int
    model: Any
    accelerator: Any
    stage_dir: Path


@dataclass
class Callback:
    """``fn(context) -> dict | None`` every ``every`` steps (and after the last step); returned
    numbers go to ``metrics.jsonl`` as ``{"step", "callback": name, ...}``. The VLA stage runs
    closed-loop evaluation here."""

    every: int
    fn: Callable[[StepContext], Optional[dict]]
    name: str = "callback"


@dataclass
class AuxStream:
    """A second stream of micro-batches trained in the same optimizer steps (see the module docstring).

    ``micro_batch(index)`` gives the dataset indices of the stream's ``index``-th micro-batch; the
    loop asks for ``index = (step P + rank) A + a`` (``P`` processes, ``A`` accumulation steps), so
    one process with ``A = 2`` sees what two processes with ``A = 1`` see between them.
    ``collate(samples) -> batch`` as the task's; the model's ``forward`` must recognise the
    stream's batches. ``eval_dataset`` / ``eval_batch_size``: a held-out split, evaluated with the
    task's validation (``eval_loss_<name>``).
    """

    name: str
    dataset: Any
    collate: Callable[[list], dict]
    micro_batch: Callable[[int], list]
    weight: float = 1.0
    eval_dataset: Any = None
    eval_batch_size: int = 8


class _StreamBatches:
    """A DataLoader ``batch_sampler`` of a stream's micro-batches for steps ``[first_step, end_step)`` of one process."""

    def __init__(self, stream: AuxStream, first_step: int, end_step: int, rank: int, processes: int, grad_accum: int):
        self.stream, self.first, self.end, self.rank, self.procs, self.accum = stream, first_step, end_step, rank, processes, grad_accum

    def __iter__(self):
        for step in range(self.first, self.end):
            for a in range(self.accum):
                yield list(self.stream.micro_batch((step * self.procs + self.rank) * self.accum + a))

    def __len__(self) -> int:
        return max(0, self.end - self.first) * self.accum


class TrainingDiverged(StageError):
    """The loss or the gradient norm became NaN/inf; the message names the step and the samples."""


@dataclass
class TrainResult:
    """What a finished :func:`train` did (the same on every process). ``final_checkpoint`` is where
    the last checkpoint will be once the stage completes (``<run>/<stage>/checkpoints/...``)."""

    steps: int
    resumed_from: Optional[int]
    final_checkpoint: Path
    train_loss: Optional[float]
    eval: dict = field(default_factory=dict)
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    processes: int = 1
    global_batch: int = 0
    parameters: dict = field(default_factory=dict)
    state_bytes: dict = field(default_factory=dict)  # per process: param_bytes, optimizer_bytes (local shards)


# --------------------------------------------------------------------------- pieces


def default_param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices, none on biases and norm/scale vectors (``ndim < 2``)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def _to_device(batch: dict, device) -> dict:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") and hasattr(v, "device") else v) for k, v in batch.items()}


def _weight(batch: dict) -> float:
    w = batch.get("loss_weight")
    return float(w) if w is not None else float(len(batch["sample_ids"]))


def _sum_over_processes(accelerator, values: list[float]) -> list[float]:
    """Sum a few float64 numbers over processes (one all-reduce)."""
    import torch

    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def _gather_objects(accelerator, obj) -> list:
    if accelerator.num_processes == 1:
        return [obj]
    import torch.distributed as dist

    out: list = [None] * accelerator.num_processes
    dist.all_gather_object(out, obj)
    return out


def _loader(task, dataset, batch_sampler, settings: TrainSettings, device, collate=None):
    """A DataLoader with its own generator, so creating it draws nothing from the global RNG."""
    import torch
    from torch.utils.data import DataLoader

    workers = settings.num_workers
    return DataLoader(
        dataset, batch_sampler=batch_sampler, collate_fn=collate or task.collate, num_workers=workers,
        generator=torch.Generator().manual_seed(settings.seed), pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers else None, persistent_workers=False,
    )  # fmt: skip


def _parameter_counts(model) -> dict:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": int(total), "trainable": int(trainable)}


# --------------------------------------------------------------------------- the loop


def train(task: TrainTask, settings: TrainSettings, st, *, accelerator=None,
          callbacks: Sequence[Callback] = (), streams: Sequence[AuxStream] = ()) -> TrainResult:  # fmt: skip
    """Train ``task`` for ``settings.steps`` optimizer steps, writing into ``st.dir``.

    ``st`` is the stage run (:func:`midtrain.runs.stage_run`, or the follower of
    :func:`~midtrain.train.distributed.distributed_stage` on non-main processes). Writes
    ``st.dir/metrics.jsonl`` and ``st.dir/checkpoints/step-NNNNNN/``; resumes from the newest
    complete checkpoint there. Raises :class:`TrainingDiverged` on a NaN/inf loss or gradient.
    ``streams``: co-training streams (:class:`AuxStream`) accumulated into the same steps.
    """
    import torch

    from .distributed import make_accelerator

    acc = accelerator or make_accelerator(settings.precision, find_unused_parameters=getattr(task, "find_unused_parameters", False))
    main, rank, procs = acc.is_main_process, acc.process_index, acc.num_processes
    ckpt_root = Path(st.dir) / "checkpoints"
    log = st.log

    # -- model, optimizer, schedule -----------------------------------------------------------
    model = task.model
    if settings.gradient_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if enable is None:
            raise StageError(f"train.gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable()")
        enable()
    counts = _parameter_counts(model)
    if fsdp_active(settings, acc):  # FSDP: shard before the optimizer sees the parameters (train/fsdp.py)
        model = shard_model(model, acc, getattr(task, "fsdp_forward_methods", ()))
    if counts["trainable"] == 0:
        raise StageError("nothing to train: every parameter of the model is frozen")
    groups = task.param_groups() if hasattr(task, "param_groups") else default_param_groups(model, settings.weight_decay)
    for g in groups:
        g["lr"] = settings.lr * g.pop("lr_scale", 1.0)
        g.setdefault("weight_decay", settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                                  weight_decay=settings.weight_decay)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda update: settings.lr_factor(update))
    if not fsdp_active(settings, acc):  # FSDP needs no DDP wrapper
        model, optimizer = acc.prepare(model, optimizer)
    plan = BatchPlan(len(task.train_dataset), settings.batch_size, settings.grad_accum, procs, settings.seed,
                     getattr(task, "lengths", None) if settings.group_by_length else None)  # fmt: skip

    # -- resume ---------------------------------------------------------------------------------
    if main:
        for name in remove_partial_checkpoints(ckpt_root):
            log.info("removed %s, the temporary of a checkpoint save that did not finish", name)
    acc.wait_for_everyone()
    found = complete_checkpoints(ckpt_root)
    start, state = 0, {}
    if found:
        step0, path = found[-1]
        state = load_checkpoint(acc, path, model, optimizer, scheduler)
        if state.get("global_batch") != plan.global_batch:
            raise StageError(
                f"{path}: checkpoint trained with a global batch of {state.get('global_batch')} "
                f"({state.get('processes')} process(es)); this run has {plan.global_batch} ({procs} x {settings.batch_size} x "
                f"{settings.grad_accum}) - resume with the same global batch, or --force to start over"
            )
        start = step0
        log.info("resuming from %s (step %d of %d)", path, start, settings.steps)
    else:
        torch.manual_seed(settings.seed + 7919 * rank)  # dropout etc.; differs per process like DDP's data
        np.random.seed((settings.seed + 7919 * rank) % 2**32)
    metrics = MetricsLog(Path(st.dir) / "metrics.jsonl", main, start if found else None)
    run = _Running.from_state(state)
    result_eval: dict = dict(state.get("last_eval", {}))

    def evaluate(step: int) -> dict:
        nonlocal result_eval
        if task.eval_dataset is None or len(task.eval_dataset) == 0:
            return {}
        result_eval = _evaluate(task, model, acc, settings, step, streams)
        if main:
            metrics.write({"step": step, **result_eval})
            log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in result_eval.items()))
        return result_eval

    def save(step: int) -> Path:
        path = save_checkpoint(acc, ckpt_root, step, task, model, optimizer, scheduler,
                               {**run.state(), "global_batch": plan.global_batch, "processes": procs,
                                "last_eval": result_eval}, settings.keep_checkpoints)  # fmt: skip
        if main:
            log.info("step %d: checkpoint %s", step, path)
        return path

    if start == 0 and settings.eval_every and task.eval_dataset is not None:
        evaluate(0)  # the starting point of the validation curve

    # -- steps ----------------------------------------------------------------------------------
    loader = iter(_loader(task, task.train_dataset, StepBatches(plan, start, settings.steps, rank), settings, acc.device))
    stream_loaders = [iter(_loader(task, s.dataset, _StreamBatches(s, start, settings.steps, rank, procs, settings.grad_accum),
                                   settings, acc.device, collate=s.collate)) for s in streams]  # fmt: skip
    t_start = time.perf_counter()
    final_path = found[-1][1] if found and start >= settings.steps else None
    for step in range(start + 1, settings.steps + 1):
        model.train()
        micro = [next(loader) for _ in range(settings.grad_accum)]
        weights = [_weight(b) for b in micro]
        side = [[next(it) for _ in range(settings.grad_accum)] for it in stream_loaders]
        side_w = [[_weight(b) for b in batches] for batches in side]
        total_w, *side_total = _sum_over_processes(acc, [sum(weights), *(sum(w) for w in side_w)])
        total_w = total_w or 1.0  # units the step's loss averages over
        # the streams' passes first, the task's last: the synced backward is a task batch (DDP)
        passes = [(b, w, s.weight * w * procs / (t or 1.0), k) for k, (s, batches, ws, t) in
                  enumerate(zip(streams, side, side_w, side_total)) for b, w in zip(batches, ws)]  # fmt: skip
        passes += [(b, w, w * procs / total_w, None) for b, w in zip(micro, weights)]
        loss_sum, bad_ids, step_tokens, logs_sum = 0.0, None, 0, {}
        side_sum = [0.0] * len(streams)
        for i, (batch, w, factor, k) in enumerate(passes):
            batch = _to_device(batch, acc.device)
            sync = contextlib.nullcontext() if i == len(passes) - 1 else acc.no_sync(model)
            with sync:  # gradients are all-reduced only after the step's last micro-batch
                with acc.autocast():
                    loss, logs = model(batch)
                acc.backward(loss * factor)
            value = float(loss.detach())
            if not math.isfinite(value) and bad_ids is None:
                bad_ids = list(batch["sample_ids"])
            if k is not None:
                side_sum[k] += value * w
                continue
            loss_sum += value * w
            step_tokens += int(batch.get("num_tokens", 0) or 0)
            for key, v in (logs or {}).items():
                logs_sum[key] = logs_sum.get(key, 0.0) + float(v) * w
        log_keys = sorted(logs_sum)  # the model returns the same keys for every batch, on every process
        step_loss_sum, step_tokens_all, n_samples, n_bad, *log_sums = _sum_over_processes(
            acc, [loss_sum, float(step_tokens), float(sum(len(b["sample_ids"]) for b in micro)), float(bad_ids is not None),
                  *side_sum, *(logs_sum[k] for k in log_keys)])  # fmt: skip
        side_loss, log_sums = log_sums[: len(streams)], log_sums[len(streams) :]
        if n_bad:
            bad = _gather_objects(acc, bad_ids)
            r = next(i for i, b in enumerate(bad) if b is not None)
            last = complete_checkpoints(ckpt_root)
            keep = f"; the last good checkpoint is {last[-1][1]}" if last else "; no checkpoint was written yet"
            raise TrainingDiverged(f"step {step}: the loss is not finite on a micro-batch of process {r} with samples "
                                   f"{', '.join(map(str, bad[r][:16]))}{keep} (lower train.lr or check those samples)")  # fmt: skip
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), settings.max_grad_norm or float("inf")))
        if not math.isfinite(grad_norm) and settings.precision != "fp16" and acc.mixed_precision != "fp16":
            last = complete_checkpoints(ckpt_root)
            keep = f"; the last good checkpoint is {last[-1][1]}" if last else ""
            raise TrainingDiverged(f"step {step}: the gradient norm is {grad_norm}{keep} (lower train.lr or train.max_grad_norm)")
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        run.add(step_loss_sum, total_w, grad_norm, step_tokens_all, n_samples, lr, dict(zip(log_keys, log_sums)),
                {s.name: (v, t) for s, v, t in zip(streams, side_loss, side_total)})  # fmt: skip

        if step % settings.log_every == 0 or step == settings.steps:
            row = run.row(step, plan.epoch_of(step), time.perf_counter() - t_start)
            metrics.write(row)
            if main:
                log.info("step %d/%d: loss %.4f, lr %.3g, grad_norm %.3g", step, settings.steps, row["loss"], row["lr"], row["grad_norm"])
        if (settings.eval_every and step % settings.eval_every == 0) or step == settings.steps:
            evaluate(step)
        for cb in callbacks:
            if (cb.every and step % cb.every == 0) or step == settings.steps:
                out = cb.fn(StepContext(step, acc.unwrap_model(model), acc, Path(st.dir)))
                if out and main:
                    metrics.write({"step": step, "callback": cb.name, **out})
        if (settings.save_every and step % settings.save_every == 0) or step == settings.steps:
            final_path = save(step)
    metrics.close()
    seconds = time.perf_counter() - t_start
    state_bytes = local_state_bytes(model, optimizer)  # this process's share of weights + optimizer states
    if fsdp_active(settings, acc):
        gather_into_plain_module(model, main)  # the stage saves the main process's model as without FSDP
    return TrainResult(
        steps=settings.steps, resumed_from=start if found else None,
        final_checkpoint=Path(getattr(st, "final_dir", None) or st.dir) / "checkpoints" / final_path.name,
        train_loss=run.last_loss, eval=result_eval, samples=int(run.samples_total), tokens=int(run.tokens_total),
        seconds=seconds, processes=procs, global_batch=plan.global_batch, parameters=counts, state_bytes=state_bytes,
    )  # fmt: skip


@dataclass
class _Running:
    """Sums since the last metrics row (saved in checkpoints, so rows after a resume are the same)."""

    loss: float = 0.0
    weight: float = 0.0
    grad_norm: float = 0.0
    steps: int = 0
    tokens: float = 0.0
    samples: float = 0.0
    logs: dict = field(default_factory=dict)
    lr: float = 0.0
    tokens_total: float = 0.0
    samples_total: float = 0.0
    last_loss: Optional[float] = None
    streams: dict = field(default_factory=dict)  # stream name -> [loss sum, weight] since the last row

    @classmethod
    def from_state(cls, state: dict) -> "_Running":
        return cls(**state.get("running", {}))

    def state(self) -> dict:
        return {"running": {k: getattr(self, k) for k in self.__dataclass_fields__}}

    def add(self, loss_sum, weight, grad_norm, tokens, samples, lr, logs, streams=None) -> None:
        self.loss += loss_sum
        self.weight += weight
        self.grad_norm += grad_norm
        self.steps += 1
        self.tokens += tokens
        self.samples += samples
        self.tokens_total += tokens
        self.samples_total += samples
        self.lr = lr
        for k, v in logs.items():
            self.logs[k] = self.logs.get(k, 0.0) + v
        for name, (v, w) in (streams or {}).items():
            acc = self.streams.setdefault(name, [0.0, 0.0])
            acc[0] += v
            acc[1] += w

    def row(self, step: int, epoch: float, elapsed: float) -> dict:
        loss = self.loss / self.weight
        row = {"step": step, "loss": loss, "lr": self.lr, "grad_norm": self.grad_norm / self.steps,
               "tokens": int(self.tokens_total), "samples": int(self.samples_total), "epoch": round(epoch, 4),
               "elapsed_s": round(elapsed, 3)}  # fmt: skip
        row.update({k: v / self.weight for k, v in self.logs.items()})
        row.update({f"loss_{name}": v / w for name, (v, w) in self.streams.items() if w})
        self.last_loss = loss
        self.loss = self.weight = self.grad_norm = self.tokens = self.samples = 0.0
        self.steps = 0
        self.logs = {}
        self.streams = {}
        return row


def _evaluate(task, model, acc, settings: TrainSettings, step: int, streams: Sequence[AuxStream] = ()) -> dict:
    """Weighted mean validation loss over this evaluation's fixed batches (all processes), and each
    stream's on its held-out split."""
    import torch

    batches = eval_batches(len(task.eval_dataset), settings.batch_size, settings.eval_batches, settings.seed,
                           acc.num_processes, acc.process_index, getattr(task, "eval_lengths", None),
                           equal_shares=fsdp_active(settings, acc))  # fmt: skip
    loader = _loader(task, task.eval_dataset, batches, settings, acc.device)
    model.eval()
    loss_sum = weight = tokens = 0.0
    collected = []
    with torch.no_grad():
        for batch in loader:
            batch = _to_device(batch, acc.device)
            with acc.autocast():
                loss, _ = model(batch)
            w = _weight(batch)
            loss_sum += float(loss) * w
            weight += w
            tokens += float(batch.get("num_tokens", 0) or 0)
            if hasattr(task, "evaluate"):
                collected.append(batch)
        extra = task.evaluate(acc.unwrap_model(model), collected) if hasattr(task, "evaluate") else {}
    loss_sum, weight, tokens = _sum_over_processes(acc, [loss_sum, weight, tokens])
    out = {"eval_loss": loss_sum / weight if weight else float("nan"), "eval_tokens": int(tokens)}
    if extra:
        keys = sorted(extra)
        summed = _sum_over_processes(acc, [float(extra[k]) for k in keys])
        out.update({f"eval_{k}" if not k.startswith("eval_") else k: v / acc.num_processes for k, v in zip(keys, summed)})
    for s in streams:
        if s.eval_dataset is None or not len(s.eval_dataset):
            continue
        batches = eval_batches(len(s.eval_dataset), s.eval_batch_size, settings.eval_batches, settings.seed,
                               acc.num_processes, acc.process_index, equal_shares=fsdp_active(settings, acc))  # fmt: skip
        s_loss = s_weight = 0.0
        with torch.no_grad():
            for batch in _loader(task, s.eval_dataset, batches, settings, acc.device, collate=s.collate):
                batch = _to_device(batch, acc.device)
                with acc.autocast():
                    loss, _ = model(batch)
                s_loss += float(loss) * _weight(batch)
                s_weight += _weight(batch)
        s_loss, s_weight = _sum_over_processes(acc, [s_loss, s_weight])
        out[f"eval_loss_{s.name}"] = s_loss / s_weight if s_weight else float("nan")
    model.train()
    return out
