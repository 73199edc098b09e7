"""Maximum Mean Discrepancy between datasets of features, all pairs at once.

Notation follows the paper: for datasets ``X`` (size ``n``) and ``Y`` (size ``m``) and a
Gaussian RBF kernel ``k(x, y) = exp(-||x - y||^2 / (2 sigma^2))`` (or a sum of such
kernels over several bandwidths),

    MMD^2(P, Q) = E k(x, x') - 2 E k(x, y) + E k(y, y').

The biased estimator replaces expectations by means over all pairs (diagonal included);
the unbiased U-statistic excludes the ``i = j`` terms of the within-dataset means.

Why this layout: for ``D`` datasets subsampled to ``n`` points each, every MMD^2 in the
``D x D`` matrix needs only kernel *sums* over dataset blocks of the pooled Gram matrix
``K`` (``N = D n`` rows). :func:`mmd_matrix` computes ``K`` tile by tile (one tile per
dataset pair, split into row chunks that fit the memory budget), each tile with one
matrix product in float32, and reduces it on the fly; no ``N x N`` matrix is ever held.
Permutation tests re-index the same tiles: a permutation of pair ``(a, b)`` is a 0/1
assignment vector ``u`` over the pair's ``n_a + n_b`` points, and the within/cross
kernel sums it needs are the quadratic form ``u^T K u`` and the linear form ``u^T K 1``,
which for ``P`` permutations at once are matrix products ``(U K) * U`` summed. Every
kernel value is computed once, whether or not permutations are run.

:func:`mmd_matrix_rff` is the linear-time alternative for very large subsamples: random
Fourier features ``z(x)`` with ``z(x) . z(y) ~ k(x, y)`` turn every kernel sum into a
dot product of per-dataset feature sums.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch

from ..devices import resolve_device

Statistic = Literal["unbiased", "biased"]


class GapInputError(ValueError):
    """A dataset cannot be compared (too few samples, wrong dimension, non-finite values).

    The message names the dataset."""


# --------------------------------------------------------------------------- kernels


def bandwidths(sigma: float, factors: Sequence[float] = (1.0,)) -> tuple[float, ...]:
    """The bandwidths of a multi-kernel: ``sigma * f`` for each factor (``(sigma,)`` by default)."""
    if not sigma > 0 or not math.isfinite(sigma):
        raise GapInputError(f"kernel bandwidth sigma must be a positive finite number, got {sigma!r}")
    return tuple(float(sigma) * float(f) for f in factors)


def _neg_half_sq_dists(
    x: torch.Tensor, y: torch.Tensor, half_sq_x: torch.Tensor, half_sq_y: torch.Tensor
) -> torch.Tensor:
    """``-||x_i - y_j||^2 / 2`` for all pairs, ``[n, m]``, with one matrix product.

    ``half_sq_*`` are ``||.||^2 / 2`` per row. Clamped at 0 from above (rounding can make
    a distance of near-duplicates slightly negative).
    """
    out = torch.addmm(half_sq_y[None, :], x, y.T, beta=-1.0)
    return out.sub_(half_sq_x[:, None]).clamp_(max=0.0)


def _exponent_factors(x: torch.Tensor, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``L = [gamma x, -gamma ||x||^2 / 2, gamma]`` and ``R = [x, 1, -||x||^2 / 2]`` (``[N, d + 2]``), so that
    ``L_i . R_j = -gamma ||x_i - x_j||^2 / 2``.

    The squared norms ride in the matrix product, so a kernel tile is one GEMM, a clamp and an
    ``exp`` (fewer passes over the tile than adding norm vectors after the product).
    """
    half_sq = 0.5 * (x * x).sum(1, keepdim=True)
    ones = torch.ones_like(half_sq)
    return torch.cat([x * gamma, -gamma * half_sq, ones * gamma], 1), torch.cat([x, ones, -half_sq], 1)


