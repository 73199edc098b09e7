"""Proximity scorers behind one interface: higher score = closer to the VLA data.

Two families:

- ``FeatureScorer`` (``proximity``, ``random``, ``mean_distance``) scores chunks of raw
  float16 feature rows;
- ``CatalogScorer`` (``vla_perplexity``, ``delta_perplexity``) scores catalog rows
  (text + images) with VLMs; see ``midtrain.score.perplexity``.

Every scorer returns a dict of float columns with at least ``score``; ``order_column``
names the column selection ranks by and uses as a log-weight for Gumbel-top-K
sampling (the estimator's ``logit`` = log density ratio, which unlike the sigmoid
score never saturates to exact ties near 1).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from typing import Callable, Sequence

import numpy as np
import torch
from scipy.special import expit

from ..fit.estimator import ProximityEstimator

_log = logging.getLogger("midtrain.select")

KERNELS = ("auto", "compiled", "eager")
EAGER_CHUNK_ROWS = 1024
"""Rows per streamed chunk (and per float32 block) for the eager kernel."""
COMPILED_CHUNK_ROWS = 16384
"""Rows per streamed chunk for the compiled kernel (32 MiB of float16 at d=1024): its
per-call overhead (~50 us through torch.compile's guards and wrapper; 25% of a 1,024-row
chunk) is then under 2% of a chunk, and the chunk is still a view of the memory map
(pages released behind it as before), so memory does not grow with it."""
MIN_COMPILED_ROWS = 16
"""Chunks with fewer rows (a shard's tail) go through the eager kernel: the compiled one is
traced with dynamic sizes, and torch.compile specialises (re-compiles) on sizes 0 and 1."""
AUTO_COMPILE_MIN_BYTES = 64 << 30
"""``kernel: auto`` compiles when the pool's features are at least this large. The compile
costs ~4-7 s per process with inductor's on-disk cache warm and ~11-14 s cold (measured on
2 shared cores with g++); it saves ~0.06-0.12 s per GB of features scored from a warm page
cache (eager 4-7 GB/s, compiled 7-12 GB/s, one thread; ``benchmarks/score.py``), so it
repays itself from roughly 50-100 GB. A pool streamed from disk is read-bound with either
kernel, and a small pool finishes before the compile would."""


class FeatureScorer:
    """Scores ``[n, d]`` float16 feature chunks.

    ``score_chunk`` fills the arrays of ``out`` (one per name in ``columns``, length n) in
    place; ``finalize`` derives further columns once per shard (keeps per-chunk work minimal).
    """

    name = "feature"
    order_column = "score"
    columns: tuple[str, ...] = ("score",)
    default_chunk_rows = EAGER_CHUNK_ROWS  # rows per streamed chunk when the config leaves it unset

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        raise NotImplementedError

    def finalize(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return cols

    def describe(self) -> dict:
        return {"scorer": self.name, "order_column": self.order_column}


# --------------------------------------------------------------------------- proximity kernels

def _fused_dot(x16: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x16.float() @ w + b`` fused: each float16 row is widened and multiplied in registers
    with float32 accumulation, without a float32 copy of the chunk."""
    return (x16.float() * w).sum(-1) + b


_COMPILED: dict = {}  # the process-wide compiled kernel: {"fn", "seconds"} or {"error", "seconds"}
_COMPILE_LOCK = threading.Lock()


def compiled_dot(dim: int, log: logging.Logger | None = None) -> tuple[Callable | None, str | None]:
    """The ``torch.compile``'d fused kernel, compiled lazily once per process: ``(fn, None)``,
    or ``(None, reason)`` if it cannot be had (no C++ compiler, inductor error, or a probe
    result that disagrees with float64), logged once as a warning.

    The kernel is traced with dynamic sizes, so other chunk sizes and feature dimensions
    reuse it; the probe call (which makes inductor generate and build the C++ kernel) has
    17 rows and ``max(dim, 2)`` columns, sizes that torch.compile does not specialise on.
    """
    with _COMPILE_LOCK:
        if not _COMPILED:
            t0 = time.perf_counter()
            try:
                fn = torch.compile(_fused_dot, dynamic=True)
                gen = torch.Generator().manual_seed(0)
                d = max(int(dim), 2)
                x = torch.randn(17, d, generator=gen).half()
                w, b = torch.randn(d, generator=gen), torch.tensor(0.25)
                with torch.no_grad():
                    got = fn(x, w, b)
                ref = x.double() @ w.double() + 0.25
                bound = 2 * d * 2.0**-24 * ((x.double().abs() @ w.double().abs()) + 0.25)  # fp32 dot error bound
                if got.dtype != torch.float32 or not bool(((got.double() - ref).abs() <= bound).all()):
                    raise RuntimeError("the compiled kernel disagrees with a float64 reference on a probe chunk")
                _COMPILED.update(fn=fn)
            except Exception as exc:  # noqa: BLE001 - any inductor / C++ toolchain failure means "use eager"
                reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
                _COMPILED.update(error=reason)
                (log or _log).warning("compiled scoring kernel unavailable (%s); scoring with the eager float32 copy + torch.mv kernel", reason)
            _COMPILED["seconds"] = time.perf_counter() - t0
        return _COMPILED.get("fn"), _COMPILED.get("error")


