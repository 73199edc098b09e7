"""Benchmark: closed-loop episodes per CPU-minute on the fast path vs today's path, same policy and seeds.

- policy: ``expert`` (the scripted Meta-World expert: reads no frame, the ceiling), ``demo-vla``
  (the demo VLM with an untrained ``mlp`` head reading the corner camera at 128 px, executing
  whole chunks of 8 as the study's policies do: what a study evaluates, at its cost), or a
  checkpoint directory ``midtrain eval`` loads.
- frames: through the corpus codec, ``lossless`` (libx264rgb crf 0, what ``sim collect`` writes)
  or ``h264`` (crf 23 yuv420p, the LeRobot writer's default), or ``raw``.
- baseline: ``fast_path=false``: every camera rendered and sent through the codec at every step.
- fast: ``fast_path=true`` (the default): a frame is made only when the policy reads it; the codec
  round trip is dropped once real frames decode unchanged (see ``midtrain.eval.rollout``).
- per core: both run in this process (``workers=1``) with one llvmpipe thread (``LP_NUM_THREADS=1``)
  and one torch thread; the rate is episodes per minute of CPU time (this process and its
  children), so other work on a shared machine changes it less than wall time.
- agreement: every episode's (task, seed, success, length) and the digest of its actions must be
  the same in every run of both paths (``identical_success``, ``identical_actions``).
- ``--repeats`` interleaved runs of each path; the least CPU time of each counts.

The last line is one JSON object with ``speedup_per_core``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("LP_NUM_THREADS", "1")  # one llvmpipe thread: a per-core rate (set before any GL context)
CODECS = {"lossless": {"name": "libx264rgb", "crf": 0, "pix_fmt": "rgb24"}, "h264": {"name": "libx264", "crf": 23, "pix_fmt": "yuv420p"}}


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class ActionDigest:
    """The policy, with a digest of the actions it returns in each episode."""

    def __init__(self, policy):
        from midtrain.eval.policies import interface_of

        self.policy, self.interface, self.digests = policy, interface_of(policy), []

    def seed(self, seed: int) -> None:
        if callable(getattr(self.policy, "seed", None)):
            self.policy.seed(seed)

    def reset(self) -> None:
        self.policy.reset()
        self.digests.append(hashlib.sha1())

    def select_action(self, observation):
        action = np.asarray(self.policy.select_action(observation), dtype=np.float32)
        self.digests[-1].update(action.tobytes())
        return action


def demo_vla(root: Path):
    """The demo VLM + an untrained mlp head (benchmarks/vla.py's demo policy), reading the corner camera."""
    from vla import config, rows  # benchmarks/vla.py: the demo policy's config and normalisation rows

    from midtrain.models.demo_vlm import build_demo_vlm
    from midtrain.policy import VLAPolicy

    config_ = config("mlp", rows(8, 8), 8)
    return VLAPolicy.build(config_, build_demo_vlm(root / "demo_vlm"), device="cpu").eval()


def run(policy, settings, out: Path) -> dict:
    from midtrain.eval.api import evaluate_policy

    policy.digests = []
    t0, c0 = time.perf_counter(), _cpu_s()
    results = evaluate_policy(policy, settings, out)
    wall, cpu = time.perf_counter() - t0, _cpu_s() - c0
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "episodes.parquet").to_pylist()  # job order = the order episodes ran in (1 process)
    outcomes = [(r["task"], r["episode"], r["seed"], r["success"], r["length"]) for r in rows]
    return {"results": results, "wall": wall, "cpu": cpu, "outcomes": outcomes,
            "actions": [d.hexdigest() for d in policy.digests]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["push-v3", "drawer-open-v3", "reach-v3", "window-close-v3"])
    parser.add_argument("--episodes", type=int, default=4, help="episodes per task")
    parser.add_argument("--max-steps", type=int, default=120)
    parser.add_argument("--frames", choices=["lossless", "h264", "raw"], default="lossless")
    parser.add_argument("--policy", default="expert", help="expert, demo-vla or a checkpoint directory")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each path; the least CPU time counts")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(1)
    from midtrain.eval.config import CodecSettings, EvalSettings
    from midtrain.eval.policies import MetaWorldExpertPolicy, load_policy
    from midtrain.sim.metaworld_env import ensure_gl_backend

    backend = ensure_gl_backend()
    with tempfile.TemporaryDirectory(prefix="midtrain-bench-eval-") as tmp:
        tmp = Path(tmp)
        if args.policy == "expert":
            inner = MetaWorldExpertPolicy()
        elif args.policy == "demo-vla":
            inner = demo_vla(tmp)
        else:
            inner = load_policy(args.policy)
        policy = ActionDigest(inner)
        codec = CodecSettings(**CODECS[args.frames]) if args.frames in CODECS else CodecSettings()
        common = dict(tasks=args.tasks, episodes_per_task=args.episodes, max_steps=args.max_steps, workers=1,
                      frames="raw" if args.frames == "raw" else "codec", codec=codec, videos_per_task=0)  # fmt: skip
        load_before = os.getloadavg()
        best: dict[bool, dict] = {}
        seen = []
        for r in range(args.repeats):  # interleaved, so a change in the machine's load hits both
            for fast in (False, True):
                res = run(policy, EvalSettings(**common, fast_path=fast), tmp / f"{'fast' if fast else 'base'}-r{r}")
                seen.append(res)
                if fast not in best or res["cpu"] < best[fast]["cpu"]:
                    best[fast] = res
        load_after = os.getloadavg()
    same_success = all(s["outcomes"] == seen[0]["outcomes"] for s in seen)
    same_actions = all(s["actions"] == seen[0]["actions"] for s in seen)
    base, fast = best[False], best[True]
    episodes = base["results"]["episodes"]
    rate = {k: 60 * episodes / v["cpu"] for k, v in (("base", base), ("fast", fast))}
    wall_rate = {k: 60 * episodes / v["wall"] for k, v in (("base", base), ("fast", fast))}
    shares = {k: v["results"]["timing"]["shares"] for k, v in (("base", base), ("fast", fast))}
    seconds = {k: v["results"]["timing"]["seconds"] for k, v in (("base", base), ("fast", fast))}
    round_trip = (fast["results"]["observation"].get("codec") or {}).get("round_trip", "none (raw frames)")
    print(f"MUJOCO_GL={backend}, LP_NUM_THREADS={os.environ['LP_NUM_THREADS']}, 1 torch thread, {os.cpu_count()} cores, "
          f"load average before {load_before[0]:.2f} after {load_after[0]:.2f}")  # fmt: skip
    print(f"{episodes} episodes ({len(args.tasks)} tasks x {args.episodes}), {base['results']['timing']['steps']} steps, "
          f"frames={args.frames}, policy={args.policy}; least CPU time of {args.repeats} interleaved runs each")  # fmt: skip
    for key, name in (("base", "today's path"), ("fast", "fast path  ")):
        print(f"{name}: {best[key == 'fast']['cpu']:7.1f} CPU-s {best[key == 'fast']['wall']:7.1f} s wall, "
              f"{rate[key]:6.2f} episodes per CPU-minute; time: " + ", ".join(f"{k} {v:.1%}" for k, v in shares[key].items()))  # fmt: skip
    print(f"speedup per core x{rate['fast'] / rate['base']:.2f} (wall x{wall_rate['fast'] / wall_rate['base']:.2f}); "
          f"codec round trip on the fast path: {round_trip}")  # fmt: skip
    print(f"per-episode outcomes identical in all {len(seen)} runs: {same_success}; actions identical: {same_actions} "
          f"(mean success {base['results']['mean_success']:.3f})")  # fmt: skip
    print(json.dumps({
        "bench": "eval", "policy": args.policy, "frames": args.frames, "episodes": episodes, "repeats": args.repeats,
        "steps": base["results"]["timing"]["steps"],
        "episodes_per_cpu_minute_baseline": round(rate["base"], 2), "episodes_per_cpu_minute_fast": round(rate["fast"], 2),
        "speedup_per_core": round(rate["fast"] / rate["base"], 3), "speedup_wall": round(wall_rate["fast"] / wall_rate["base"], 3),
        "identical_success": same_success, "identical_actions": same_actions, "mean_success": base["results"]["mean_success"],
        "cpu_s_baseline": round(base["cpu"], 1), "cpu_s_fast": round(fast["cpu"], 1), "codec_round_trip_fast": round_trip,
        "shares_baseline": shares["base"], "shares_fast": shares["fast"],
        "seconds_baseline": seconds["base"], "seconds_fast": seconds["fast"],
        "load_avg_before": round(load_before[0], 2), "load_avg_after": round(load_after[0], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
