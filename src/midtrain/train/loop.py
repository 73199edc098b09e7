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
from .checkpoint import intact_checkpoints
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
    from .distributed import make_accelerator

    acc = accelerator or make_accelerator(settings.precision, find_unused_parameters=getattr(task, "find_unused_parameters", False))
    model, optimizer, scheduler, counts = _prepare_model(task, settings, acc)
    plan = BatchPlan(len(task.train_dataset), settings.batch_size, settings.grad_accum, acc.num_processes, settings.seed,
                     getattr(task, "lengths", None) if settings.group_by_length else None)  # fmt: skip
    loop = _Loop(task, settings, st, acc, model, optimizer, scheduler, plan, callbacks, streams)
    start, resumed = loop.resume()
    if start == 0 and settings.eval_every and task.eval_dataset is not None:
        loop.evaluate(0)  # the starting point of the validation curve

    data = _StepData(loop, start)
    t_start = time.perf_counter()
    final_path = resumed if resumed is not None and start >= settings.steps else None
    for step in range(start + 1, settings.steps + 1):
        model.train()
        sums = loop.accumulate(data.next_step())
        loop.raise_if_loss_diverged(step, sums)
        grad_norm = loop.clip_gradients(step)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loop.running.add(sums.loss, sums.weight, grad_norm, sums.tokens, sums.samples, lr, sums.logs,
                         {s.name: (v, t) for s, v, t in zip(streams, sums.stream_loss, sums.stream_weight)})  # fmt: skip
        final_path = loop.after_step(step, time.perf_counter() - t_start) or final_path
    loop.metrics.close()
    seconds = time.perf_counter() - t_start
    state_bytes = local_state_bytes(model, optimizer)  # this process's share of weights + optimizer states
    if fsdp_active(settings, acc):
        gather_into_plain_module(model, acc.is_main_process)  # the stage saves the main process's model as without FSDP
    return TrainResult(
        steps=settings.steps, resumed_from=start if resumed is not None else None,
        final_checkpoint=Path(getattr(st, "final_dir", None) or st.dir) / "checkpoints" / final_path.name,
        train_loss=loop.running.last_loss, eval=loop.last_eval, samples=int(loop.running.samples_total),
        tokens=int(loop.running.tokens_total), seconds=seconds, processes=acc.num_processes,
        global_batch=plan.global_batch, parameters=counts, state_bytes=state_bytes,
    )  # fmt: skip


def _prepare_model(task: TrainTask, settings: TrainSettings, acc):
    """``(model, optimizer, scheduler, parameter counts)``: gradient checkpointing if asked, AdamW
    over the task's parameter groups, the schedule, all prepared by the accelerator."""
    import torch

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
    return model, optimizer, scheduler, counts


@dataclass
class _MicroBatches:
    """What one optimizer step trains on (this process): the task's micro-batches and, per
    co-training stream, that stream's, each with its weight (units its loss averages over)."""

    task: list[dict]
    task_weights: list[float]
    streams: list[list[dict]]
    stream_weights: list[list[float]]


class _StepData:
    """The step-by-step micro-batches of the task and of every stream, from ``start`` on: pure
    functions of (seed, step, process, accumulation index), so a resumed run sees the same ones."""

    def __init__(self, loop: "_Loop", start: int):
        settings, acc, rank, procs = loop.settings, loop.acc, loop.acc.process_index, loop.acc.num_processes
        self.accum = settings.grad_accum
        self.task = iter(_loader(loop.task, loop.task.train_dataset, StepBatches(loop.plan, start, settings.steps, rank),
                                 settings, acc.device))  # fmt: skip
        self.streams = [iter(_loader(loop.task, s.dataset, _StreamBatches(s, start, settings.steps, rank, procs, self.accum),
                                     settings, acc.device, collate=s.collate)) for s in loop.streams]  # fmt: skip

    def next_step(self) -> _MicroBatches:
        task = [next(self.task) for _ in range(self.accum)]
        streams = [[next(it) for _ in range(self.accum)] for it in self.streams]
        return _MicroBatches(task, [_weight(b) for b in task], streams, [[_weight(b) for b in bs] for bs in streams])


@dataclass
class _StepSums:
    """What the micro-batches of one step add up to, summed over processes (``bad_ids``: this
    process's first micro-batch with a non-finite loss, if any)."""

    loss: float = 0.0  # sum of w_i l_i over the task's micro-batches
    weight: float = 0.0  # sum of w_i: the units the step's loss averages over
    tokens: float = 0.0
    samples: float = 0.0
    logs: dict = field(default_factory=dict)  # the model's logs, weighted sums
    stream_loss: list = field(default_factory=list)  # per stream: sum of w_j l_j
    stream_weight: list = field(default_factory=list)  # per stream: sum of w_j
    processes_with_bad_loss: float = 0.0
    bad_ids: Optional[list] = None


