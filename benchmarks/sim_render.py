"""Benchmark: offscreen Meta-World rendering as ``sim collect`` does it vs MuJoCo's default scene.

- states: one scripted pick-place-v3 episode, recorded once; every configuration renders the
  same sequence of states (qpos/qvel/mocap replayed, ``mj_forward``), ``corner`` camera.
- baseline: ``mujoco.Renderer`` with MuJoCo's default scene flags (shadows, reflections and 4x multisampling on),
  what ``gymnasium``'s MuJoCo renderer draws.
- midtrain: ``CameraView`` (shadows, reflections and 4x multisampling off, upright image), llvmpipe with its
  default thread count, one process.
- parallel: ``2 x --workers`` episodes of ``3 x --frames`` steps (simulate + render), run by
  ``--workers`` spawned processes with llvmpipe limited to their share of the cores, as ``sim
  collect`` runs them; frames per wall-clock second including process start-up, against one
  process running all of them.

Rendering is CPU-bound (llvmpipe); figures depend on the machine and on its load, so each is
the best of ``--repeats`` interleaved runs and the load average is printed. One rendering
process keeps about one core busy (printed), so ``--workers`` processes can use that many
cores - when they are free: with other sessions busy, Linux's autogroup scheduler gives this
session one share of the CPU however many processes it runs, and the speedup disappears. The last line
printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import numpy as np

from midtrain.sim.metaworld_env import CameraView, ensure_gl_backend, import_mujoco, make_env, make_policy, run_episode


def record_states(steps: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(qpos, qvel, mocap_pos) along one expert pick-place episode (simulation only)."""
    env = make_env("pick-place-v3")
    states = []
    policy = make_policy("pick-place-v3", "expert", 0)
    env.seed(0)
    obs, _ = env.reset()
    for _ in range(steps):
        states.append((env.data.qpos.copy(), env.data.qvel.copy(), env.data.mocap_pos.copy()))
        obs, *_ = env.step(np.clip(policy(obs), -1, 1))
    return states


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def render_states(states, size: int, default_flags: bool) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) to render every state once."""
    mujoco = import_mujoco()
    env = make_env("pick-place-v3")
    env.seed(0)
    env.reset()
    model, data = env.model, env.data
    if default_flags:
        renderer = mujoco.Renderer(model, size, size)
        camera = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, "corner")

        def draw():
            renderer.update_scene(data, camera=camera)
            return renderer.render()
    else:
        view = CameraView(model, "corner", size, size)
        renderer = view.renderer

        def draw():
            return view.rgb(data)

    def load(state):
        data.qpos[:], data.qvel[:], data.mocap_pos[:] = state
        mujoco.mj_forward(model, data)

    load(states[0])
    draw()  # warm-up: context and textures
    t0, c0 = time.perf_counter(), _cpu_seconds()
    for state in states:
        load(state)
        draw()
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
    renderer.close()
    return seconds, cpu


def _episode_frames(job: tuple[int, int, int]) -> int:
    """Worker job (seed, size, steps): one episode of the zero policy, which never succeeds, so
    every job simulates and renders exactly ``steps`` frames. Returns the frame count."""
    seed, size, steps = job
    env = make_env("reach-v3")
    view = CameraView(env.model, "corner", size, size)
    episode = run_episode(env, view, make_policy("reach-v3", "zero", seed), seed, steps)
    view.close()
    return len(episode.frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer frames (a smoke run)")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (sim collect's default)")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs per figure")
    args = parser.parse_args()
    frames = 40 if args.quick else args.frames
    repeats = 1 if args.quick else args.repeats
    backend = ensure_gl_backend()
    from midtrain.sim.parallel import map_in_workers

    states = record_states(frames)
    base_s, (ours_s, ours_cpu) = float("inf"), (float("inf"), 0.0)
    for _ in range(repeats):  # interleaved, best of: the machine's load changes while we measure
        base_s = min(base_s, render_states(states, args.size, default_flags=True)[0])
        ours_s, ours_cpu = min((ours_s, ours_cpu), render_states(states, args.size, default_flags=False))
    fps_base, fps_ours = frames / base_s, frames / ours_s
    print(f"render {args.size}x{args.size}, {frames} frames, MUJOCO_GL={backend}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}, best of {repeats}")  # fmt: skip
    print(f"  MuJoCo defaults (shadows, reflections, MSAA): {fps_base:7.1f} frames/s")
    print(f"  midtrain CameraView (all three off, upright): {fps_ours:7.1f} frames/s   x{fps_ours / fps_base:.2f}")
    print(f"  CPU {1e3 * ours_cpu / frames:.1f} ms/frame, {ours_cpu / ours_s:.2f} cores busy while rendering "
          "(~1: a second process can use a second core)")  # fmt: skip

    # long enough that spawning the workers (importing mujoco and metaworld, ~2 s) is amortised,
    # as it is over a whole collection
    jobs = [(seed, args.size, 3 * frames) for seed in range(2 * args.workers)]
    serial_s, parallel_s = float("inf"), float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        serial_frames = sum(map(_episode_frames, jobs))
        serial_s = min(serial_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        parallel_frames = sum(map_in_workers(_episode_frames, jobs, args.workers))
        parallel_s = min(parallel_s, time.perf_counter() - t0)
        assert serial_frames == parallel_frames
    print(f"episodes ({len(jobs)} x {jobs[0][2]} steps, simulate + render):")
    print(f"  1 process:             {serial_frames / serial_s:7.1f} frames/s")
    print(f"  {args.workers} spawned processes:   {parallel_frames / parallel_s:7.1f} frames/s   "
          f"x{serial_s / parallel_s:.2f} (includes process start-up)")  # fmt: skip
    print(json.dumps({
        "bench": "sim_render", "size": args.size, "frames": frames, "gl_backend": backend,
        "fps_default_flags": round(fps_base, 1), "fps_midtrain": round(fps_ours, 1),
        "ratio": round(fps_ours / fps_base, 2), "cpu_ms_per_frame": round(1e3 * ours_cpu / frames, 2),
        "cores_busy_rendering": round(ours_cpu / ours_s, 2),
        "episode_fps_1_process": round(serial_frames / serial_s, 1),
        f"episode_fps_{args.workers}_processes": round(parallel_frames / parallel_s, 1),
        "parallel_speedup": round(serial_s / parallel_s, 2), "load_average": round(os.getloadavg()[0], 2),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
