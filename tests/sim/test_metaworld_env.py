"""Meta-World environments, upright rendering, camera projection and seeded episodes."""

from __future__ import annotations

import numpy as np
import pytest

from midtrain.runs import StageError
from midtrain.sim.metaworld_env import (
    TASK_INSTRUCTIONS, TASK_OBJECTS, CameraView, episode_seed, make_env, make_policy, reset_env, run_episode,
)  # fmt: skip


@pytest.fixture(scope="module")
def pick_place():
    env = make_env("pick-place-v3")
    env.seed(3)
    env.reset()
    return env


@pytest.mark.parametrize("camera", ["corner", "corner2", "behindGripper"])
def test_projection_lands_on_the_puck_in_the_upright_image(pick_place, camera):
    """The projected puck centre is on the puck in the segmentation render and red in the RGB
    render; for the upside-down corner cameras this holds only if images and projection are
    both turned upright."""
    env = pick_place
    view = CameraView(env.model, camera, 96, 96)
    try:
        puck = env.model.geom("objGeom").id
        pixels, depth = view.project(env.data, env.data.geom_xpos[puck])
        x, y = pixels[0]
        seg = view.segmentation(env.data)
        rgb = view.rgb(env.data)
    finally:
        view.close()
    assert depth[0] > 0
    row, col = int(y), int(x)
    assert seg[row, col] == puck
    ys, xs = np.nonzero(seg == puck)
    assert np.hypot(xs.mean() + 0.5 - x, ys.mean() + 0.5 - y) < 1.5  # projected centre = mask centre
    r, g, b = rgb[row, col].astype(int)
    assert r > g + 40 and r > b + 40, rgb[row, col]


def test_corner_camera_is_upright(pick_place):
    """A point above the table projects higher in the image than the table point below it."""
    view = CameraView(pick_place.model, "corner", 64, 64)
    try:
        pixels, _ = view.project(pick_place.data, np.array([[0.0, 0.7, 0.0], [0.0, 0.7, 0.4]]))
        seg = view.segmentation(pick_place.data)
    finally:
        view.close()
    assert pixels[1, 1] < pixels[0, 1] - 5
    floor_rows = np.nonzero((seg == pick_place.model.geom("floor").id).any(axis=1))[0]
    if len(floor_rows):  # the floor, when visible, is in the lower half
        assert floor_rows.mean() > 32


@pytest.mark.parametrize("camera", ["corner", "topview"])
def test_extrinsics_are_the_camera_pose_in_opencv_axes(pick_place, camera):
    """[R|t] maps the camera centre (MuJoCo's cam_xpos) to 0, R is a rotation, and a point on the
    viewing axis (MuJoCo cameras look along their -z) projects to the principal point (cx, cy)."""
    view = CameraView(pick_place.model, camera, 80, 60)
    try:
        ext, intr = view.extrinsics(pick_place.data), view.intrinsics()
    finally:
        view.close()
    cid = view.camera_id
    centre, axes = pick_place.data.cam_xpos[cid], pick_place.data.cam_xmat[cid].reshape(3, 3)
    rotation = ext[:, :3]
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(3), atol=1e-9)
    assert np.linalg.det(rotation) == pytest.approx(1.0)
    np.testing.assert_allclose(rotation @ centre + ext[:, 3], 0, atol=1e-9)
    ahead = centre - 0.7 * axes[:, 2]
    cam = rotation @ ahead + ext[:, 3]
    assert cam[2] == pytest.approx(0.7)
    np.testing.assert_allclose(intr[2:] + intr[:2] * cam[:2] / cam[2], [40, 30], atol=1e-9)


def test_first_frame_shows_the_goal_where_it_is():
    """reset_env brings site poses up to date: the reach goal (a red sphere) is drawn at its position in
    frame 0, which a bare env.reset() does not do."""
    env = make_env("reach-v3")
    view = CameraView(env.model, "corner", 64, 64)
    try:
        colours = []
        for fixed in (True, False):
            if fixed:
                obs = reset_env(env, 5)
            else:
                env.seed(5)
                obs, _ = env.reset()
            (x, y), = view.project(env.data, obs[36:39])[0]
            colours.append(view.rgb(env.data)[int(y), int(x)].astype(int))
    finally:
        view.close()
    (r, g, b), stale = colours
    assert r > 180 and g < 60 and b < 60
    assert not (stale[0] > 180 and stale[1] < 60), stale