class _Loop:
    """The state one training run carries from step to step, and the steps of a step."""

    def __init__(self, task, settings, st, acc, model, optimizer, scheduler, plan, callbacks, streams):
        self.task, self.settings, self.st, self.acc = task, settings, st, acc
        self.model, self.optimizer, self.scheduler, self.plan = model, optimizer, scheduler, plan
        self.callbacks, self.streams = callbacks, streams
        self.ckpt_root = Path(st.dir) / "checkpoints"
        self.log = st.log
        self.main = acc.is_main_process
        self.running = _Running()
        self.last_eval: dict = {}
        self.metrics: Optional[MetricsLog] = None

    # -- resume ---------------------------------------------------------------------------------
    def resume(self) -> tuple[int, Optional[Path]]:
        """``(first step to run - 1, the checkpoint resumed from or None)``; restores the model,
        optimizer, schedule, RNG and running sums, or seeds the RNG of a fresh run."""
        import torch

        acc, settings, plan = self.acc, self.settings, self.plan
        if self.main:
            for name in remove_partial_checkpoints(self.ckpt_root):
                self.log.info("removed %s, the temporary of a checkpoint save that did not finish", name)
        acc.wait_for_everyone()
        found = intact_checkpoints(self.ckpt_root, self.log)
        start, state, path = 0, {}, None
        if found:
            start, path = found[-1]
            state = load_checkpoint(acc, path, self.model, self.optimizer, self.scheduler)
            if state.get("global_batch") != plan.global_batch:
                raise StageError(
                    f"{path}: checkpoint trained with a global batch of {state.get('global_batch')} "
                    f"({state.get('processes')} process(es)); this run has {plan.global_batch} ({acc.num_processes} x "
                    f"{settings.batch_size} x {settings.grad_accum}) - resume with the same global batch, or --force to start over"
                )
            self.log.info("resuming from %s (step %d of %d)", path, start, settings.steps)
        else:
            rank = acc.process_index
            torch.manual_seed(settings.seed + 7919 * rank)  # dropout etc.; differs per process like DDP's data
            np.random.seed((settings.seed + 7919 * rank) % 2**32)
        self.metrics = MetricsLog(Path(self.st.dir) / "metrics.jsonl", self.main, start if found else None)
        self.running = _Running.from_state(state)
        self.last_eval = dict(state.get("last_eval", {}))
        return start, path

    # -- one accumulation step ------------------------------------------------------------------
    def accumulate(self, micro: _MicroBatches) -> _StepSums:
        """Forward and backward every micro-batch of one optimizer step: the streams' first, the
        task's last (gradients are all-reduced only after the last, a task batch, as DDP needs),
        each loss scaled so the gradient is that of the step's loss (module docstring)."""
        acc, procs = self.acc, self.acc.num_processes
        task_total, *stream_totals = _sum_over_processes(acc, [sum(micro.task_weights), *(sum(w) for w in micro.stream_weights)])
        task_total = task_total or 1.0  # units the step's loss averages over
        out = _StepSums(weight=task_total, stream_weight=stream_totals)
        stream_loss = [0.0] * len(self.streams)
        for k, (stream, batches, weights, total) in enumerate(zip(self.streams, micro.streams, micro.stream_weights, stream_totals)):
            for batch, w in zip(batches, weights):
                value, _ = self._forward_backward(batch, stream.weight * w * procs / (total or 1.0), sync=False, sums=out)
                stream_loss[k] += value * w
        loss, tokens, logs = 0.0, 0, {}
        for i, (batch, w) in enumerate(zip(micro.task, micro.task_weights)):
            value, batch_logs = self._forward_backward(batch, w * procs / task_total, sync=i == len(micro.task) - 1, sums=out)
            loss += value * w
            tokens += int(batch.get("num_tokens", 0) or 0)
            for key, v in (batch_logs or {}).items():
                logs[key] = logs.get(key, 0.0) + float(v) * w
        log_keys = sorted(logs)  # the model returns the same keys for every batch, on every process
        out.loss, out.tokens, out.samples, out.processes_with_bad_loss, *rest = _sum_over_processes(
            acc, [loss, float(tokens), float(sum(len(b["sample_ids"]) for b in micro.task)), float(out.bad_ids is not None),
                  *stream_loss, *(logs[k] for k in log_keys)])  # fmt: skip
        out.stream_loss, out.logs = rest[: len(self.streams)], dict(zip(log_keys, rest[len(self.streams) :]))
        return out

    def _forward_backward(self, batch: dict, factor: float, sync: bool, sums: _StepSums) -> tuple[float, dict]:
        """One micro-batch: ``backward(loss * factor)``; the gradient all-reduce only when ``sync``."""
        acc, model = self.acc, self.model
        batch = _to_device(batch, acc.device)
        with contextlib.nullcontext() if sync else acc.no_sync(model):
            with acc.autocast():
                loss, logs = model(batch)
            acc.backward(loss * factor)
        value = float(loss.detach())
        if not math.isfinite(value) and sums.bad_ids is None:
            sums.bad_ids = list(batch["sample_ids"])
        return value, logs

    # -- divergence -----------------------------------------------------------------------------
    def raise_if_loss_diverged(self, step: int, sums: _StepSums) -> None:
        """Stop on a non-finite loss on any process, naming the step, the process and its samples."""
        if not sums.processes_with_bad_loss:
            return
        bad = _gather_objects(self.acc, sums.bad_ids)
        r = next(i for i, b in enumerate(bad) if b is not None)
        last = complete_checkpoints(self.ckpt_root)
        keep = f"; the last good checkpoint is {last[-1][1]}" if last else "; no checkpoint was written yet"
        raise TrainingDiverged(f"step {step}: the loss is not finite on a micro-batch of process {r} with samples "
                               f"{', '.join(map(str, bad[r][:16]))}{keep} (lower train.lr or check those samples)")  # fmt: skip

    def clip_gradients(self, step: int) -> float:
        """Clip to ``max_grad_norm``; stop on a non-finite norm (fp16 skips such steps itself)."""
        settings, acc = self.settings, self.acc
        grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), settings.max_grad_norm or float("inf")))
        if not math.isfinite(grad_norm) and settings.precision != "fp16" and acc.mixed_precision != "fp16":
            last = complete_checkpoints(self.ckpt_root)
            keep = f"; the last good checkpoint is {last[-1][1]}" if last else ""
            raise TrainingDiverged(f"step {step}: the gradient norm is {grad_norm}{keep} (lower train.lr or train.max_grad_norm)")
        return grad_norm

    # -- after a step: metrics, validation, callbacks, checkpoint --------------------------------
    def after_step(self, step: int, elapsed: float) -> Optional[Path]:
        """What is due after ``step``; returns the checkpoint written, if one was (last, so a resumed
        run restarts from a state that already includes the rest)."""
        settings, last = self.settings, step == self.settings.steps
        if step % settings.log_every == 0 or last:
            row = self.running.row(step, self.plan.epoch_of(step), elapsed)
            self.metrics.write(row)
            if self.main:
                self.log.info("step %d/%d: loss %.4f, lr %.3g, grad_norm %.3g", step, settings.steps, row["loss"], row["lr"],
                              row["grad_norm"])  # fmt: skip
        if (settings.eval_every and step % settings.eval_every == 0) or last:
            self.evaluate(step)
        for cb in self.callbacks:
            if (cb.every and step % cb.every == 0) or last:
                out = cb.fn(StepContext(step, self.acc.unwrap_model(self.model), self.acc, Path(self.st.dir)))
                if out and self.main:
                    self.metrics.write({"step": step, "callback": cb.name, **out})
        if (settings.save_every and step % settings.save_every == 0) or last:
            return self.save(step)
        return None

    def evaluate(self, step: int) -> dict:
        if self.task.eval_dataset is None or len(self.task.eval_dataset) == 0:
            return {}
        self.last_eval = _evaluate(self.task, self.model, self.acc, self.settings, step, self.streams)
        if self.main:
            self.metrics.write({"step": step, **self.last_eval})
            self.log.info("step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in self.last_eval.items()))
        return self.last_eval

    def save(self, step: int) -> Path:
        path = save_checkpoint(self.acc, self.ckpt_root, step, self.task, self.model, self.optimizer, self.scheduler,
                               {**self.running.state(), "global_batch": self.plan.global_batch,
                                "processes": self.acc.num_processes, "last_eval": self.last_eval},
                               self.settings.keep_checkpoints)  # fmt: skip
        if self.main:
            self.log.info("step %d: checkpoint %s", step, path)
        return path


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
