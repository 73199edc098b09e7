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
import contextlib
import os
import subprocess
import sys
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np

from ..runs import StageError
from ..seeding import keyed_seed

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
    "hand-insert-v3": "pick up the block and put it into the hole in the table",
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
    "push-back-v3": "pull the block back to the goal",
    "reach-v3": "reach the goal position with the gripper",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the block and place it on the shelf",
    "sweep-into-v3": "sweep the block into the hole",
    "sweep-v3": "sweep the block off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}

@dataclass(frozen=True)
class TaskObjects:
    """What a question may call a task's things, in the order of Meta-World's observation slots.

    ``objects``: names of the observation's object positions (``obs[4:7]``, ``obs[11:14]``);
    ``goal``: what the goal position is (``None`` where it is not a thing one can point at, e.g.
    a button's pressed-in depth); ``verb``: what the gripper does at the task's interaction point;
    ``target``: which point that is (``object``: the first object's position, which Meta-World
    places at the handle, button top or grasp point; ``goal``: the goal position, for reaching).
    """

    objects: tuple[str, ...]
    goal: Optional[str]
    verb: str
    target: Literal["object", "goal"] = "object"


def _objects(*objects: str, goal: Optional[str] = None, verb: str, target: str = "object") -> TaskObjects:
    return TaskObjects(tuple(objects), goal, verb, target)  # type: ignore[arg-type]


_GOAL = "goal position"
TASK_OBJECTS: dict[str, TaskObjects] = {
    "assembly-v3": _objects("nut", goal="peg", verb="grasp"),
    "basketball-v3": _objects("basketball", goal="hoop", verb="grasp"),
    "bin-picking-v3": _objects("puck", goal="blue bin", verb="grasp"),
    "box-close-v3": _objects("lid", goal="box", verb="grasp"),
    "button-press-topdown-v3": _objects("button", verb="press"),
    "button-press-topdown-wall-v3": _objects("button", verb="press"),
    "button-press-v3": _objects("button", verb="press"),
    "button-press-wall-v3": _objects("button", verb="press"),
    "coffee-button-v3": _objects("coffee machine button", verb="press"),
    "coffee-pull-v3": _objects("mug", goal=_GOAL, verb="grasp"),
    "coffee-push-v3": _objects("mug", goal=_GOAL, verb="push"),
    "dial-turn-v3": _objects("dial", verb="turn"),
    "disassemble-v3": _objects("nut", verb="grasp"),
    "door-close-v3": _objects("door handle", verb="push"),
    "door-lock-v3": _objects("door lock", verb="turn"),
    "door-open-v3": _objects("door handle", verb="pull"),
    "door-unlock-v3": _objects("door lock", verb="turn"),
    "hand-insert-v3": _objects("block", goal="hole", verb="grasp"),
    "drawer-close-v3": _objects("drawer handle", verb="push"),
    "drawer-open-v3": _objects("drawer handle", verb="pull"),
    "faucet-open-v3": _objects("faucet handle", verb="turn"),
    "faucet-close-v3": _objects("faucet handle", verb="turn"),
    "hammer-v3": _objects("hammer", "nail", verb="grasp"),
    "handle-press-side-v3": _objects("handle", verb="press"),
    "handle-press-v3": _objects("handle", verb="press"),
    "handle-pull-side-v3": _objects("handle", verb="pull"),
    "handle-pull-v3": _objects("handle", verb="pull"),
    "lever-pull-v3": _objects("lever", verb="pull"),
    "pick-place-wall-v3": _objects("puck", goal=_GOAL, verb="grasp"),
    "pick-out-of-hole-v3": _objects("puck", goal=_GOAL, verb="grasp"),
    "pick-place-v3": _objects("puck", goal=_GOAL, verb="grasp"),
    "plate-slide-v3": _objects("plate", goal=_GOAL, verb="push"),
    "plate-slide-side-v3": _objects("plate", goal=_GOAL, verb="push"),
    "plate-slide-back-v3": _objects("plate", goal=_GOAL, verb="push"),
    "plate-slide-back-side-v3": _objects("plate", goal=_GOAL, verb="push"),
    "peg-insert-side-v3": _objects("peg", goal="hole", verb="grasp"),
    "peg-unplug-side-v3": _objects("peg", verb="grasp"),
    "soccer-v3": _objects("soccer ball", goal="soccer goal", verb="push"),
    "stick-push-v3": _objects("stick", "box", verb="grasp"),
    "stick-pull-v3": _objects("stick", "box", verb="grasp"),
    "push-v3": _objects("puck", goal=_GOAL, verb="push"),
    "push-wall-v3": _objects("puck", goal=_GOAL, verb="push"),
    "push-back-v3": _objects("block", goal=_GOAL, verb="push"),
    "reach-v3": _objects("puck", goal=_GOAL, verb="reach", target="goal"),
    "reach-wall-v3": _objects("puck", goal=_GOAL, verb="reach", target="goal"),
    "shelf-place-v3": _objects("block", goal="shelf", verb="grasp"),
    "sweep-into-v3": _objects("block", goal="hole", verb="push"),
    "sweep-v3": _objects("block", verb="push"),
    "window-open-v3": _objects("window handle", verb="push"),
    "window-close-v3": _objects("window handle", verb="push"),
}
MAX_OBJECTS = 2  # object slots of the Meta-World observation


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


