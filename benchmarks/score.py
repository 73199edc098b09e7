"""Scoring throughput and memory: is ``midtrain score`` bandwidth-bound and flat in memory?

Builds a float16 feature run of 1M x 1024 (2 GB, in shards of 100k rows, in a temporary
directory that is deleted afterwards) and a linear proximity estimator, then measures:

1. Throughput of the scoring hot path (``score_feature_shard``: memory-mapped shards,
   standardisation folded into the linear layer) in GB/s of features, with the kernel
   the stage runs for ``kernel: <--kernel>`` (resolved by the stage's ``choose_kernel``,
   streamed in the stage's default chunk size for that kernel): ``compiled`` = the
   torch.compile'd fused float16 x float32 dot over 16,384-row chunks, ``eager`` =
   float16 -> float32 copy into a reused buffer + ``torch.mv`` per 1,024 rows. Measured
   against the memory-read bandwidth of a plain numpy pass over the same memory-mapped
   files in the same run (``np.add.reduce`` over each 1,024-row chunk viewed as uint64,
   which reads every byte at full speed). All are timed warm: the files are in the OS page
   cache after a warm-up pass of each (the warm-up also compiles the kernel, once per
   process; its time is reported as ``compile_s``), and every pass maps the files afresh,
   as the stage does. Best of ``--repeats`` alternating passes. The eager kernel is timed
   in the same rounds for comparison, and a naive scorer (whole shard -> float32 ->
   model) once.
2. Peak RSS of the whole ``score`` stage (``score_pool``, same ``kernel`` and threads) in
   a fresh child process at 100k and at 1M rows (the child's own ``VmHWM``); they should
   match within 10%. The child's wall time includes its compile.

Prints ratios, then one JSON line: ``{"bench": "score", ..., "fraction_of_peak": ..., "rss_ratio": ...}``.
``--quick`` uses 20k and 200k rows. ``--kernel`` defaults to ``compiled``: note that the
stage's ``kernel: auto`` picks ``eager`` for a pool this small (2 GB; see
``AUTO_COMPILE_MIN_BYTES``), printed as ``auto_kernel``. ``--threads`` sets the intra-op
threads of every pass and of the stage (default: the stage's default, 1).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from midtrain.config import StageConfig
from midtrain.data.features import shard_name, write_feature_shard
from midtrain.runs import RunDir, stage_run
from midtrain.devices import torch_threads
from midtrain.fit.estimator import ProximityEstimator, save_estimator
from midtrain.score.config import ScoreConfig
from midtrain.score.stage import score_feature_shard, score_pool
from midtrain.score import scorers as scorers_mod
from midtrain.score.scorers import ProximityScorer, choose_kernel

CHUNK_ROWS = 1024  # of the numpy read pass


@dataclass
class BenchFeatures(StageConfig):
    rows: int = 0
    dim: int = 1024
    shard_rows: int = 100_000


def build_feature_run(root: Path, rows: int, dim: int, shard_rows: int, seed: int = 0) -> RunDir:
    """A featurize stage of ``rows`` pool rows (float16 normal-ish features)."""
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((shard_rows, dim), dtype=np.float32)
    run = RunDir(root)
    with stage_run(run, "featurize", BenchFeatures(rows=rows, dim=dim, shard_rows=shard_rows)) as st:
        for s, start in enumerate(range(0, rows, shard_rows)):
            n = min(shard_rows, rows - start)
            feats = (block[:n] * (1.0 + 0.01 * s) + 0.05 * s).astype(np.float16)
            ids = pa.table({"id": [f"pool/{i:08d}" for i in range(start, start + n)], "source": ["pool"] * n, "kind": ["vlm"] * n})
            write_feature_shard(st.dir / "shards", shard_name(s), feats, ids)
        st.extra.update({"dim": dim, "model": "synthetic", "pooling": "mean"})
    return run


def subset_run(full: RunDir, root: Path, n_shards: int) -> RunDir:
    """A feature run with the first ``n_shards`` shards of ``full`` (hard links, no copy)."""
    run = RunDir(root)
    src = full.stage_dir("featurize") / "shards"
    cfg = BenchFeatures(rows=-n_shards)
    with stage_run(run, "featurize", cfg) as st:
        (st.dir / "shards").mkdir()
        for s in range(n_shards):
            for suffix in (".npy", ".ids.parquet", ".done"):
                os.link(src / f"{shard_name(s)}{suffix}", st.dir / "shards" / f"{shard_name(s)}{suffix}")
        st.extra.update({"dim": full.manifest("featurize")["dim"]})
    return run


def make_estimator(dim: int, out: Path, fingerprint: str) -> Path:
    import torch

    torch.manual_seed(0)
    model = ProximityEstimator(dim)
    torch.nn.init.normal_(model.net[0].weight, std=dim**-0.5)
    model.set_standardiser(np.full(dim, 0.1), np.full(dim, 1.1))
    return save_estimator(model, out, {"feature_fingerprint": fingerprint})


def read_pass(paths: list[Path]) -> float:
    """Plain numpy pass over every byte of the memory-mapped shards; returns seconds."""
    t0 = time.perf_counter()
    total = 0
    for p in paths:
        m = np.load(p, mmap_mode="r")
        for i in range(0, len(m), CHUNK_ROWS):
            total += int(np.add.reduce(m[i : i + CHUNK_ROWS].reshape(-1).view(np.uint64)))
        del m
    return time.perf_counter() - t0


def score_pass(scorer: ProximityScorer, paths: list[Path], ids: list[list[str]]) -> float:
    """The stage's per-shard call, in the scorer's default chunk size (the stage's when ``chunk_rows`` is unset)."""
    t0 = time.perf_counter()
    for p, shard_ids in zip(paths, ids):
        score_feature_shard(scorer, p, shard_ids)
    return time.perf_counter() - t0


def naive_pass(model, paths: list[Path]) -> float:
    """Whole shard -> float32 -> the torch module (standardise, linear, sigmoid)."""
    t0 = time.perf_counter()
    for p in paths:
        model.score(np.load(p).astype(np.float32))
    return time.perf_counter() - t0


def peak_rss_mb() -> float:
    """This process's peak resident set (``VmHWM``). Not ``getrusage``'s ``ru_maxrss``: on Linux
    that survives fork + exec, so a child would report at least its parent's RSS at the fork."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux


def child(run_dir: str, estimator: str, kernel: str, threads: int) -> None:
    """Run the score stage once and report its peak RSS (called in a fresh process)."""
    t0 = time.perf_counter()
    # the small run is a subset of the large one (another fingerprint) scored with the same estimator
    config = ScoreConfig(estimator=Path(estimator), kernel=kernel, num_threads=threads, allow_foreign_estimator=True)
    out = score_pool(config, RunDir(run_dir), force=True)
    wall = time.perf_counter() - t0
    man = json.loads((out / "manifest.json").read_text())
    print(json.dumps({"maxrss_mb": peak_rss_mb(), "wall_s": wall, "kernel": man["kernel"], "kernel_rows": man["kernel_rows"]}))


def stage_rss(run: RunDir, estimator: Path, kernel: str, threads: int) -> dict:
    env = {**os.environ, "MIDTRAIN_PROGRESS": "off"}
    out = subprocess.run([sys.executable, __file__, "--child", str(run.root), str(estimator), kernel, str(threads)],
                         capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20k / 200k rows instead of 100k / 1M")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernel", choices=scorers_mod.KERNELS, default="compiled", help="the score stage's `kernel` (default: compiled)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: the score stage's, 1)")
    ap.add_argument("--child", nargs=4, metavar=("RUN_DIR", "ESTIMATOR", "KERNEL", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.child[2], int(args.child[3]))
        return
    small, large = (20_000, 200_000) if args.quick else (100_000, 1_000_000)
    tmp = Path(tempfile.mkdtemp(prefix="midtrain-bench-score-"))
    try:
        t0 = time.perf_counter()
        full = build_feature_run(tmp / "full", large, args.dim, shard_rows=small)
        print(f"wrote {large:,} x {args.dim} float16 features ({large * args.dim * 2 / 1e9:.2f} GB) in {time.perf_counter() - t0:.1f}s")
        fp = full.manifest("featurize")["fingerprint"]
        est_dir = make_estimator(args.dim, tmp / "estimator", fp)
        from midtrain.data.features import open_features
        from midtrain.fit.estimator import load_estimator

        fs = open_features(full.stage_dir("featurize"))
        paths = [fs.shards_dir / f"{n}.npy" for n in fs.names]
        ids = [fs.ids(n).column("id").to_pylist() for n in fs.names]
        model = load_estimator(est_dir)
        nbytes = large * args.dim * 2
        kernel, why = choose_kernel(args.kernel, model.kind, nbytes)  # as the stage resolves `kernel`
        auto_kernel, _ = choose_kernel("auto", model.kind, nbytes)
        scorer = ProximityScorer(model, kernel, kernel_reason=why)
        eager = ProximityScorer(model, "eager")
        threads = args.threads or ScoreConfig().num_threads or 1  # the score stage's default for feature scorers: 1
        with torch_threads(threads):
            t0 = time.perf_counter()
            score_pass(scorer, paths[:1], ids[:1])  # the first chunk compiles the kernel (once per process)
            first_s = time.perf_counter() - t0
            read_pass(paths), score_pass(scorer, paths, ids), score_pass(eager, paths, ids)  # warm-up: page cache and buffers
            reads, scores, eagers = [], [], []
            for _ in range(args.repeats):
                reads.append(read_pass(paths))
                scores.append(score_pass(scorer, paths, ids))
                eagers.append(score_pass(eager, paths, ids))
            naive = naive_pass(model, paths)
        ran = scorer.describe()
        if ran["kernel"] != kernel:
            print(f"warning: the {kernel} kernel fell back to {ran['kernel']}: {ran.get('kernel_fallback')}")
        read_gbps, score_gbps, naive_gbps = nbytes / min(reads) / 1e9, nbytes / min(scores) / 1e9, nbytes / naive / 1e9
        eager_gbps = nbytes / min(eagers) / 1e9
        compile_s = scorers_mod._COMPILED.get("seconds") if ran["kernel"] == "compiled" else None
        print(f"kernel: {ran['kernel']} (--kernel {args.kernel}: {why}; `kernel: auto` would run {auto_kernel} here), "
              f"{scorer.default_chunk_rows:,}-row chunks, torch threads {threads}"
              + (f", compiled in {compile_s:.1f}s (first shard incl. compile {first_s:.1f}s)" if compile_s else ""))  # fmt: skip
        print(f"memory-read pass (numpy, memmap): {read_gbps:6.2f} GB/s   (passes: {', '.join(f'{t:.3f}s' for t in reads)})")
        print(f"scoring hot path ({ran['kernel']:>8}):      {score_gbps:6.2f} GB/s   (passes: {', '.join(f'{t:.3f}s' for t in scores)})")
        print(f"eager kernel, same rounds:        {eager_gbps:6.2f} GB/s   (passes: {', '.join(f'{t:.3f}s' for t in eagers)})")
        print(f"naive scorer (astype + module):   {naive_gbps:6.2f} GB/s")
        print(f"scoring / memory read = {score_gbps / read_gbps:.2f} (eager: {eager_gbps / read_gbps:.2f});  "
              f"scoring / naive = {score_gbps / naive_gbps:.1f}x")  # fmt: skip

        one_shard = subset_run(full, tmp / "small", 1)
        rss_small = stage_rss(one_shard, est_dir, args.kernel, threads)
        rss_large = stage_rss(full, est_dir, args.kernel, threads)
        for r in (rss_small, rss_large):
            if r["kernel"] != ran["kernel"]:
                print(f"warning: the stage ran the {r['kernel']} kernel, the hot-path passes {ran['kernel']}")
        print(f"score stage ({rss_large['kernel']} kernel) peak RSS: {rss_small['maxrss_mb']:.0f} MB at {small:,} rows, "
              f"{rss_large['maxrss_mb']:.0f} MB at {large:,} rows (ratio {rss_large['maxrss_mb'] / rss_small['maxrss_mb']:.3f}); "
              f"stage wall {rss_large['wall_s']:.2f}s at {large:,} rows" + (" (incl. compile)" if rss_large["kernel"] == "compiled" else ""))  # fmt: skip
        result = {
            "bench": "score", "rows": large, "dim": args.dim, "shard_rows": small, "kernel": ran["kernel"],
            "auto_kernel": auto_kernel, "chunk_rows": scorer.default_chunk_rows, "torch_threads": threads,
            "score_gbps": round(score_gbps, 3), "read_gbps": round(read_gbps, 3),
            "fraction_of_peak": round(score_gbps / read_gbps, 3), "eager_gbps": round(eager_gbps, 3),
            "eager_fraction_of_peak": round(eager_gbps / read_gbps, 3), "naive_gbps": round(naive_gbps, 3),
            "speedup_vs_naive": round(score_gbps / naive_gbps, 2), "rows_per_s": round(large / min(scores)),
            "compile_s": round(compile_s, 2) if compile_s else None,
            "rss_small_mb": round(rss_small["maxrss_mb"], 1), "rss_large_mb": round(rss_large["maxrss_mb"], 1),
            "rss_ratio": round(rss_large["maxrss_mb"] / rss_small["maxrss_mb"], 3),
            "stage_wall_s_large": round(rss_large["wall_s"], 2), "page_cache": "warm",
        }  # fmt: skip
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
