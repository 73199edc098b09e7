"""Episodes: one closed-loop rollout, and many in spawned worker processes.

An episode: reset the task's environment to the initial state of its seed, ``policy.reset()``;
then until the task reports success or ``max_steps`` steps were taken: render the cameras
(frame t shows the state the action is chosen from), optionally pass each frame through the
codec round trip, ``action = policy.select_action(observation)``, step the simulator. Success
is the task's success flag at any step; ``length`` is the number of actions taken.

Two paths make the frames, with the same frames wherever the policy reads one (so the same
actions and outcomes); ``ObservationSpec.fast_path`` chooses:

- baseline: every camera is rendered and sent through the codec at every step.
- fast (the default): a frame is made only when it is read. The observation is an
  :class:`Observation` mapping that renders a camera when the policy first reads it at that
  step - a policy that executes a chunk of 8 actions reads one frame in 8, a scripted policy
  none - and the video camera is rendered at every step only in episodes that record a video.
  Lossy codec frames depend on every earlier frame of their stream, so while the round trip
  applies, the cameras the policy reads go through it at every step, in order, as on the
  baseline. The round trip is dropped only once it is shown to be the identity: the first
  ``LOSSLESS_CHECK_FRAMES`` real frames of this process's evaluation (I and P frames) are
  compared with their decoded copies, and only when every one is equal are later frames
  passed raw (``EpisodeResult.codec_lossless`` says what the check found).

Resets are not replaced by a restored snapshot: a Meta-World reset costs 12-19 ms of CPU
(measured on four tasks; ~90% of it the 50-step hand reset), under 1% of a VLA episode's CPU on
the fast path. Building a task's environment (~0.15 s) and, when a frame is first rendered, its
renderer (~0.35 s, mostly uploading the model's textures) is what a task costs, once per worker.

Every episode's outcome depends only on its job (task, seed, initial state, settings): the
environment is reset from the seed, and numpy's, Python's and torch's global generators and
the policy's ``seed()`` (when it has one) are seeded from the episode seed before ``reset()``.
So the same jobs give the same outcomes with 1 or W workers.

Workers are ``spawn``-ed processes (a forked child would share the parent's GL state), each
building its environments and EGL/OSMesa contexts itself, with llvmpipe limited to one thread
(``LP_NUM_THREADS=1``: llvmpipe otherwise spreads over every core and parallel processes
gain nothing, CALIBRATION.md). Each worker runs one job at a time, so when a worker dies (a
segfault in the GL driver or the policy) the evaluator knows which episode it was running:
that episode is recorded as failed with the exit status, a fresh worker takes over, the
others go on. A Python exception inside an episode is recorded the same way.

With ``backend: ray`` the jobs are cut into ``workers`` groups (:func:`episode_groups`: a task's
episodes stay together) and each group is one Ray task (``ray.cpus_per_stage`` CPUs, default 1;
``ray.gpus_per_stage`` GPUs, default 0) that loads the policy from its source and runs the
group's episodes with :func:`run_episode`; a group's results come back when it finishes. A Ray
worker or node that dies fails its group's episodes only, each with the reason.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import pickle
import random
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from ..ray_cluster import RaySettings, check_fits, connect
from ..runs import StageError
from .codec import CodecSpec, FrameCodec
from .policies import ENV_STATE_KEY, STATE_KEY, TASK_KEY

OUTCOMES = ("success", "step_limit", "error")
LOSSLESS_CHECK_FRAMES = 4  # real frames compared with their round trip before it is dropped (gop 2: I and P frames)


@dataclass(frozen=True)
class ObservationSpec:
    """What is rendered and how: ``cameras`` (observation key, simulator camera) pairs, frame
    size, the codec round trip (None: raw frames), the frame rate (videos, codec time base),
    ``video_key``: the camera whose frames go into the episode's video; ``read_keys``: the cameras
    the policy declares it reads (None: it declares nothing, so any may be read); ``fast_path``:
    make a frame only when it is read (see the module docstring), else every frame, every step."""

    cameras: tuple[tuple[str, str], ...]
    height: int
    width: int
    codec: Optional[CodecSpec]
    fps: float
    video_key: str
    read_keys: Optional[tuple[str, ...]] = None
    fast_path: bool = True


@dataclass(frozen=True)
class EpisodeJob:
    benchmark: str
    suite: str
    task: str
    instruction: str
    index: int
    seed: int
    init_state: Optional[int]
    max_steps: int
    obs: ObservationSpec
    action_dim: int
    video_path: Optional[str] = None  # where to write this episode's MP4, None: no video


@dataclass
class EpisodeResult:
    task: str
    index: int
    seed: int
    init_state: Optional[int]
    success: bool
    length: int
    outcome: str  # one of OUTCOMES
    failure: str  # "" on success, else why (step limit, the exception, the worker's exit status)
    video: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)  # policy_s, physics_s, render_s, codec_s, reset_s, wall_s
    codec_lossless: Optional[bool] = None  # the fast path's check of the round trip (None: not decided here)


def _seed_everything(seed: int, policy: Any) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed % 2**63)
    if callable(getattr(policy, "seed", None)):
        policy.seed(seed)


_SIM_CACHE: dict[str, Any] = {}  # this process's current environment (jobs arrive grouped by task)


def import_triton_before_gl() -> None:
    """Import Triton (when installed) before this process makes its first GL context.

    Mesa's software GL (llvmpipe, behind EGL and OSMesa) loads the system's libLLVM; importing
    Triton - which ``torch._dynamo`` / ``torch.compile`` do - into a process that has made a GL
    context, even a freed one, then segfaults (their LLVMs clash), while the other order works
    (measured: mujoco 3.3.0, Mesa llvmpipe/LLVM 15, triton with torch 2.14). A training loop
    that evaluates in its own process and compiles later would otherwise crash.
    """
    import importlib.util

    if "triton" not in sys.modules and importlib.util.find_spec("triton") is not None:
        with contextlib.suppress(Exception):
            import triton  # noqa: F401


def _sim_for(job: EpisodeJob):
    from .simulators import open_sim

    key = (job.benchmark, job.suite, job.task, job.obs.cameras, job.obs.height, job.obs.width)
    if _SIM_CACHE.get("key") != key:
        close_sims()
        import_triton_before_gl()
        _SIM_CACHE["sim"] = open_sim(job.benchmark, job.suite, job.task, job.obs.cameras, job.obs.height, job.obs.width)
        _SIM_CACHE["key"] = key
    return _SIM_CACHE["sim"]


def close_sims() -> None:
    """Close this process's environment and GL contexts (before interpreter exit tears EGL down)."""
    sim = _SIM_CACHE.pop("sim", None)
    _SIM_CACHE.clear()
    if sim is not None:
        with contextlib.suppress(Exception):
            sim.close()


