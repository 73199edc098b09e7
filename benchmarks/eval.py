"""Benchmark: closed-loop episodes per minute with W worker processes vs 1, same policy and seeds.

- policy: the scripted Meta-World expert (a checkpoint directory written here), or ``--policy DIR``
  (any checkpoint ``midtrain eval`` loads).
- baseline: ``evaluate_policy`` with ``workers=1`` (episodes in this process).
- parallel: the same settings with ``workers=W`` (spawned processes, ``LP_NUM_THREADS=1`` each);
  the wall time includes starting the workers (imports, environments, GL contexts).
- agreement: every episode's success and length must be identical in every run (seeded initial
  states, per-episode seeding); ``identical_success`` is false otherwise.
- ``--repeats`` interleaved runs of each configuration; the best wall time of each counts.
- where time goes: the share of episode time in the policy, the simulator's physics, rendering,
  the codec round trip and resets (environment builds and resets), summed over processes.

Rendering is CPU-bound (llvmpipe); on a machine shared with other work the speedup shrinks
(Linux's autogroup scheduler gives this session one share of the CPU however many processes it
runs), so the load average is printed before and after. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(policy: str, settings, out: Path) -> tuple[dict, float, float]:
    from midtrain.eval.api import evaluate_policy

    t0, c0 = time.perf_counter(), _cpu_s()
    results = evaluate_policy(policy, settings, out)
    return results, time.perf_counter() - t0, _cpu_s() - c0


def outcomes(out: Path) -> list[tuple]:
    """(task, episode, seed, success, length) of every episode, in order."""
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "episodes.parquet").to_pylist()
    return [(r["task"], r["episode"], r["seed"], r["success"], r["length"]) for r in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["push-v3", "drawer-open-v3", "reach-v3", "window-close-v3"])
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--frames", choices=["codec", "raw"], default="codec")
    parser.add_argument("--policy", default=None, help="checkpoint directory (default: the scripted expert)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each; the best wall time counts")
    args = parser.parse_args()

    from midtrain.eval.config import EvalSettings
    from midtrain.eval.policies import save_scripted_policy
    from midtrain.sim.metaworld_env import ensure_gl_backend

    backend = ensure_gl_backend()
    with tempfile.TemporaryDirectory(prefix="midtrain-bench-eval-") as tmp:
        tmp = Path(tmp)
        policy = args.policy or str(save_scripted_policy(tmp / "expert", "metaworld_expert"))
        common = dict(tasks=args.tasks, episodes_per_task=args.episodes, max_steps=args.max_steps, frames=args.frames,
                      videos_per_task=0)  # fmt: skip
        load_before = os.getloadavg()
        best: dict[int, tuple] = {}
        seen = []
        for r in range(args.repeats):  # interleaved, so a change in the machine's load hits both
            for w in (1, args.workers):
                out = tmp / f"w{w}-r{r}"
                res = run(policy, EvalSettings(**common, workers=w), out)
                seen.append(outcomes(out))
                if w not in best or res[1] < best[w][1]:
                    best[w] = res
        load_after = os.getloadavg()
        same = all(o == seen[0] for o in seen)
        (one, one_wall, one_cpu), (many, many_wall, many_cpu) = best[1], best[args.workers]
    episodes = one["episodes"]
    epm_one, epm_many = 60 * episodes / one_wall, 60 * episodes / many_wall
    shares = one["timing"]["shares"]
    print(f"MUJOCO_GL={backend}, {os.cpu_count()} cores, load average before {load_before[0]:.2f} after {load_after[0]:.2f}")
    print(f"{episodes} episodes ({len(args.tasks)} tasks x {args.episodes}), {one['timing']['steps']} steps, "
          f"frames={args.frames}, policy={'expert' if not args.policy else args.policy}")  # fmt: skip
    print(f"best of {args.repeats} interleaved runs each")
    print(f"1 process : {one_wall:7.1f} s wall, {one_cpu:7.1f} CPU-s, {epm_one:6.2f} episodes/min")
    print(f"{args.workers} workers : {many_wall:7.1f} s wall, {many_cpu:7.1f} CPU-s, {epm_many:6.2f} episodes/min "
          f"(x{epm_many / epm_one:.2f})")  # fmt: skip
    print("share of episode time (1 process): " + ", ".join(f"{k} {v:.1%}" for k, v in shares.items()))
    print("per-episode outcomes identical in all %d runs (1 and %d workers): %s (mean success %.3f)"
          % (2 * args.repeats, args.workers, same, one["mean_success"]))  # fmt: skip
    print(json.dumps({
        "bench": "eval", "episodes": episodes, "repeats": args.repeats, "steps": one["timing"]["steps"], "workers": args.workers, "frames": args.frames,
        "episodes_per_minute_1": round(epm_one, 2), f"episodes_per_minute_{args.workers}": round(epm_many, 2),
        "parallel_speedup": round(epm_many / epm_one, 3), "identical_success": same,
        "mean_success": one["mean_success"], "cpu_s_1": round(one_cpu, 1), f"cpu_s_{args.workers}": round(many_cpu, 1),
        "share_policy": shares["policy"], "share_physics": shares["physics"], "share_render": shares["render"],
        "share_codec": shares["codec"], "share_reset": shares["reset"], "share_other": shares["other"],
        "seconds_1": one["timing"]["seconds"], f"seconds_{args.workers}": many["timing"]["seconds"],
        "load_avg_before": round(load_before[0], 2), "load_avg_after": round(load_after[0], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
