"""Meta-World v3 for corpus collection: environments with seeded initial states, offscreen
CPU rendering, scripted expert policies and one natural-language instruction per task.

Rendering goes through ``mujoco.Renderer`` on the environment's own model (not the gymnasium
render path) so that we control the scene: shadows are off (about 4x faster on llvmpipe), and
so are mirror reflections (another ~25%) and 4x multisampling (another ~2x; edges are a little
aliased), the
Meta-World ``corner*`` cameras - which are mounted upside down - are turned upright, and the
same camera can project world points to pixels (:meth:`CameraView.project`) and render a
segmentation image to check them.

MuJoCo picks its GL backend when it is first imported, from ``MUJOCO_GL``. Everything here
calls :func:`ensure_gl_backend` before importing ``mujoco``/``metaworld``: it keeps a
user-set ``MUJOCO_GL``, otherwise uses EGL if an EGL context can be created and falls back
to OSMesa.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np

from ..runs import StageError

# One instruction per Meta-World v3 task, in the imperative voice of robot datasets.
TASK_INSTRUCTIONS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and dunk it into the hoop",
    "bin-picking-v3": "pick up the puck from the red bin and place it into the blue bin",
    "box-close-v3": "pick up the lid and close the box with it",
    "button-press-topdown-v3": "press the button down from the top",
    "button-press-topdown-wall-v3": "reach over the wall and press the button down from the top",
    "button-press-v3": "push the button on the front of the box",
    "button-press-wall-v3": "reach behind the wall and push the button",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the mug out from under the coffee machine",
    "coffee-push-v3": "push the mug under the coffee machine",
    "dial-turn-v3": "turn the dial half a turn",
    "disassemble-v3": "pick the nut up off the peg",
    "door-close-v3": "push the door closed",
    "door-lock-v3": "lock the door by turning the lock down",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "unlock the door by turning the lock up",
    "hand-insert-v3": "insert the gripper into the hole in the table",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open",
    "faucet-open-v3": "turn the faucet handle to the left to open it",
    "faucet-close-v3": "turn the faucet handle to the right to close it",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the puck up out of the hole",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways out of the cabinet",
    "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
    "peg-unplug-side-v3": "pull the peg sideways out of the socket",
    "soccer-v3": "push the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and push the box with it",
    "stick-pull-v3": "grasp the stick and pull the box with it",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "pull the puck back to the goal",
    "reach-v3": "reach the goal position with the gripper",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it on the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

# Ten tasks with different objects and motions (reach, push, grasp, articulated, tool use).
DEFAULT_TASKS: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3",
    "button-press-topdown-v3", "window-close-v3", "faucet-open-v3", "coffee-push-v3", "basketball-v3",
)  # fmt: skip

# Cameras of the Meta-World scene (``xyz_base.xml``). The corner cameras are mounted upside down.
CAMERAS: tuple[str, ...] = ("corner", "corner2", "corner3", "corner4", "topview", "behindGripper", "gripperPOV")
UPSIDE_DOWN_CAMERAS = frozenset({"corner", "corner2", "corner3", "corner4"})

# The proprioceptive state recorded per step (the first four entries of the Meta-World
# observation, as LeRobot's Meta-World environment uses them) and the action layout.
STATE_NAMES = ["hand_x", "hand_y", "hand_z", "gripper_opening"]
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper_effort"]
MAX_EPISODE_STEPS = 500  # Meta-World's max_path_length: stepping beyond it raises

PolicyKind = Literal["expert", "random", "zero"]

_INSTALL_HINT = "install the simulator extra: pip install 'midtrain[sim]' (metaworld, mujoco)"


# --------------------------------------------------------------------------- GL backend

_MUJOCO_IMPORTED_WITHOUT_BACKEND = False  # mujoco was imported before MUJOCO_GL was chosen


def _gl_backend_works(backend: str) -> bool:
    """Whether an offscreen ``backend`` context can be created, tried in a child process
    (a failed EGL/OSMesa initialisation can leave the current process unusable)."""
    probe = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"
    env = {**os.environ, "MUJOCO_GL": backend, "PYOPENGL_PLATFORM": backend}
    try:
        proc = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


def ensure_gl_backend() -> str:
    """Set ``MUJOCO_GL`` for offscreen rendering (before mujoco is imported) and return it.

    A user-set ``MUJOCO_GL`` is kept. Otherwise EGL is used if it works, else OSMesa;
    if neither works the error names the Debian packages to install.
    """
    global _MUJOCO_IMPORTED_WITHOUT_BACKEND
    chosen = os.environ.get("MUJOCO_GL", "").strip().lower()
    if chosen:
        return chosen
    _MUJOCO_IMPORTED_WITHOUT_BACKEND = "mujoco" in sys.modules
    for backend in ("egl", "osmesa"):
        if _gl_backend_works(backend):
            os.environ["MUJOCO_GL"] = backend
            os.environ.setdefault("PYOPENGL_PLATFORM", backend)
            return backend
    raise StageError(
        "no offscreen OpenGL backend for MuJoCo: neither EGL nor OSMesa could create a context. "
        "Install EGL (apt-get install -y libegl1 libgl1 libegl-mesa0 libgl1-mesa-dri) or OSMesa "
        "(apt-get install -y libosmesa6), or set MUJOCO_GL to a backend that works here."
    )


def import_mujoco():
    """``mujoco``, imported after choosing the GL backend, or an install hint."""
    ensure_gl_backend()
    try:
        import mujoco
    except ImportError as exc:
        raise StageError(f"mujoco is not installed ({exc}); {_INSTALL_HINT}") from None
    return mujoco


def _metaworld_modules():
    import_mujoco()
    try:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS
        from metaworld.policies import ENV_POLICY_MAP
    except ImportError as exc:
        raise StageError(f"metaworld is not installed ({exc}); {_INSTALL_HINT}") from None
    return ALL_V3_ENVIRONMENTS, ENV_POLICY_MAP


def metaworld_asset_path(relative: str) -> str:
    """Absolute path of a file under Meta-World's ``assets/`` folder."""
    import importlib.util

    spec = importlib.util.find_spec("metaworld")
    if spec is None or not spec.submodule_search_locations:
        raise StageError(f"metaworld is not installed; {_INSTALL_HINT}")
    return os.path.join(list(spec.submodule_search_locations)[0], "assets", relative)