class Observation(Mapping):
    """One step's observation for the fast path: ``values`` as given, and each camera key of
    ``cameras`` made by ``make(key)`` (rendered, through the codec when it applies) when it is
    first read. Membership and iteration do not render. Once the step is taken (:meth:`expire`)
    an unread frame can no longer be made: a policy that keeps observations copies them during
    ``select_action`` (``dict(observation)``)."""

    def __init__(self, values: dict[str, Any], cameras: Iterable[str], make: Callable[[str], np.ndarray]):
        self._values = dict(values)
        self._cameras = [key for key in cameras if key not in self._values]
        self._make: Optional[Callable[[str], np.ndarray]] = make

    def __getitem__(self, key: str) -> Any:
        if key not in self._values:
            if key not in self._cameras:
                raise KeyError(key)
            if self._make is None:
                raise RuntimeError(
                    f"{key} was first read after select_action returned, when the simulator had moved on; a "
                    "policy that keeps observations copies them during select_action (dict(observation))"
                )
            self._values[key] = self._make(key)
        return self._values[key]

    def expire(self) -> None:
        self._make = None

    def __reduce__(self):  # copy, deepcopy and pickle give a plain dict with every frame (made now)
        return dict, (dict(self),)

    def __contains__(self, key: object) -> bool:
        return key in self._values or key in self._cameras

    def __iter__(self) -> Iterator[str]:
        yield from self._values
        yield from (key for key in self._cameras if key not in self._values)

    def __len__(self) -> int:
        return len(self._values) + sum(key not in self._values for key in self._cameras)


_LOSSLESS: dict[tuple, list] = {}  # (codec, size) -> [frames found equal, verdict or None], this process's evaluation


