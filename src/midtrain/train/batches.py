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
                 lengths: Optional[np.ndarray] = None, equal_shares: bool = False) -> list[list[int]]:  # fmt: skip
    """This process's share of the evaluation micro-batches: a fixed seeded subset of
    ``max_batches x batch_size`` samples (0: all ``n``), sorted by length and cut into batches,
    batch ``j`` going to process ``j mod processes``. The same at every evaluation.
    ``equal_shares``: every process gets as many batches (FSDP runs each forward on all processes
    together), the last ``len mod processes`` batches are left out."""
    order = np.random.default_rng([seed, 1 << 30]).permutation(n)
    if max_batches:
        order = order[: max_batches * batch_size]
    if lengths is not None:
        order = order[np.argsort(-np.asarray(lengths)[order], kind="stable")]
    batches = [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    if equal_shares:
        batches = batches[: len(batches) // processes * processes]
    return batches[rank::processes]


class WeightedBatches:
    """Micro-batches drawn from several groups of samples by weight (a co-training stream), as a pure
    function of the seed and the micro-batch index, so a resumed run draws what an uninterrupted
    one would.

    The stream's slots ``k = 0, 1, 2, ...`` (micro-batch ``i`` holds slots ``i b .. (i + 1) b - 1``)
    each draw a group ``g_k`` with probability ``w_g`` (blocks of ``BLOCK`` slots drawn from
    ``default_rng([seed, block])``); a slot taking the ``j``-th use of group ``g`` gets that group's
    sample ``perm_{g, e}[j mod n_g]`` with ``e = j // n_g`` and ``perm_{g, e}`` a seeded permutation
    (``default_rng([seed, 1 + g, e])``): every group is visited in epochs of its own, independently
    of the others, and its share of the stream is ``w_g`` in expectation whatever its size.
    """

    BLOCK = 4096

    def __init__(self, groups: list[np.ndarray], weights: list[float], batch_size: int, seed: int):
        if len(groups) != len(weights) or not groups:
            raise ValueError("one weight per group, at least one group")
        keep = [i for i, (g, w) in enumerate(zip(groups, weights)) if w > 0]
        if not keep or any(len(groups[i]) == 0 for i in keep):
            raise ValueError("every group with a weight > 0 needs samples, and one weight must be > 0")
        self.groups = [np.asarray(groups[i], dtype=np.int64) for i in keep]
        self.group_ids = keep  # positions in the caller's list (the seeds use them: a group's epochs never depend on others)
        w = np.asarray([weights[i] for i in keep], dtype=np.float64)
        self.p = w / w.sum()
        self.batch_size, self.seed = batch_size, seed
        self._blocks: list[np.ndarray] = []  # group of every slot, block by block
        self._before: list[np.ndarray] = [np.zeros(len(self.groups), dtype=np.int64)]  # uses per group before each block
        self._perms: dict[int, tuple[int, np.ndarray]] = {}  # group -> (epoch, its permutation)

    def _block(self, b: int) -> np.ndarray:
        while len(self._blocks) <= b:
            k = len(self._blocks)
            g = np.random.default_rng([self.seed, k]).choice(len(self.groups), size=self.BLOCK, p=self.p)
            self._blocks.append(g)
            self._before.append(self._before[-1] + np.bincount(g, minlength=len(self.groups)))
        return self._blocks[b]

    def _sample(self, group: int, use: int) -> int:
        n = len(self.groups[group])
        epoch, j = divmod(use, n)
        cached = self._perms.get(group)
        if cached is None or cached[0] != epoch:
            cached = self._perms[group] = (epoch, np.random.default_rng([self.seed, 1 + self.group_ids[group], epoch]).permutation(n))
        return int(self.groups[group][cached[1][j]])

    def micro_batch(self, index: int) -> list[int]:
        """The ``index``-th micro-batch of the stream (dataset indices)."""
        out = []
        for k in range(index * self.batch_size, (index + 1) * self.batch_size):
            b, r = divmod(k, self.BLOCK)
            block = self._block(b)
            g = int(block[r])
            use = int(self._before[b][g] + np.count_nonzero(block[:r] == g))
            out.append(self._sample(g, use))
        return out
