"""Cost of content fingerprints in the catalog stage, on the demo's world.

The catalog gives every row a ``content_hash`` and records the files its rows name, so a
replaced image is noticed (``midtrain.data.content``). This measures what that costs on
the demo's sources (`midtrain demo` defaults: Meta-World LeRobot frames + 4 synthetic
LLaVA pools with PNG images by path), in one process, interleaved:

- ``off``: the same stage with fingerprinting disabled (rows hashed to null, no
  references written, no check before a rerun) - the baseline;
- ``stat``: the default (size + mtime per referenced file);
- ``verify``: ``verify_references: true`` (full content hash per referenced file).

For each: a full build in a fresh run directory, and a rerun that finds nothing to do
(where the references check is the added cost). The catalogs must hold the same rows
apart from ``content_hash`` (checked). Whole-stage times on a busy machine are noisy, so
the fingerprint work is also timed alone on the same rows and files (``hash_rows_s``:
``RowHasher`` over every row; ``check_s``: ``changed_references`` over every part),
and given as a fraction of the baseline build.

    python benchmarks/catalog_fingerprints.py [--world DIR] [--repeats 3]

The world (sim collect + sim pool with the demo's settings) is built into ``--world`` if
it is not there. Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

import midtrain.catalog.stage as build
from midtrain.config import load_config
from midtrain.data.catalog import iter_catalog
from midtrain.data.content import RowHasher, changed_references
from midtrain.experiments.demo import DemoConfig, _stage_configs
from midtrain.runs import RunDir
from midtrain.stages import STAGES


def build_world(world: Path) -> dict:
    """Run the demo's sim collect and sim pool into ``world``; return the demo's catalog config."""
    run = RunDir(world)
    cfg = DemoConfig()
    for name in ("sim collect", "sim pool"):
        config_cls, fn = STAGES[name].load()
        fn(load_config(config_cls, base=_stage_configs(cfg, run, "unused")[name]), run)
    return _stage_configs(cfg, run, "unused")["catalog"]


class _NoHash:
    """Fingerprinting disabled: the baseline."""

    def __init__(self, verify: bool):
        pass

    def __call__(self, row: dict) -> None:
        return None

    def references(self):
        from midtrain.data.content import REFERENCES_SCHEMA

        return REFERENCES_SCHEMA.empty_table()


@contextlib.contextmanager
def fingerprints_off():
    saved = build.RowHasher, build._changed_since_complete, build._references_changed
    build.RowHasher, build._changed_since_complete, build._references_changed = _NoHash, lambda *a: None, lambda *a: None
    try:
        yield
    finally:
        build.RowHasher, build._changed_since_complete, build._references_changed = saved


def run_catalog(base: dict, run_dir: Path, mode: str) -> float:
    config_cls, fn = STAGES["catalog"].load()
    cfg = load_config(config_cls, base={**base, "verify_references": mode == "verify"})
    with fingerprints_off() if mode == "off" else contextlib.nullcontext():
        t0 = time.perf_counter()
        fn(cfg, RunDir(run_dir))
        return time.perf_counter() - t0


def rows_without_hash(out: Path) -> pa.Table:
    cols = [c for c in build.CATALOG_SCHEMA.names if c != "content_hash"]
    return pa.Table.from_batches(list(iter_catalog(out, columns=cols)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=Path, default=Path(tempfile.gettempdir()) / "midtrain-demo-world")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    base = build_world(args.world)
    base["on_error"] = "raise"
    scratch = Path(tempfile.mkdtemp(prefix="catalog-fp-"))
    modes = ("off", "stat", "verify")
    full: dict[str, list[float]] = {m: [] for m in modes}
    rerun: dict[str, list[float]] = {m: [] for m in modes}
    outs = {}
    try:
        for r in range(args.repeats):
            for mode in modes:
                run_dir = scratch / f"{mode}-{r}"
                full[mode].append(run_catalog(base, run_dir, mode))
                rerun[mode].append(run_catalog(base, run_dir, mode))
                outs[mode] = run_dir / "catalog"
                print(f"repeat {r} {mode:6s} build {full[mode][-1]:6.2f} s  nothing-to-do rerun {rerun[mode][-1]:6.3f} s")
        rows = [r for b in iter_catalog(outs["stat"]) for r in b.to_pylist()]
        references = sorted(outs["stat"].glob("*/references-*.parquet"))
        alone: dict[str, dict[str, list[float]]] = {m: {"hash_rows_s": [], "check_s": []} for m in ("stat", "verify")}
        for _ in range(args.repeats):
            for mode in ("stat", "verify"):
                t0 = time.perf_counter()
                hasher = RowHasher(verify=mode == "verify")
                for row in rows:
                    hasher(row)
                alone[mode]["hash_rows_s"].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                changed_references(references, verify=mode == "verify")
                alone[mode]["check_s"].append(time.perf_counter() - t0)
        tables = {m: rows_without_hash(outs[m]) for m in modes}
        same_rows = tables["off"].equals(tables["stat"]) and tables["off"].equals(tables["verify"])
        n_rows = tables["off"].num_rows
        refs = sum(pq.read_metadata(p).num_rows for p in outs["stat"].glob("*/references-*.parquet"))
        manifest = json.loads((outs["stat"] / "manifest.json").read_text())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    med = {m: statistics.median(full[m]) for m in modes}
    med_rerun = {m: statistics.median(rerun[m]) for m in modes}
    print(f"{n_rows} rows ({manifest['num_rows']} in the manifest), {refs} referenced files; same rows: {same_rows}")
    for m in ("stat", "verify"):
        print(f"{m:6s} build {med[m]:.2f} s vs {med['off']:.2f} s off: x{med[m] / med['off']:.3f}; "
              f"rerun {med_rerun[m]:.3f} s vs {med_rerun['off']:.3f} s (+{med_rerun[m] - med_rerun['off']:.3f} s)")  # fmt: skip
    work = {m: {k: statistics.median(v) for k, v in alone[m].items()} for m in alone}
    for m in ("stat", "verify"):
        print(f"{m:6s} alone: hashing {len(rows)} rows {work[m]['hash_rows_s']:.3f} s "
              f"({work[m]['hash_rows_s'] / med['off']:.1%} of the baseline build), "
              f"checking {refs} references {work[m]['check_s']:.3f} s")  # fmt: skip
    print(json.dumps({
        "bench": "catalog_fingerprints", "rows": n_rows, "referenced_files": refs, "same_rows": same_rows,
        "repeats": args.repeats, "build_s": {m: round(v, 3) for m, v in med.items()},
        "build_ratio": {m: round(med[m] / med["off"], 3) for m in ("stat", "verify")},
        "nothing_to_do_rerun_s": {m: round(v, 3) for m, v in med_rerun.items()},
        "hash_rows_s": {m: round(work[m]["hash_rows_s"], 4) for m in work},
        "check_s": {m: round(work[m]["check_s"], 4) for m in work},
        "hash_fraction_of_build": {m: round(work[m]["hash_rows_s"] / med["off"], 4) for m in work},
        "loadavg_1m": round(os.getloadavg()[0], 1),
    }))  # fmt: skip
    if not same_rows:
        raise SystemExit("the catalogs differ apart from content_hash")


if __name__ == "__main__":
    main()