def choose_kernel(kernel: str, estimator_kind: str, pool_bytes: int) -> tuple[str, str]:
    """Resolve ``kernel`` (``auto`` / ``compiled`` / ``eager``) to ``(kernel, why)``."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel != "auto":
        return kernel, "set in the config"
    if estimator_kind != "linear":
        return "eager", f"auto: the compiled kernel covers the linear estimator only (this one is {estimator_kind})"
    if pool_bytes < AUTO_COMPILE_MIN_BYTES:
        return "eager", f"auto: {pool_bytes / 2**30:.2f} GiB of features is under {AUTO_COMPILE_MIN_BYTES >> 30} GiB, too little to repay the compile"
    return "compiled", f"auto: {pool_bytes / 2**30:.1f} GiB of features repays the compile"


class ProximityScorer(FeatureScorer):
    """``s(x) = sigmoid(f(x))`` of a trained estimator, with the standardiser folded into
    the first layer (``ProximityEstimator.folded_layers``). Two kernels, same result up to
    float32 rounding:

    - ``eager``: per block of ``EAGER_CHUNK_ROWS`` rows, one float16->float32 copy into a
      reused buffer plus one matmul per layer, written straight into the output;
    - ``compiled`` (linear estimator only): the fused ``_fused_dot`` (float16 rows widened
      in registers, float32 accumulation) from ``torch.compile``, compiled lazily on the
      first chunk, once per process, over ``COMPILED_CHUNK_ROWS``-row chunks. If it cannot
      be compiled (or fails later) the scorer falls back to ``eager``, logged once, and
      ``describe()`` records the kernel that ran and why.

    Columns: ``logit`` (float32, the log density-ratio estimate) and, per shard,
    ``score`` = sigmoid(logit) in float64.
    """

    name = "proximity"
    order_column = "logit"
    columns = ("logit",)

    def __init__(self, model: ProximityEstimator, kernel: str = "eager", *, kernel_reason: str = "",
                 log: logging.Logger | None = None):  # fmt: skip
        if kernel not in ("compiled", "eager"):
            raise ValueError(f"ProximityScorer kernel must be 'compiled' or 'eager' (resolve 'auto' with choose_kernel), got {kernel!r}")
        self.dim = model.dim
        self.kind = model.kind
        self.layers = model.folded_layers()
        self.log = log or _log
        self.kernel_requested, self.kernel_reason = kernel, kernel_reason
        self.kernel = kernel  # the kernel that runs (may fall back to eager)
        self.fallback: str | None = None
        if kernel == "compiled" and self.kind != "linear":
            self._fall_back(f"the compiled kernel covers the linear estimator only (this one is {self.kind})")
        elif kernel == "compiled" and self.dim < 2:
            self._fall_back("1-dim features")  # torch.compile would specialise on the size 1
        self.default_chunk_rows = COMPILED_CHUNK_ROWS if self.kernel == "compiled" else EAGER_CHUNK_ROWS
        self.buffer = torch.empty(EAGER_CHUNK_ROWS, self.dim, dtype=torch.float32)
        self._fn: Callable | None = None
        self.rows_by_kernel = {"compiled": 0, "eager": 0}
        if self.kind == "linear":
            w, b = self.layers[0]
            self._w, self._b = w[0].contiguous(), b[0].clone()

    def _fall_back(self, reason: str) -> None:
        self.kernel, self.fallback = "eager", reason
        self.log.info("proximity scorer: using the eager kernel (%s)", reason)

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        n = len(x16)
        x = torch.from_numpy(x16)
        logit = torch.from_numpy(out["logit"][:n])
        with torch.no_grad():
            if self.kernel == "compiled" and n >= MIN_COMPILED_ROWS:
                if self._fn is None:
                    self._fn, error = compiled_dot(self.dim, self.log)
                    if error is not None:
                        self._fall_back(f"compile failed: {error}")
                if self._fn is not None:
                    try:
                        logit.copy_(self._fn(x, self._w, self._b))
                        self.rows_by_kernel["compiled"] += n
                        return
                    except Exception as exc:  # noqa: BLE001 - e.g. a re-compile for new shapes that fails
                        reason = f"{type(exc).__name__}: {str(exc).strip()[:200]}"
                        self.log.warning("compiled scoring kernel failed (%s); falling back to the eager kernel", reason)
                        self._fn = None
                        self._fall_back(f"compiled kernel failed: {reason}")
            self._score_eager(x, logit)
            self.rows_by_kernel["eager"] += n

    def _score_eager(self, x: torch.Tensor, logit: torch.Tensor) -> None:
        """Blocks of at most ``EAGER_CHUNK_ROWS`` rows through one reused float32 buffer."""
        step = len(self.buffer)
        for s in range(0, len(x), step):
            xb = x[s : s + step]
            buf = self.buffer[: len(xb)]
            buf.copy_(xb)
            lb = logit[s : s + len(xb)]
            if len(self.layers) == 1:
                w, b = self.layers[0]
                torch.mv(buf, w[0], out=lb)
                lb.add_(b[0])
            else:
                h = buf
                for i, (w, b) in enumerate(self.layers):
                    h = torch.addmm(b, h, w.T)
                    if i < len(self.layers) - 1:
                        h = h.relu_()
                lb.copy_(h[:, 0])

    def finalize(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"score": expit(cols["logit"].astype(np.float64)), "logit": cols["logit"]}

    def logits(self, x16: np.ndarray) -> np.ndarray:
        out = {"logit": np.empty(len(x16), np.float32)}
        self.score_chunk(np.ascontiguousarray(x16, dtype=np.float16), [], out)
        return out["logit"]

    def describe(self) -> dict:
        info = {**super().describe(), "kernel": self.kernel, "kernel_requested": self.kernel_requested,
                "kernel_reason": self.kernel_reason, "kernel_rows": dict(self.rows_by_kernel)}  # fmt: skip
        if self.fallback:
            info["kernel_fallback"] = self.fallback
        if self.kernel == "compiled" and "seconds" in _COMPILED:
            info["kernel_compile_s"] = round(_COMPILED["seconds"], 2)
        return info


class RandomScorer(FeatureScorer):
    """Uniform [0, 1) scores from a hash of ``(seed, id)``: the same sample gets the same
    score whatever the shard layout, and a different seed gives an independent draw."""

    name = "random"

    def __init__(self, seed: int):
        self.salt = f"midtrain-random:{seed}:".encode()

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        words = np.fromiter(
            (int.from_bytes(hashlib.blake2b(self.salt + i.encode(), digest_size=8).digest(), "little") for i in ids),
            dtype=np.uint64,
            count=len(ids),
        )
        out["score"][: len(ids)] = (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


class MeanDistanceScorer(FeatureScorer):
    """``score = -mean_j ||x - y_j||_2`` over the VLA reference rows ``y`` (or over the
    ``knn`` nearest ones), computed blockwise with ``torch.cdist``; closer = higher."""

    name = "mean_distance"

    def __init__(self, reference: np.ndarray, knn: int | None = None, block_rows: int = 1024):
        self.reference = torch.from_numpy(np.ascontiguousarray(reference, dtype=np.float32))
        self.dim = self.reference.shape[1]
        self.knn = knn
        self.block_rows = block_rows

    def score_chunk(self, x16: np.ndarray, ids: Sequence[str], out: dict[str, np.ndarray]) -> None:
        x = torch.from_numpy(np.asarray(x16, dtype=np.float32))
        for s in range(0, len(x), self.block_rows):
            d = torch.cdist(x[s : s + self.block_rows], self.reference)
            if self.knn is not None:
                d = torch.topk(d, min(self.knn, d.shape[1]), dim=1, largest=False).values
            out["score"][s : s + len(d)] = -d.double().mean(dim=1).numpy()

    def describe(self) -> dict:
        return {**super().describe(), "reference_rows": len(self.reference), "knn": self.knn}