def test_rendering_then_importing_triton_does_not_crash():
    """llvmpipe's LLVM and Triton's: a process that renders and then imports Triton (torch.compile,
    torchvision.ops) used to segfault; CameraView loads Triton first."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    code = ("from midtrain.sim.metaworld_env import CameraView, make_env, reset_env\n"
            "env = make_env('reach-v3'); view = CameraView(env.model, 'corner', 16, 16); reset_env(env, 0)\n"
            "view.rgb(env.data); view.close()\nimport triton\nprint('survived')")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "survived" in proc.stdout, proc.stderr[-2000:]


def test_every_task_names_its_objects():
    assert set(TASK_OBJECTS) == set(TASK_INSTRUCTIONS)
    for task, names in TASK_OBJECTS.items():
        assert 1 <= len(names.objects) <= 2 and names.verb and names.target in ("object", "goal")
        if names.target == "goal":
            assert names.goal, task


def test_unknown_camera_names_the_choices(pick_place):
    with pytest.raises(StageError, match="corner2"):
        CameraView(pick_place.model, "nope", 32, 32)


def test_episodes_are_a_function_of_their_seed():
    """Same seed -> identical frames, states and actions, in a fresh env or a reused one."""
    task = "reach-v3"
    seed = episode_seed(0, task, 1)
    env = make_env(task)
    view = CameraView(env.model, "corner", 32, 32)
    try:
        first = run_episode(env, view, make_policy(task, "expert", seed), seed, 15, task)
        run_episode(env, view, make_policy(task, "expert", 7), 7, 10, task)  # another episode in between
        again = run_episode(env, view, make_policy(task, "expert", seed), seed, 15, task)
        other = run_episode(env, view, make_policy(task, "expert", 8), 8, 15, task)
    finally:
        view.close()
    fresh_env = make_env(task)
    fresh_view = CameraView(fresh_env.model, "corner", 32, 32)
    try:
        fresh = run_episode(fresh_env, fresh_view, make_policy(task, "expert", seed), seed, 15, task)
    finally:
        fresh_view.close()
    for ep in (again, fresh):
        np.testing.assert_array_equal(ep.frames, first.frames)
        np.testing.assert_array_equal(ep.state, first.state)
        np.testing.assert_array_equal(ep.action, first.action)
    assert not np.array_equal(other.state[0], first.state[0]) or not np.array_equal(other.frames[0], first.frames[0])
    assert first.frames.shape == (15, 32, 32, 3) and first.state.shape == (15, 4) and first.action.shape == (15, 4)
    assert first.fps == 80


def test_expert_succeeds_and_standing_still_does_not():
    task = "reach-v3"
    env = make_env(task)
    view = CameraView(env.model, "corner", 32, 32)
    try:
        expert = run_episode(env, view, make_policy(task, "expert", 0), 11, 200, task)
        zero = run_episode(env, view, make_policy(task, "zero", 0), 11, 30, task)
    finally:
        view.close()
    assert expert.success and len(expert.frames) < 200  # stops at success
    assert not zero.success and len(zero.frames) == 30
    assert np.all(np.abs(expert.action) <= 1.0)


def test_every_v3_task_has_an_instruction_and_an_expert():
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS
    from metaworld.policies import ENV_POLICY_MAP

    assert set(TASK_INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS)
    assert set(TASK_INSTRUCTIONS) <= set(ENV_POLICY_MAP)


def test_gl_backend_falls_back_to_osmesa_and_names_packages_when_none_works(monkeypatch):
    from midtrain.sim import metaworld_env

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delenv("PYOPENGL_PLATFORM", raising=False)
    monkeypatch.setattr(metaworld_env, "_MUJOCO_IMPORTED_WITHOUT_BACKEND", False)
    monkeypatch.setattr(metaworld_env, "_gl_backend_works", lambda backend: backend == "osmesa")
    assert metaworld_env.ensure_gl_backend() == "osmesa"
    assert metaworld_env.os.environ["MUJOCO_GL"] == "osmesa"

    monkeypatch.delenv("MUJOCO_GL")
    monkeypatch.setattr(metaworld_env, "_gl_backend_works", lambda backend: False)
    with pytest.raises(StageError, match="libegl1.*libosmesa6"):
        metaworld_env.ensure_gl_backend()
    monkeypatch.setenv("MUJOCO_GL", "egl")  # a user's choice is kept without probing
    assert metaworld_env.ensure_gl_backend() == "egl"