def _load_triton_before_gl() -> None:
    """Import Triton, if installed, before the first offscreen GL context of this process.

    Mesa's software renderer (llvmpipe, behind EGL and OSMesa here) loads its own LLVM when a
    context is made; importing Triton afterwards - which ``torch.compile``, ``torch._dynamo`` and
    ``torchvision.ops`` do - loads Triton's bundled LLVM beside it and the process segfaults. In
    the other order both work, so a process that renders and then runs a compiled or torchvision
    model (evaluation rollouts, the test suite) imports Triton first (~0.4 s, once).
    """
    if "triton" in sys.modules:
        return
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        return
    with contextlib.suppress(Exception):  # a broken Triton install must not stop rendering
        import triton  # noqa: F401


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
    return keyed_seed(base_seed, task, index)


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
    metres along the viewing axis. Projection uses :meth:`intrinsics` (from the vertical field of
    view ``model.cam_fovy``) and :meth:`extrinsics` (from the pose ``data.cam_xpos/xmat``), the
    calibration ``sim collect`` records (:mod:`midtrain.data.calibration`).
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
        _load_triton_before_gl()
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
        _track_view(self)

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

    def intrinsics(self) -> np.ndarray:
        """``(fx, fy, cx, cy)`` in pixels of the upright image (MuJoCo cameras have square pixels and
        the principal point at the image centre; the focal length follows from ``cam_fovy``)."""
        focal = 0.5 * self.height / np.tan(np.deg2rad(self.model.cam_fovy[self.camera_id]) / 2)
        return np.array([focal, focal, self.width / 2, self.height / 2])

    def extrinsics(self, data: Any) -> np.ndarray:
        """World -> camera ``[R | t]`` (3x4) in OpenCV axes of the upright image (see
        :mod:`midtrain.data.calibration`). MuJoCo's camera frame is x right, y up, looking along -z,
        so OpenCV's is that turned by ``diag(1, -1, -1)``; an upside-down camera turned upright is
        a further half turn about the view axis, ``diag(-1, 1, -1)`` in all."""
        to_camera = data.cam_xmat[self.camera_id].reshape(3, 3).T  # rows: camera axes in world
        flip = np.diag([-1.0, 1.0, -1.0]) if self.upside_down else np.diag([1.0, -1.0, -1.0])
        rotation = flip @ to_camera
        return np.hstack([rotation, (-rotation @ data.cam_xpos[self.camera_id])[:, None]])

    def project(self, data: Any, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from ..data.calibration import project_points

        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return project_points(points, self.intrinsics(), self.extrinsics(data))

    def close(self) -> None:
        if self in _open_views:
            _open_views.discard(self)
            self.renderer.close()


_open_views: "weakref.WeakSet[CameraView]" = weakref.WeakSet()
_exit_hook_registered = False


def _track_view(view: CameraView) -> None:
    """Remember an open view, and on the first one register the exit hook that frees them. It is
    registered after mujoco was imported (and registered its own EGL teardown), so it runs
    before that teardown: renderers garbage-collected after it print EGL errors."""
    global _exit_hook_registered
    _open_views.add(view)
    if not _exit_hook_registered:
        atexit.register(_close_open_views)
        _exit_hook_registered = True


def _close_open_views() -> None:
    for view in list(_open_views):
        view.close()


# --------------------------------------------------------------------------- episodes


# Per-frame ground truth recorded beside each frame (feature key -> names of its entries); the
# camera's calibration features are added per camera (:func:`ground_truth_features`).
WORLD_FRAME = (
    "Meta-World world frame, metres: +x the robot's right, +y forward (away from the robot base), +z up; "
    "the table top is z = 0"
)
GROUND_TRUTH_FEATURES: dict[str, list[str]] = {
    "observation.ee_pos": ["x", "y", "z"],  # tool centre point: midway between the fingertips
    "observation.gripper_opening": ["opening"],  # finger distance / 0.1 m, clipped to [0, 1] (as state[3])
    "observation.contact": ["in_contact"],  # 1.0 while a gripper geom touches a movable scene object
    "observation.object_pos": [f"object{i + 1}_{a}" for i in range(MAX_OBJECTS) for a in "xyz"],  # zeros: no object
    "observation.goal_pos": ["x", "y", "z"],
}


def camera_features(camera: str) -> dict[str, list[str]]:
    """The per-frame calibration features of ``camera`` (see :mod:`midtrain.data.calibration`)."""
    from ..data.calibration import EXTRINSICS_NAMES, INTRINSICS_NAMES

    return {f"observation.cameras.{camera}.intrinsics": INTRINSICS_NAMES,
            f"observation.cameras.{camera}.extrinsics": EXTRINSICS_NAMES}  # fmt: skip


def ground_truth_features(camera: str) -> dict[str, list[str]]:
    """Every ground-truth feature ``run_episode`` records with ``camera``: key -> entry names."""
    return {**GROUND_TRUTH_FEATURES, **camera_features(camera)}


class GroundTruthProbe:
    """Reads the simulator's ground truth for the current state of ``env``, as float32 vectors
    keyed like :func:`ground_truth_features`.

    Contact: any MuJoCo contact between a geom of the gripper (the ``right_hand`` body and its
    subtree: wrist, fingers, pads) and a geom of a movable scene object (a body tree with a joint
    that is not the robot's: pucks, doors, drawers, buttons, ...). The table and walls do not count.
    """

    def __init__(self, env: Any, view: CameraView):
        model = env.model
        self.env, self.view = env, view
        root_name = "right_hand" if _has_body(model, "right_hand") else "hand"
        gripper_root = model.body(root_name).id
        parents = model.body_parentid
        in_gripper = np.zeros(model.nbody, dtype=bool)
        for b in range(model.nbody):  # parents precede children in MuJoCo's body order
            in_gripper[b] = b == gripper_root or (b > 0 and in_gripper[parents[b]])
        robot_root = model.body_rootid[gripper_root]
        movable_roots = {int(model.body_rootid[b]) for b in range(model.nbody) if model.body_jntnum[b] > 0} - {robot_root}
        movable = np.isin(model.body_rootid, list(movable_roots)) & (np.arange(model.nbody) > 0)
        self.gripper_geom = in_gripper[model.geom_bodyid]
        self.object_geom = movable[model.geom_bodyid]
        self.intrinsics = view.intrinsics().astype(np.float32)
        self.camera = view.camera

    def in_contact(self) -> bool:
        data = self.env.data
        n = data.ncon
        if n == 0:
            return False
        g1, g2 = data.contact.geom1[:n], data.contact.geom2[:n]
        pairs = (self.gripper_geom[g1] & self.object_geom[g2]) | (self.gripper_geom[g2] & self.object_geom[g1])
        return bool(pairs.any())

    def __call__(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        objects = np.concatenate([obs[4:7], obs[11:14]])
        return {
            "observation.ee_pos": np.asarray(self.env.tcp_center, dtype=np.float32),
            "observation.gripper_opening": np.asarray(obs[3:4], dtype=np.float32),
            "observation.contact": np.array([float(self.in_contact())], dtype=np.float32),
            "observation.object_pos": objects.astype(np.float32),
            "observation.goal_pos": np.asarray(obs[36:39], dtype=np.float32),
            f"observation.cameras.{self.camera}.intrinsics": self.intrinsics,
            f"observation.cameras.{self.camera}.extrinsics": self.view.extrinsics(self.env.data).reshape(12).astype(np.float32),
        }  # fmt: skip


def _has_body(model: Any, name: str) -> bool:
    try:
        model.body(name)
    except KeyError:
        return False
    return True


@dataclass
class Episode:
    """One recorded episode. frames uint8 [T, H, W, 3]; state float32 [T, 4]; action float32
    [T, 4] (the clipped action executed after observing frame t); ``success`` is Meta-World's
    success flag at the last step; ``ground_truth``: feature key -> float32 [T, d] recorded with
    each frame (:func:`ground_truth_features`)."""

    task: str
    index: int
    seed: int
    frames: np.ndarray
    state: np.ndarray
    action: np.ndarray
    success: bool
    fps: int
    render_seconds: float = 0.0
    ground_truth: dict[str, np.ndarray] = field(default_factory=dict)


def reset_env(env: Any, seed: int) -> np.ndarray:
    """Reset ``env`` to the initial state of ``seed`` and return the first observation.

    ``env.reset`` moves the goal marker and objects in the model but leaves MuJoCo's derived
    quantities (site and camera poses) stale until the first step; ``mj_forward`` brings them up
    to date, so the first rendered frame shows the goal where it is. It changes no state, so the
    rollout is the same as without it.
    """
    mujoco = import_mujoco()
    env.seed(seed)
    obs, _ = env.reset()  # resets MjData (mj_resetData) and draws the initial state from the seeded generator
    mujoco.mj_forward(env.model, env.data)
    return obs


def run_episode(
    env: Any, view: CameraView, policy: Callable[[np.ndarray], np.ndarray], seed: int, max_steps: int,
    task: str = "", index: int = 0,
) -> Episode:  # fmt: skip
    """Reset ``env`` to the initial state of ``seed`` and roll ``policy`` out until Meta-World
    reports success or ``max_steps`` steps have been taken; a frame and its ground truth are
    recorded before every step."""
    render_before = view.render_seconds
    obs = reset_env(env, seed)
    probe = GroundTruthProbe(env, view)
    frames, states, actions, truth = [], [], [], []
    success = False
    for _ in range(max_steps):
        frames.append(view.rgb(env.data))
        states.append(obs[:4])
        truth.append(probe(obs))
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
        ground_truth={key: np.stack([t[key] for t in truth]) for key in truth[0]},
    )  # fmt: skip