def _kernel_inplace(neg_half_sq: torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """``sum_s exp(-d^2 / (2 s^2))`` from ``-d^2/2``; overwrites the input for one bandwidth."""
    if len(sigmas) == 1:
        return neg_half_sq.mul_(1.0 / sigmas[0] ** 2).exp_()
    out = torch.exp(neg_half_sq * (1.0 / sigmas[0] ** 2))
    for s in sigmas[1:]:
        out.add_(torch.exp(neg_half_sq * (1.0 / s**2)))
    return out


def rbf_kernel(x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, sigmas: Sequence[float]) -> torch.Tensor:
    """Kernel matrix ``[n, m]`` (float32) between row sets ``x`` and ``y`` (small inputs)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y, dtype=torch.float32)
    g = _neg_half_sq_dists(x, y, 0.5 * (x * x).sum(1), 0.5 * (y * y).sum(1))
    return _kernel_inplace(g, tuple(sigmas))


def median_heuristic(features: np.ndarray | torch.Tensor, max_points: int = 2000, seed: int = 0) -> float:
    """Median Euclidean distance between distinct points of a seeded subsample of ``features``.

    ``features`` is ``[n, d]`` (the pooled subsample of all datasets, so one global
    bandwidth makes every pair comparable). At most ``max_points`` rows are used
    (``max_points^2 / 2`` distances); distances are computed in float64 and the diagonal
    (``i = j``) is excluded. Raises :class:`GapInputError` if the median is 0.
    """
    x = torch.as_tensor(np.asarray(features) if not isinstance(features, torch.Tensor) else features)
    n = x.shape[0]
    if n < 2:
        raise GapInputError(f"the median heuristic needs at least 2 points, got {n}")
    if n > max_points:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))
        x = x[torch.as_tensor(rows)]
    x = x.to(device="cpu", dtype=torch.float64)
    x = x - x.mean(0, keepdim=True)
    half_sq = 0.5 * (x * x).sum(1)
    neg_half = _neg_half_sq_dists(x, x, half_sq, half_sq)
    i, j = torch.triu_indices(x.shape[0], x.shape[0], offset=1)
    dists = torch.sqrt(-2.0 * neg_half[i, j]).numpy()
    median = float(np.median(dists))
    if not median > 0:
        raise GapInputError(
            "the median pairwise distance of the pooled features is 0 (duplicated or constant features); "
            "set a fixed `sigma` instead of the median heuristic"
        )
    return median


def mmd2_from_sums(s_xx, s_yy, s_xy, n: int, m: int, trace_x, trace_y, statistic: Statistic):
    """MMD^2 from kernel sums over ``X x X`` (diagonal included), ``Y x Y`` and ``X x Y``.

    ``trace_*`` are the diagonal sums ``sum_i k(x_i, x_i)``, which the unbiased estimator
    removes from the within sums (``n`` times the number of bandwidths for exact RBF
    kernels). Works elementwise on floats, arrays and tensors.
    """
    if statistic == "biased":
        return s_xx / (n * n) + s_yy / (m * m) - 2.0 * s_xy / (n * m)
    return (s_xx - trace_x) / (n * (n - 1)) + (s_yy - trace_y) / (m * (m - 1)) - 2.0 * s_xy / (n * m)


# --------------------------------------------------------------------------- inputs


def check_datasets(datasets: Mapping[str, np.ndarray | torch.Tensor]) -> dict[str, int]:
    """Validate datasets before comparing them; returns ``{name: rows}``.

    Every dataset needs at least 2 rows (the unbiased estimator divides by ``n (n - 1)``)
    and the same feature dimension as the others; errors name the dataset. (Finite values
    are checked when the datasets are pooled, from the column means.)
    """
    if len(datasets) < 2:
        raise GapInputError(f"MMD compares datasets pairwise; got {len(datasets)} dataset(s): {list(datasets)}")
    sizes: dict[str, int] = {}
    first: tuple[str, int] | None = None
    for name, arr in datasets.items():
        if arr.ndim != 2:
            raise GapInputError(f"dataset {name!r}: expected a [n, d] feature array, got shape {tuple(arr.shape)}")
        n, d = int(arr.shape[0]), int(arr.shape[1])
        if n < 2:
            raise GapInputError(f"dataset {name!r} has {n} sample(s); MMD needs at least 2 per dataset")
        if first is None:
            first = (name, d)
        elif d != first[1]:
            raise GapInputError(
                f"dataset {name!r} has feature dimension {d} but dataset {first[0]!r} has {first[1]}; "
                "all datasets must be featurized with the same model and pooling"
            )
        sizes[name] = n
    return sizes


def _raise_non_finite(datasets: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Name the first dataset with NaN/inf features (the slow path, after a cheap pooled check failed)."""
    for name, arr in datasets.items():
        finite = torch.isfinite(torch.as_tensor(arr)).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten()
            raise GapInputError(
                f"dataset {name!r} has non-finite (NaN/inf) features in {len(bad)} row(s), first at row {int(bad[0])}"
            )


@dataclass
class _Pooled:
    """Validated datasets stacked into one float32 ``[N, d]`` tensor ``x``, centred on the pooled mean.

    Raises :class:`GapInputError` naming the dataset if any feature is NaN/inf.

    Distances do not change under translation; centring shrinks the norms that the
    ``||x||^2 + ||y||^2 - 2 x.y`` expansion cancels, which keeps float32 accurate.
    """

    names: list[str]
    sizes: list[int]
    offsets: np.ndarray  # [D + 1]: dataset g is rows offsets[g]:offsets[g + 1] of x
    x: torch.Tensor
    device: torch.device
    sigmas: tuple[float, ...]
    started: float

    @classmethod
    def build(
        cls, datasets: Mapping[str, np.ndarray | torch.Tensor], sigmas: Sequence[float], device: str | torch.device
    ) -> "_Pooled":
        sizes = check_datasets(datasets)
        dev = torch.device(resolve_device(device)) if isinstance(device, str) else device
        started = time.perf_counter()
        pooled = torch.cat([torch.as_tensor(a, dtype=torch.float32) for a in datasets.values()]).to(dev)
        mean = pooled.mean(0)
        if not bool(torch.isfinite(mean).all()):  # any NaN/inf feature makes its column mean non-finite
            _raise_non_finite(datasets)
        pooled.sub_(mean)
        n = list(sizes.values())
        offsets = np.concatenate([[0], np.cumsum(n)]).astype(int)
        return cls(list(datasets), n, offsets, pooled, dev, tuple(float(s) for s in sigmas), started)

    def rows(self, g: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of dataset ``g``."""
        start = self.offsets[g]
        return self.x[start + r0 : start + (self.sizes[g] if r1 is None else r1)]


# --------------------------------------------------------------------------- permutations


def permutation_masks(n_a: int, n_b: int, permutations: int, seed: int, pair: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``[permutations + 1, n_a + n_b]`` bool: row 0 is the observed split (first ``n_a`` True),
    each further row a uniformly random relabelling with ``n_a`` True.

    Seeded by ``(seed, *pair)`` so every pair has its own reproducible permutations.
    """
    rng = np.random.default_rng([seed, 7919, *pair])
    observed = np.zeros(n_a + n_b, dtype=bool)
    observed[:n_a] = True
    masks = np.tile(observed, (permutations + 1, 1))
    if permutations:
        masks[1:] = rng.permuted(masks[1:], axis=1)
    return masks


@dataclass
class _PairPermutations:
    """Permutation assignments of one pair (bit-packed) and the sums accumulated over tiles."""

    a: int
    b: int
    n_a: int
    n_b: int
    packed: np.ndarray  # [P + 1, ceil((n_a + n_b) / 8)] uint8
    quad: torch.Tensor  # [P + 1] float64: u^T K u
    lin: torch.Tensor  # [P + 1] float64: u^T K 1

    def columns(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The assignments restricted to ``a``'s and to ``b``'s points: ``[P + 1, n_a]``, ``[P + 1, n_b]`` float32."""
        bits = torch.from_numpy(np.unpackbits(self.packed, axis=1, count=self.n_a + self.n_b))
        bits = bits.to(device=device, dtype=torch.float32)
        return bits[:, : self.n_a], bits[:, self.n_a :]

    def columns_of(self, group: int, device: torch.device) -> torch.Tensor:
        return self.columns(device)[0 if group == self.a else 1]


# --------------------------------------------------------------------------- results


@dataclass
class MMDMatrix:
    """All-pairs MMD^2 of ``D`` datasets (``[D, D]`` float64, symmetric, zero diagonal)."""

    names: list[str]
    sizes: list[int]
    sigmas: tuple[float, ...]
    mmd2_unbiased: np.ndarray
    mmd2_biased: np.ndarray
    statistic: Statistic
    method: str
    permutations: int = 0
    p_values: np.ndarray | None = None  # [D, D], diagonal 1.0
    null_mmd2: np.ndarray | None = None  # [D, D, P]: the statistic under each permutation
    flops: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def mmd2(self) -> np.ndarray:
        """The estimator chosen as ``statistic``."""
        return self.mmd2_unbiased if self.statistic == "unbiased" else self.mmd2_biased

    @property
    def mmd(self) -> np.ndarray:
        """``sqrt(max(MMD^2, 0))``: a distance on the scale of the features' kernel embedding."""
        return np.sqrt(np.clip(self.mmd2, 0.0, None))


def _p_values(stats: torch.Tensor) -> float:
    """``(1 + #{permuted >= observed}) / (1 + P)``; ``stats[0]`` is the observed statistic."""
    return float((1 + int((stats[1:] >= stats[0]).sum())) / stats.shape[0])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- exact, blockwise


def mmd_matrix(
    datasets: Mapping[str, np.ndarray | torch.Tensor],
    sigmas: Sequence[float],
    *,
    permutations: int = 0,
    statistic: Statistic = "unbiased",
    seed: int = 0,
    block_budget_mb: float = 512,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> MMDMatrix:
    """Exact MMD^2 (both estimators) between every pair of ``datasets``, with permutation p-values.

    ``datasets`` maps a name to a ``[n_i, d]`` array. The pooled Gram matrix is computed one
    dataset-pair tile at a time (row chunks of at most ``block_budget_mb`` per kernel
    buffer) in float32 on ``device`` and reduced to per-pair kernel sums as it goes.
    With ``permutations > 0`` each pair gets a p-value for ``statistic`` from that many
    random relabellings of its pooled points, computed from the same tiles.
    ``progress`` is called with 1 after each tile.
    """
    pool = _Pooled.build(datasets, sigmas, device)
    names, n, offsets, dev, sigmas = pool.names, pool.sizes, pool.offsets, pool.device, pool.sigmas
    D, d = len(names), pool.x.shape[1]
    k_self = float(len(sigmas))  # k(x, x) of a sum of RBF kernels
    budget_elems = max(1, int(block_budget_mb * 2**20 / 4 / (1 + (len(sigmas) > 1))))
    # One bandwidth: the tile product is the exponent -||x - y||^2 / (2 sigma^2) itself; several: -||x - y||^2 / 2.
    gamma = 1.0 / sigmas[0] ** 2 if len(sigmas) == 1 else 1.0
    left, right = _exponent_factors(pool.x, gamma)
    pool.x = None  # left/right hold the features; free the copy
    tile_sums = torch.zeros(D, D, dtype=torch.float64, device=dev)

    pairs: dict[tuple[int, int], _PairPermutations] = {}
    if permutations:
        for a in range(D):
            for b in range(a + 1, D):
                masks = permutation_masks(n[a], n[b], permutations, seed, (a, b))
                zeros = torch.zeros(permutations + 1, dtype=torch.float64, device=dev)
                pairs[a, b] = _PairPermutations(a, b, n[a], n[b], np.packbits(masks, axis=1), zeros, zeros.clone())
    gram_flops = perm_flops = 0.0
    perm_seconds = 0.0

    for g in range(D):
        # the permutation columns of every pair that contains g, for the diagonal tile
        diag_pairs = [p for key, p in pairs.items() if g in key]
        for h in range(g, D):
            chunk = max(1, budget_elems // n[h])
            for r0 in range(0, n[g], chunk):
                r1 = min(n[g], r0 + chunk)
                rows, cols = slice(offsets[g] + r0, offsets[g] + r1), slice(offsets[h], offsets[h + 1])
                exponent = torch.mm(left[rows], right[cols].T).clamp_(max=0.0)
                if g == h:  # exact self-distance 0, so k(x, x) = k_self as the estimators assume
                    idx = torch.arange(r1 - r0, device=dev)
                    exponent[idx, idx + r0] = 0.0
                kern = exponent.exp_() if len(sigmas) == 1 else _kernel_inplace(exponent, sigmas)
                row_sums = kern.sum(1)  # per-row float32 sums, then float64: ~1e-9 relative error
                tile_sums[g, h] += row_sums.sum(dtype=torch.float64)
                gram_flops += 2.0 * (r1 - r0) * n[h] * d
                if pairs:
                    t0 = time.perf_counter()
                    if g == h:
                        perm_flops += _accumulate_within(diag_pairs, g, kern, row_sums, r0, r1, budget_elems, dev)
                    else:
                        perm_flops += _accumulate_cross(pairs[g, h], kern, row_sums, r0, r1, dev)
                    _sync(dev)
                    perm_seconds += time.perf_counter() - t0
            if progress is not None:
                progress(1)
    _sync(dev)
    seconds_total = time.perf_counter() - pool.started

    sums = tile_sums.cpu().numpy()
    sums = (np.triu(sums) + np.triu(sums, 1).T).tolist()  # python floats: safe to mix with device tensors

    def pair_estimates(a: int, b: int):
        traces = (n[a] * k_self, n[b] * k_self)
        args = (sums[a][a], sums[b][b], sums[a][b], n[a], n[b], *traces)
        stats = None
        if pairs:  # u^T K u = s_xx and u^T K 1 = s_xx + s_xy of each relabelling u
            p = pairs[a, b]
            total = sums[a][a] + 2.0 * sums[a][b] + sums[b][b]
            stats = mmd2_from_sums(p.quad, total - 2.0 * p.lin + p.quad, p.lin - p.quad, n[a], n[b], *traces, statistic)
        return mmd2_from_sums(*args, "unbiased"), mmd2_from_sums(*args, "biased"), stats

    return _assemble(
        pool,
        pair_estimates,
        statistic,
        permutations,
        method="exact",
        flops={"gram": gram_flops, "permutations": perm_flops},
        seconds={"total": seconds_total, "permutations": perm_seconds, "gram": seconds_total - perm_seconds},
    )


def _assemble(
    pool: _Pooled,
    pair_estimates: Callable,
    statistic: Statistic,
    permutations: int,
    method: str,
    flops: dict,
    seconds: dict,
) -> MMDMatrix:
    """Fill the symmetric matrices from ``pair_estimates(a, b) -> (unbiased, biased, stats | None)``,
    where ``stats`` is ``[P + 1]`` with the observed statistic first."""
    D = len(pool.names)
    mmd2 = {"unbiased": np.zeros((D, D)), "biased": np.zeros((D, D))}
    p_values = np.ones((D, D)) if permutations else None
    null = np.zeros((D, D, permutations)) if permutations else None
    for a in range(D):
        for b in range(a + 1, D):
            unbiased, biased, stats = pair_estimates(a, b)
            mmd2["unbiased"][a, b] = mmd2["unbiased"][b, a] = float(unbiased)
            mmd2["biased"][a, b] = mmd2["biased"][b, a] = float(biased)
            if stats is not None:
                p_values[a, b] = p_values[b, a] = _p_values(stats)
                null[a, b] = null[b, a] = stats[1:].cpu().numpy()
    return MMDMatrix(
        names=pool.names,
        sizes=pool.sizes,
        sigmas=pool.sigmas,
        mmd2_unbiased=mmd2["unbiased"],
        mmd2_biased=mmd2["biased"],
        statistic=statistic,
        method=method,
        permutations=permutations,
        p_values=p_values,
        null_mmd2=null,
        flops=flops,
        seconds=seconds,
    )


def _accumulate_within(
    group_pairs: list[_PairPermutations],
    g: int,
    kern: torch.Tensor,
    row_sums: torch.Tensor,
    r0: int,
    r1: int,
    budget_elems: int,
    device: torch.device,
) -> float:
    """Add a chunk ``K[g_r0:r1, g]`` of a diagonal tile to every pair containing ``g``.

    For the pair's assignment ``u`` restricted to ``g``: ``u^T K_gg u`` gains
    ``sum((U[:, r] K_chunk) * U)`` and ``u^T K 1`` gains ``U[:, r] (K_chunk 1)``. Pairs are
    batched into one matrix product, as many as the budget allows. Returns flops done.
    """
    n_g = kern.shape[1]
    per_batch = max(1, budget_elems // (n_g * group_pairs[0].quad.shape[0]))
    flops = 0.0
    for i in range(0, len(group_pairs), per_batch):
        batch = group_pairs[i : i + per_batch]
        u = torch.cat([p.columns_of(g, device) for p in batch])  # [B (P+1), n_g]
        uk = u[:, r0:r1] @ kern
        quad = (uk * u).sum(1).double().split(batch[0].quad.shape[0])
        lin = (u[:, r0:r1] @ row_sums).double().split(batch[0].quad.shape[0])
        for p, q, lin_part in zip(batch, quad, lin):
            p.quad += q
            p.lin += lin_part
        flops += 2.0 * u.shape[0] * (r1 - r0) * n_g
    return flops


def _accumulate_cross(
    pair: _PairPermutations, kern: torch.Tensor, row_sums: torch.Tensor, r0: int, r1: int, device: torch.device
) -> float:
    """Add a chunk ``K[a_r0:r1, b]`` of the pair's cross tile (it appears twice in ``u^T K u``)."""
    u_a, u_b = pair.columns(device)
    u_a = u_a[:, r0:r1]
    pair.quad += 2.0 * ((u_a @ kern) * u_b).sum(1).double()
    pair.lin += (u_a @ row_sums).double() + (u_b @ kern.sum(0)).double()
    return 2.0 * u_a.shape[0] * (r1 - r0) * kern.shape[1]


# --------------------------------------------------------------------------- random Fourier features


class RandomFourierFeatures:
    """``z(x) = sqrt(2 / R) cos(W^T x + b)`` per bandwidth, concatenated, so ``z(x).z(y) ~ k(x, y)``.

    ``W ~ N(0, 1 / sigma^2)`` (``[d, R]``), ``b ~ U(0, 2 pi)``; ``R = num_features`` per bandwidth.
    """

    def __init__(self, dim: int, sigmas: Sequence[float], num_features: int, seed: int, device: torch.device):
        gen = torch.Generator().manual_seed(int(seed))
        self.sigmas = tuple(sigmas)
        self.weights = torch.cat(
            [torch.randn(dim, num_features, generator=gen, dtype=torch.float32) / s for s in self.sigmas], dim=1
        ).to(device)
        self.phases = (torch.rand(num_features * len(self.sigmas), generator=gen) * (2 * math.pi)).to(device)
        self.scale = math.sqrt(2.0 / num_features)

    @property
    def out_dim(self) -> int:
        return self.weights.shape[1]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.phases[None, :], x, self.weights).cos_().mul_(self.scale)


def mmd_matrix_rff(
    datasets: Mapping[str, np.ndarray | torch.Tensor],
    sigmas: Sequence[float],
    *,
    num_features: int = 2048,
    permutations: int = 0,
    statistic: Statistic = "unbiased",
    seed: int = 0,
    block_budget_mb: float = 512,
    device: str | torch.device = "cpu",
    progress: Callable[[int], None] | None = None,
) -> MMDMatrix:
    """Linear-time MMD^2 estimates from random Fourier features (for very large subsamples).

    Kernel sums become ``S_xy ~ (sum_x z(x)) . (sum_y z(y))`` and ``k(x, x) ~ ||z(x)||^2``,
    so cost is ``O(N d R)`` instead of ``O(N^2 d)``. Permutations re-index the feature
    matrix of each pair (``U Z``); features are kept in memory when they fit the budget
    and recomputed chunk by chunk otherwise. ``progress`` is called once per dataset and pair.
    """
    pool = _Pooled.build(datasets, sigmas, device)
    names, n, x, dev = pool.names, pool.sizes, pool.x, pool.device
    D = len(names)
    rff = RandomFourierFeatures(x.shape[1], pool.sigmas, num_features, seed, dev)
    budget_elems = max(1, int(block_budget_mb * 2**20 / 4))
    chunk = max(1, budget_elems // (2 * rff.out_dim))
    keep = x.shape[0] * rff.out_dim <= budget_elems
    cache: dict[int, torch.Tensor] = {}

    def feature_chunks(g: int) -> Iterator[tuple[int, torch.Tensor]]:
        if g in cache:
            yield 0, cache[g]
            return
        parts = []
        for r0 in range(0, n[g], chunk):
            z = rff(pool.rows(g, r0, min(n[g], r0 + chunk)))
            if keep:
                parts.append(z)
            yield r0, z
        if keep:
            cache[g] = torch.cat(parts)

    sum_z = torch.zeros(D, rff.out_dim, dtype=torch.float64, device=dev)
    sum_sq = torch.zeros(D, dtype=torch.float64, device=dev)  # sum_i ||z(x_i)||^2 ~ sum_i k(x_i, x_i)
    for g in range(D):
        for _, z in feature_chunks(g):
            sum_z[g] += z.sum(0)
            sum_sq[g] += (z * z).sum()
        if progress is not None:
            progress(1)
    dots = sum_z @ sum_z.T  # S_ab = (sum_a z) . (sum_b z), diagonal included

    def pair_estimates(a: int, b: int):
        args = (dots[a, a], dots[b, b], dots[a, b], n[a], n[b], sum_sq[a], sum_sq[b])
        stats = None
        if permutations:
            masks = torch.from_numpy(permutation_masks(n[a], n[b], permutations, seed, (a, b))).to(dev)
            s_x = torch.zeros(permutations + 1, rff.out_dim, dtype=torch.float64, device=dev)
            t_x = torch.zeros(permutations + 1, dtype=torch.float64, device=dev)
            for g, col0 in ((a, 0), (b, n[a])):
                for r0, z in feature_chunks(g):
                    u = masks[:, col0 + r0 : col0 + r0 + z.shape[0]].to(torch.float32)
                    s_x += (u @ z).double()
                    t_x += (u @ (z * z).sum(1)).double()
            s_y = (sum_z[a] + sum_z[b])[None, :] - s_x
            t_y = sum_sq[a] + sum_sq[b] - t_x
            s_xx, s_yy, s_xy = (s_x * s_x).sum(1), (s_y * s_y).sum(1), (s_x * s_y).sum(1)
            stats = mmd2_from_sums(s_xx, s_yy, s_xy, n[a], n[b], t_x, t_y, statistic)
        if progress is not None:
            progress(1)
        return mmd2_from_sums(*args, "unbiased"), mmd2_from_sums(*args, "biased"), stats

    result = _assemble(
        pool,
        pair_estimates,
        statistic,
        permutations,
        method=f"rff({num_features})",
        flops={"features": 2.0 * x.shape[0] * x.shape[1] * rff.out_dim},
        seconds={},
    )
    _sync(dev)
    result.seconds["total"] = time.perf_counter() - pool.started
    return result
