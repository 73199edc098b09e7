"""Rendering jobs in worker processes, results in job order.

Workers are started with ``spawn`` (never ``fork``): a forked child would inherit the parent's
imported MuJoCo/GL state. Each worker renders with llvmpipe limited to its share of the CPU
cores, so ``workers`` processes do not oversubscribe the machine.

As with any ``spawn`` pool, a Python script that calls a stage with ``workers > 1`` must
guard its entry point with ``if __name__ == "__main__":`` (the ``midtrain`` CLI does).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator, TypeVar

from ..runs import StageError

J = TypeVar("J")
R = TypeVar("R")


def _init_worker(gl_threads: int) -> None:
    os.environ.setdefault("LP_NUM_THREADS", str(gl_threads))  # llvmpipe rasteriser threads per process


def map_in_workers(fn: Callable[[J], R], jobs: Iterable[J], workers: int) -> Iterator[R]:
    """``map(fn, jobs)`` over ``workers`` spawned processes (in this process when ``workers``
    <= 1), yielding results in job order as they complete. ``fn`` must be a module-level
    function; a worker that dies (e.g. a crash in the GL driver) becomes a StageError."""
    jobs = list(jobs)
    if workers <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    workers = min(workers, len(jobs))
    gl_threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(
        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker, initargs=(gl_threads,),
    )  # fmt: skip
    try:
        yield from pool.map(fn, jobs)
    except BrokenProcessPool as exc:
        raise StageError(f"a rendering worker process died ({exc}); rerun with workers=1 to see its error") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