class _FrameMaker:
    """An episode's frames: rendered, passed through one codec stream per camera while the round
    trip applies, and - on the fast path - checked against it until it is shown lossless."""

    def __init__(self, job: EpisodeJob, sim: Any, timings: dict[str, float]):
        self.obs, self.sim, self.timings = job.obs, sim, timings
        self.codecs: dict[str, FrameCodec] = {}
        self.check = _LOSSLESS.setdefault((job.obs.codec, job.obs.height, job.obs.width), [0, None]) \
            if job.obs.codec is not None and job.obs.fast_path else None  # fmt: skip

    @property
    def codec_applies(self) -> bool:
        return self.obs.codec is not None and (self.check is None or self.check[1] is not True)

    def __call__(self, key: str) -> np.ndarray:
        frame = self.sim.render(key)
        if not self.codec_applies:
            return frame
        t0 = time.perf_counter()
        codec = self.codecs.get(key)
        if codec is None:
            codec = self.codecs[key] = FrameCodec(self.obs.codec, self.obs.height, self.obs.width)
            codec.reset()
        decoded = codec(frame)
        if self.check is not None and self.check[1] is None:
            if np.array_equal(decoded, frame):
                self.check[0] += 1
                if self.check[0] >= LOSSLESS_CHECK_FRAMES:
                    self.check[1] = True
            else:
                self.check[1] = False
        self.timings["codec_s"] += time.perf_counter() - t0
        return decoded

    def eager_keys(self, video: bool) -> list[str]:
        """The cameras made at every step: all of them on the baseline; on the fast path the ones the
        policy reads while a (lossy) codec stream applies, and the video camera when recording."""
        keys = [key for key, _ in self.obs.cameras]
        if not self.obs.fast_path:
            return keys
        eager = set(keys if self.obs.read_keys is None else self.obs.read_keys) if self.codec_applies else set()
        if video:
            eager.add(self.obs.video_key)
        return [key for key in keys if key in eager]


def run_episode(job: EpisodeJob, policy: Any) -> EpisodeResult:
    """One closed-loop episode; exceptions become an ``error`` outcome with the reason."""
    started = time.perf_counter()
    timings = {"policy_s": 0.0, "physics_s": 0.0, "render_s": 0.0, "codec_s": 0.0, "reset_s": 0.0}
    steps, success, frames = 0, False, []
    sim = maker = None
    try:
        t0 = time.perf_counter()
        sim = _sim_for(job)
        maker = _FrameMaker(job, sim, timings)
        sim.reset(job.seed, job.init_state)
        _seed_everything(job.seed, policy)
        policy.reset()
        timings["reset_s"] = time.perf_counter() - t0  # environment build (first episode of a task) and reset
        physics0, render0 = sim.physics_s, sim.render_s
        cameras = [key for key, _ in job.obs.cameras]
        for _ in range(job.max_steps):
            images = {key: maker(key) for key in maker.eager_keys(bool(job.video_path))}
            state, env_state = sim.state()
            if job.video_path:
                frames.append(images[job.obs.video_key])
            values = {**images, STATE_KEY: state, ENV_STATE_KEY: env_state, TASK_KEY: job.instruction}
            observation = Observation(values, cameras, maker) if job.obs.fast_path else values
            t0 = time.perf_counter()
            action = np.asarray(policy.select_action(observation))
            timings["policy_s"] += time.perf_counter() - t0
            if isinstance(observation, Observation):
                observation.expire()
            action = _checked_action(action, job.action_dim)
            steps += 1
            if sim.step(action):
                success = True
                break
        if job.video_path:  # the video also shows where the last action led
            frames.append(maker(job.obs.video_key))
        outcome = "success" if success else "step_limit"
        failure = "" if success else f"no success within {job.max_steps} steps"
    except Exception as exc:  # the episode fails with its reason; the evaluation goes on
        outcome, success = "error", False
        failure = f"error at step {steps}: {type(exc).__name__}: {str(exc).strip()[:500]}"
        sys.stderr.write(f"episode {job.task} #{job.index} (seed {job.seed}) failed:\n{traceback.format_exc()}")
        close_sims()  # the environment may be in any state
        sim = None
    if sim is not None:
        timings["physics_s"] = sim.physics_s - physics0
        timings["render_s"] = sim.render_s - render0
    video = None
    if job.video_path and frames:
        from .video import write_mp4

        try:
            video = str(write_mp4(job.video_path, frames, job.obs.fps))
        except Exception:  # a video is a view of the episode, not its result
            sys.stderr.write(f"episode {job.task} #{job.index}: the video was not written:\n{traceback.format_exc()}")
    timings["wall_s"] = time.perf_counter() - started
    lossless = maker.check[1] if maker is not None and maker.check is not None else None
    return EpisodeResult(job.task, job.index, job.seed, job.init_state, success, steps, outcome, failure, video, timings,
                         lossless)  # fmt: skip


def _checked_action(action: np.ndarray, action_dim: int) -> np.ndarray:
    if action.shape != (action_dim,):
        action = action.squeeze()
        if action.shape != (action_dim,):
            raise StageError(f"policy returned an action of shape {tuple(action.shape)}; the environment takes ({action_dim},)")
    if not np.all(np.isfinite(action)):
        raise StageError(f"policy returned a non-finite action {action.tolist()}")
    return action


# --------------------------------------------------------------------------- workers