# --------------------------------------------------------------------------- environments


def episode_seed(base_seed: int, task: str, index: int) -> int:
    """A per-episode seed that depends only on (seed, task, episode index), not on which
    worker runs it or in which order, so a collection is reproducible at any parallelism."""
    return int(np.random.SeedSequence([base_seed, zlib.crc32(task.encode()), index]).generate_state(1)[0])


def make_env(task: str):
    """A goal-observable Meta-World v3 env whose ``reset`` draws a new random initial
    state (object and goal positions) from the env's own seeded generator.

    This is what ``metaworld``'s goal-observable env classes do, minus their fixed
    initial state: ``_freeze_rand_vec`` off and ``seeded_rand_vec`` on, so
    ``env.seed(s); env.reset()`` gives the initial state of seed ``s``.
    """
    envs, _ = _metaworld_modules()
    if task not in envs:
        raise StageError(f"unknown Meta-World v3 task {task!r}; known tasks: {', '.join(sorted(envs))}")
    env = envs[task]()
    env._partially_observable = False  # the goal is part of the observation, as the expert policies expect
    env.__dict__.pop("sawyer_observation_space", None)  # cached property: recompute for the new observability
    env._freeze_rand_vec = False
    env.seeded_rand_vec = True
    env._set_task_called = True
    env.max_path_length = MAX_EPISODE_STEPS
    return env


