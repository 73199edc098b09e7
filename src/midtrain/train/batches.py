"""Which samples every micro-batch of every step holds: a pure function of the seed and the step.

The training data is an endless stream of epochs. Epoch ``e`` is a seeded permutation of the
``n`` training samples (``numpy.random.default_rng([seed, e])``) cut into ``n // b`` micro-batches
of ``b = batch_size`` samples (the ``n mod b`` left over are other samples in the next epoch's
permutation, as with ``drop_last``). With length grouping, the permutation is cut into
mega-batches of ``MEGABATCH x b`` samples, each sorted by token length, cut into micro-batches,
and the micro-batches of the epoch are shuffled again: every micro-batch holds samples of
similar length (little padding) while the order of batches stays random - the scheme of
``transformers``' ``LengthGroupedSampler``.

Step ``s`` (0-based) takes the ``P x A`` micro-batches ``s P A .. (s + 1) P A - 1`` of the stream
(``P`` processes, ``A = grad_accum``); process ``r`` gets ``A`` consecutive ones from ``r A``.
So one process with ``grad_accum = 2`` sees exactly the micro-batches that two processes with
``grad_accum = 1`` see between them, and a run resumed at step ``s`` continues with exactly the
batches an uninterrupted run would have used: no sampler state needs saving beyond the step.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

MEGABATCH = 50  # micro-batches per length-sorted mega-batch (transformers' LengthGroupedSampler uses 50)


class BatchPlan:
    """Micro-batches of sample indices for each (step, process), and the evaluation batches."""

    def __init__(self, n: int, batch_size: int, grad_accum: int, processes: int, seed: int,
                 lengths: Optional[np.ndarray] = None):  # fmt: skip
        if n < batch_size:
            raise ValueError(f"the training split has {n} samples, fewer than batch_size={batch_size}")
        self.n, self.batch_size, self.grad_accum, self.processes, self.seed = n, batch_size, grad_accum, processes, seed
        self.lengths = None if lengths is None else np.asarray(lengths)
        if self.lengths is not None and len(self.lengths) != n:
            raise ValueError(f"lengths has {len(self.lengths)} entries for {n} samples")
        self.per_epoch = n // batch_size  # micro-batches per epoch
        self._cache: tuple[int, np.ndarray] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    def epoch_batches(self, epoch: int) -> np.ndarray:
        """``[per_epoch, batch_size]`` sample indices of epoch ``epoch``, in training order."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.n)[: self.per_epoch * self.batch_size]
        if self.lengths is None:
            batches = order.reshape(self.per_epoch, self.batch_size)
        else:
            mega = MEGABATCH * self.batch_size
            chunks = [order[i : i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
            batches = order.reshape(self.per_epoch, self.batch_size)[rng.permutation(self.per_epoch)]
        self._cache = (epoch, batches)
        return batches

    def micro_batch(self, index: int) -> np.ndarray:
        """The ``index``-th micro-batch of the stream."""
        epoch, i = divmod(index, self.per_epoch)
        return self.epoch_batches(epoch)[i]

    def step_batches(self, step: int, rank: int) -> list[np.ndarray]:
        """The ``grad_accum`` micro-batches process ``rank`` trains on at ``step`` (0-based)."""
        first = (step * self.processes + rank) * self.grad_accum
        return [self.micro_batch(first + a) for a in range(self.grad_accum)]

    def iter_micro_batches(self, first_step: int, end_step: int, rank: int) -> Iterator[list[int]]:
        """Micro-batches (as lists, for a DataLoader's ``batch_sampler``) of steps ``[first_step, end_step)``."""
        for step in range(first_step, end_step):
            for batch in self.step_batches(step, rank):
                yield batch.tolist()

    def epoch_of(self, step: int) -> float:
        """Epochs completed after ``step`` steps (fractional)."""
        return step * self.processes * self.grad_accum / self.per_epoch


class StepBatches:
    """A DataLoader ``batch_sampler`` over steps ``[first_step, end_step)`` of a plan for one process."""

    def __init__(self, plan: BatchPlan, first_step: int, end_step: int, rank: int):
        self.plan, self.first_step, self.end_step, self.rank = plan, first_step, end_step, rank

    def __iter__(self) -> Iterator[list[int]]:
        return self.plan.iter_micro_batches(self.first_step, self.end_step, self.rank)

    def __len__(self) -> int:
        return max(0, self.end_step - self.first_step) * self.plan.grad_accum


def eval_batches(n: int, batch_size: int, max_batches: int, seed: int, processes: int, rank: int,
                 lengths: Optional[np.ndarray] = None) -> list[list[int]]:  # fmt: skip
    """This process's share of the evaluation micro-batches: a fixed seeded subset of
    ``max_batches x batch_size`` samples (0: all ``n``), sorted by length and cut into batches,
    batch ``j`` going to process ``j mod processes``. The same at every evaluation."""
    order = np.random.default_rng([seed, 1 << 30]).permutation(n)
    if max_batches:
        order = order[: max_batches * batch_size]
    if lengths is not None:
        order = order[np.argsort(-np.asarray(lengths)[order], kind="stable")]
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return batches[rank::processes]