def _status(exitcode: Optional[int]) -> str:
    if exitcode is not None and exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by signal {signal.Signals(-exitcode).name}"
    return f"exit code {exitcode}"


def _died(job: EpisodeJob, exitcode: Optional[int]) -> EpisodeResult:
    return _failed(job, f"worker process died while running this episode ({_status(exitcode)})")


def _failed(job: EpisodeJob, reason: str) -> EpisodeResult:
    """The record of an episode that did not run to an outcome, with ``reason``."""
    return EpisodeResult(job.task, job.index, job.seed, job.init_state, False, 0, "error", reason, None, {})


def _load_policy(source: tuple[str, Any]) -> Any:
    kind, value = source
    if kind == "path":
        from .policies import load_policy

        return load_policy(Path(value))
    return pickle.loads(value)


def _worker_main(conn, source: tuple[str, Any], benchmark: str, torch_threads: int) -> None:
    """A worker process: import the simulator, load the policy, then run jobs from ``conn`` until it sends None."""
    from .simulators import import_simulator

    os.environ.setdefault("LP_NUM_THREADS", "1")  # llvmpipe threads of this process's GL contexts
    try:
        import_simulator(benchmark)
        policy = _load_policy(source)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(torch_threads)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the evaluation
        conn.send(("init_error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", None))
    try:
        while True:
            job = conn.recv()
            if job is None:
                break
            conn.send(("result", run_episode(job, policy)))
    finally:
        close_sims()


@dataclass
class _Worker:
    process: Any
    conn: Any
    job: Optional[EpisodeJob] = None
    ready: bool = False  # it loaded the policy
    task: Optional[str] = None  # the task whose environment it holds


class _TaskQueue:
    """Pending jobs by task. A free worker takes the next episode of the task whose environment
    it already holds, else of the first task no other worker holds, else of the task with the
    most episodes left - so each environment is built about once, not once per worker."""

    def __init__(self, jobs: list[EpisodeJob]):
        self.by_task: dict[str, deque] = {}
        for job in jobs:
            self.by_task.setdefault(job.task, deque()).append(job)

    def __bool__(self) -> bool:
        return any(self.by_task.values())

    def next_for(self, held: Optional[str], others: set) -> EpisodeJob:
        left = {t: q for t, q in self.by_task.items() if q}
        if held in left:
            task = held
        else:
            free = [t for t in left if t not in others]
            task = free[0] if free else max(left, key=lambda t: len(left[t]))
        return self.by_task[task].popleft()


def run_episodes(
    jobs: Iterable[EpisodeJob], policy: Any, workers: int, source: Optional[tuple[str, Any]] = None,
    backend: str = "local", ray: Optional[RaySettings] = None,
) -> Iterator[EpisodeResult]:  # fmt: skip
    """Run ``jobs``, yielding results as episodes finish (not in job order).

    ``workers`` <= 1: in this process with ``policy``. Otherwise ``workers`` spawned processes,
    each loading the policy from ``source``: ``("path", checkpoint dir)`` or ``("pickle", bytes)``.
    ``backend="ray"``: ``max(workers, 1)`` Ray tasks on the cluster ``ray`` names, each loading
    the policy from ``source`` (see the module docstring).
    """
    jobs = list(jobs)
    if backend == "ray" and jobs:
        yield from _run_on_ray(jobs, max(1, workers), source or ("pickle", pickle.dumps(policy)), ray or RaySettings())
        return
    if workers <= 1 or len(jobs) <= 1:
        _LOSSLESS.clear()  # the codec is checked once per evaluation (a worker process starts empty)
        try:
            for job in jobs:
                yield run_episode(job, policy)
        finally:
            close_sims()
        return
    if source is None:
        source = ("pickle", pickle.dumps(policy))
    yield from _run_in_workers(jobs, min(workers, len(jobs)), source)