def make_policy(task: str, kind: PolicyKind, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """obs -> action. ``expert``: the task's scripted Meta-World policy; ``random``: uniform
    actions; ``zero``: standing still. The last two (almost) never succeed: baselines for
    failure data and for checking the success filter."""
    if kind == "expert":
        _, policies = _metaworld_modules()
        if task not in policies:
            raise StageError(f"Meta-World has no scripted expert policy for task {task!r}")
        policy = policies[task]()

        def expert(obs: np.ndarray) -> np.ndarray:
            with warnings.catch_warnings():
                # The scripted policies warn on every step that their gains exceed the action
                # range; the env clips actions (as run_episode does), so the warning is noise.
                warnings.filterwarnings("ignore", message=r"Constant\(s\) may be too high")
                return policy.get_action(obs)

        return expert
    if kind == "random":
        rng = np.random.default_rng(seed)
        return lambda obs: rng.uniform(-1.0, 1.0, size=4)
    if kind == "zero":
        return lambda obs: np.zeros(4)
    raise ValueError(f"unknown policy kind {kind!r}")


# --------------------------------------------------------------------------- rendering


class CameraView:
    """Upright offscreen renders of one named camera of a MuJoCo model; shadows, reflections and
    multisampling off.

    ``rgb(data)`` -> uint8 [H, W, 3]; ``segmentation(data)`` -> int32 [H, W] geom ids (-1 where
    no geom); ``project(data, points)`` -> float [N, 2] pixel coordinates (x right, y down, in
    pixels of the upright image, pixel (i, j) covering [j, j+1) x [i, i+1)) and depth [N] in
    metres along the viewing axis. Projection uses the camera's pose ``data.cam_xpos/xmat``
    and vertical field of view ``model.cam_fovy`` (MuJoCo cameras look along their -z axis).
    """

    def __init__(self, model: Any, camera: str, width: int, height: int):
        mujoco = import_mujoco()
        self._mujoco = mujoco
        self.model = model
        self.camera = camera
        self.width, self.height = int(width), int(height)
        self.camera_id = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera)
        if self.camera_id < 0:
            names = [model.camera(i).name for i in range(model.ncam)]
            raise StageError(f"camera {camera!r} is not in the Meta-World scene; cameras: {', '.join(names)}")
        self.upside_down = camera in UPSIDE_DOWN_CAMERAS
        model.vis.global_.offwidth = max(model.vis.global_.offwidth, self.width)
        model.vis.global_.offheight = max(model.vis.global_.offheight, self.height)
        model.vis.quality.offsamples = 0  # no multisampling: read when the offscreen buffer is made
        try:
            self.renderer = mujoco.Renderer(model, self.height, self.width)
        except Exception as exc:  # GL context creation fails with backend-specific types
            late = (
                " mujoco was imported before MUJOCO_GL was set, so it chose its default (GLFW) backend: "
                "set MUJOCO_GL=egl in the environment before starting Python."
                if _MUJOCO_IMPORTED_WITHOUT_BACKEND
                else ""
            )
            raise StageError(
                f"offscreen rendering failed with MUJOCO_GL={os.environ.get('MUJOCO_GL', '')!r}: "
                f"{type(exc).__name__}: {str(exc).strip()}.{late} Install EGL (apt-get install -y libegl1 "
                "libgl1) or set MUJOCO_GL=osmesa (apt-get install -y libosmesa6)."
            ) from None
        # Shadows and the table's mirror reflection each cost a render pass on llvmpipe.
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = False
        self.renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = False
        self.render_seconds = 0.0
        self.frames_rendered = 0
        _open_views.add(self)

    def _upright(self, image: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(image[::-1, ::-1]) if self.upside_down else image

    def rgb(self, data: Any) -> np.ndarray:
        t0 = time.perf_counter()
        self.renderer.update_scene(data, camera=self.camera_id)
        image = self._upright(self.renderer.render())
        self.render_seconds += time.perf_counter() - t0
        self.frames_rendered += 1
        return image

    def segmentation(self, data: Any) -> np.ndarray:
        self.renderer.update_scene(data, camera=self.camera_id)
        self.renderer.enable_segmentation_rendering()
        try:
            seg = self.renderer.render()
        finally:
            self.renderer.disable_segmentation_rendering()
        geom_ids = np.where(seg[..., 1] == int(self._mujoco.mjtObj.mjOBJ_GEOM), seg[..., 0], -1)
        return self._upright(geom_ids.astype(np.int32))

    def project(self, data: Any, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        rotation = data.cam_xmat[self.camera_id].reshape(3, 3)  # columns: camera axes in world
        in_camera = (points - data.cam_xpos[self.camera_id]) @ rotation  # [N, 3], row-wise R^T (p - c)
        depth = -in_camera[:, 2]
        focal = 0.5 * self.height / np.tan(np.deg2rad(self.model.cam_fovy[self.camera_id]) / 2)
        safe = np.where(depth > 1e-9, depth, np.nan)
        x = self.width / 2 + focal * in_camera[:, 0] / safe
        y = self.height / 2 - focal * in_camera[:, 1] / safe
        if self.upside_down:
            x, y = self.width - x, self.height - y
        return np.stack([x, y], axis=1), depth

    def close(self) -> None:
        _open_views.discard(self)
        self.renderer.close()


_open_views: "weakref.WeakSet[CameraView]" = weakref.WeakSet()


@atexit.register
def _close_open_views() -> None:
    """Free GL contexts before MuJoCo's own exit hook tears EGL down (registered earlier, so run
    later); otherwise renderers garbage-collected at shutdown print EGL errors."""
    for view in list(_open_views):
        view.close()


# --------------------------------------------------------------------------- episodes


@dataclass
class Episode:
    """One recorded episode. frames uint8 [T, H, W, 3]; state float32 [T, 4]; action float32
    [T, 4] (the clipped action executed after observing frame t); ``success`` is Meta-World's
    success flag at the last step."""

    task: str
    index: int
    seed: int
    frames: np.ndarray
    state: np.ndarray
    action: np.ndarray
    success: bool
    fps: int
    render_seconds: float = 0.0


def run_episode(
    env: Any, view: CameraView, policy: Callable[[np.ndarray], np.ndarray], seed: int, max_steps: int,
    task: str = "", index: int = 0,
) -> Episode:  # fmt: skip
    """Reset ``env`` to the initial state of ``seed`` and roll ``policy`` out until Meta-World
    reports success or ``max_steps`` steps have been taken; a frame is rendered before every step."""
    render_before = view.render_seconds
    env.seed(seed)
    obs, _ = env.reset()  # resets MjData (mj_resetData) and draws the initial state from the seeded generator
    frames, states, actions = [], [], []
    success = False
    for _ in range(max_steps):
        frames.append(view.rgb(env.data))
        states.append(obs[:4])
        action = np.clip(np.asarray(policy(obs), dtype=np.float64), -1.0, 1.0).astype(np.float32)
        actions.append(action)
        obs, _, _, _, info = env.step(action)
        if info.get("success"):
            success = True
            break
    fps = int(round(1.0 / (env.model.opt.timestep * env.frame_skip)))
    return Episode(
        task=task, index=index, seed=seed, frames=np.stack(frames), state=np.asarray(states, dtype=np.float32),
        action=np.stack(actions), success=success, fps=fps, render_seconds=view.render_seconds - render_before,
    )  # fmt: skip
