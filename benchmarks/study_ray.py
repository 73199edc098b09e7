"""Benchmark: the smoke study's sub-stages on a local Ray cluster with 2 workers vs 1.

- study: ``configs/study_smoke.yaml`` (5 rows, 2 seeds: 3 mid-trainings, 10 VLA trainings with their
  closed loop, 5 probes, CKA), ``backend: ray``; ``ray.num_cpus`` sets the local cluster's CPUs,
  so 1 CPU runs one sub-stage at a time (the baseline) and 2 CPUs two at once.
- the world (the data engine, the VLMs, the selections) is built once first and shared: it is a
  chain of dependent stages either way. Each timed run starts from it with every row sub-stage
  deleted (as a rerun after a driver that died), and its wall time includes starting Ray.
- agreement: both timed runs' ``study.json`` must be identical without their timing and cost fields
  (``identical_study``).

The machine is shared: the speedup cannot exceed the cores this session gets (Linux's autogroup
scheduler gives it one share however many processes it runs), so the load average is printed
before and after. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROW_STAGES = ("sft_", "vla_", "probe_")


def study(config: Path, run: Path, cpus: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MIDTRAIN_PROGRESS": "off"}  # fmt: skip
    cmd = [sys.executable, "-m", "midtrain.cli", "study", "--config", str(config), "--run-dir", str(run),
           "backend=ray", f"ray.num_cpus={cpus}"]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"study failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def clear_rows(run: Path) -> int:
    gone = [p for p in run.iterdir() if p.name.startswith(ROW_STAGES) or p.name in ("cka", "study", "report")]
    for p in gone:
        shutil.rmtree(p)
    return len(gone)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "study_smoke.yaml")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--run-dir", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = parser.parse_args()
    from midtrain.experiments.study.stage import study_findings

    run = args.run_dir or Path(tempfile.mkdtemp(prefix="study_ray_")) / "run"
    load_before = os.getloadavg()[0]
    world_s = study(args.config, run, args.workers)  # the world and a first pass (not timed as a result)
    results, seconds = {}, {}
    for cpus in (1, args.workers):
        sub_stages = clear_rows(run)
        seconds[cpus] = study(args.config, run, cpus)
        results[cpus] = json.loads((run / "study" / "study.json").read_text())
        print(f"{cpus} worker(s): {sub_stages} sub-stage folders recomputed in {seconds[cpus]:.1f} s", flush=True)
    load_after = os.getloadavg()[0]
    speedup = seconds[1] / seconds[args.workers]
    print(f"parallel_speedup {speedup:.2f} ({args.workers} workers vs 1); load average {load_before:.1f} -> {load_after:.1f}")
    if args.run_dir is None:
        shutil.rmtree(run.parent, ignore_errors=True)
    print(json.dumps({
        "bench": "study_ray", "config": args.config.name, "workers": args.workers, "sub_stages": sub_stages,
        "seconds_1": round(seconds[1], 1), f"seconds_{args.workers}": round(seconds[args.workers], 1),
        "parallel_speedup": round(speedup, 3), "identical_study": study_findings(results[1]) == study_findings(results[args.workers]),
        "missing": len(results[args.workers]["missing"]), "first_pass_s": round(world_s, 1),
        "cpu_count": os.cpu_count(), "loadavg_before": round(load_before, 1), "loadavg_after": round(load_after, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