def _run_in_workers(jobs: list[EpisodeJob], workers: int, source: tuple[str, Any]) -> Iterator[EpisodeResult]:
    ctx = multiprocessing.get_context("spawn")
    torch_threads = max(1, (os.cpu_count() or 1) // workers)
    queue = _TaskQueue(jobs)
    pool: list[_Worker] = []

    def start() -> _Worker:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child, source, jobs[0].benchmark, torch_threads), daemon=True)
        process.start()
        child.close()
        worker = _Worker(process, parent)
        pool.append(worker)
        return worker

    try:
        for _ in range(workers):
            start()
        while queue or any(w.job is not None for w in pool):
            for worker in pool:
                if worker.job is None and queue:
                    worker.job = queue.next_for(worker.task, {w.task for w in pool if w is not worker})
                    worker.task = worker.job.task
                    worker.conn.send(worker.job)
            busy = [w for w in pool if w.job is not None]
            readable = wait([w.conn for w in busy] + [w.process.sentinel for w in busy])
            for worker in busy:
                if worker.conn not in readable and worker.process.sentinel not in readable:
                    continue
                message = None
                with contextlib.suppress(EOFError, OSError):
                    if worker.conn.poll():
                        message = worker.conn.recv()
                if message is not None and message[0] == "init_error":
                    raise StageError(f"a worker process could not start (simulator import or policy load): {message[1]}")
                if message is not None and message[0] == "ready":
                    worker.ready = True
                    continue
                if message is not None:
                    worker.job = None
                    yield message[1]
                    continue
                worker.process.join(timeout=10)  # its pipe closed: the process is gone or going
                if not worker.ready:
                    raise StageError(
                        f"a worker process exited while starting ({_status(worker.process.exitcode)}), before any "
                        "episode; run with workers=1 to see its error. A script that evaluates with workers > 1 "
                        "must guard its entry point with `if __name__ == \"__main__\":` (processes are spawned)"
                    )
                yield _died(worker.job, worker.process.exitcode)
                pool.remove(worker)
                worker.conn.close()
                if queue:
                    start()
    finally:
        for worker in pool:
            with contextlib.suppress(Exception):
                worker.conn.send(None)
        for worker in pool:
            worker.process.join(timeout=30)
            if worker.process.is_alive():
                worker.process.terminate()
                worker.process.join(timeout=5)
            with contextlib.suppress(Exception):
                worker.conn.close()


# --------------------------------------------------------------------------- Ray


def episode_groups(jobs: list[EpisodeJob], groups: int) -> list[list[EpisodeJob]]:
    """``jobs`` cut into ``min(groups, len(jobs))`` groups of near-equal size, each a contiguous run
    of the jobs ordered by task (first appearance) then as given: a task's episodes stay in one
    group except where a cut falls inside it, so the environments built in all are at most the
    tasks plus the groups minus one."""
    first = {job.task: None for job in jobs}
    ordered = sorted(jobs, key=lambda job: list(first).index(job.task))
    n = min(groups, len(ordered))
    return [ordered[i * len(ordered) // n:(i + 1) * len(ordered) // n] for i in range(n)] if n else []


def _run_group(source: tuple[str, Any], jobs: list[EpisodeJob], torch_threads: int) -> list[EpisodeResult]:
    """The Ray task: import the simulator, load the policy, run ``jobs`` one after the other."""
    from .simulators import import_simulator

    os.environ.setdefault("LP_NUM_THREADS", "1")  # llvmpipe threads of this process's GL contexts
    import_simulator(jobs[0].benchmark)
    policy = _load_policy(source)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(torch_threads)
    _LOSSLESS.clear()  # a Ray worker process is reused: each group checks the codec afresh, as a spawned worker does
    try:
        return [run_episode(job, policy) for job in jobs]
    finally:
        close_sims()


def _run_on_ray(
    jobs: list[EpisodeJob], groups: int, source: tuple[str, Any], settings: RaySettings
) -> Iterator[EpisodeResult]:
    ray, started = connect(settings)  # an address that does not answer fails here, before any episode
    pending: list = []
    try:
        cpus = settings.cpus_per_stage if settings.cpus_per_stage is not None else 1.0
        gpus = settings.gpus_per_stage or 0.0
        check_fits(ray, cpus, gpus, "a group of episodes", "lower ray.cpus_per_stage / ray.gpus_per_stage")
        task = ray.remote(_run_group)
        source_ref = ray.put(source)
        parts = episode_groups(jobs, groups)
        refs = [task.options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=f"eval_{part[0].task}_{i}")
                .remote(source_ref, part, max(1, int(cpus))) for i, part in enumerate(parts)]  # fmt: skip
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            part = parts[index[done[0]]]
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayTaskError as exc:  # the group raised before its episodes (they catch their own)
                cause = exc.cause if isinstance(exc.cause, BaseException) else exc
                first = (str(cause).strip().splitlines() or [""])[0]
                raise StageError(f"a Ray worker could not start its episodes (simulator import or policy load): "
                                 f"{type(cause).__name__}: {first}") from None  # fmt: skip
            except ray.exceptions.RayError as exc:  # the worker or its node died: its group's episodes only
                first = (str(exc).strip().splitlines() or [""])[0]
                reason = f"Ray worker died while running this episode's group ({type(exc).__name__}: {first})"
                results = [_failed(job, reason) for job in part]
            yield from results
    finally:
        for ref in pending:
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        if started:
            ray.shutdown()
