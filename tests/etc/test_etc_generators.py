"""ETC generators on a synthetic episode with an overhead camera: answers against independent oracles."""

from __future__ import annotations

import re

import numpy as np
import pytest
from etc_fixtures import H, W, context, episode, pixel_of

from midtrain.config import ConfigError, load_config
from midtrain.data.calibration import project_points
from midtrain.etc.config import EtcConfig, parse_field_spec
from midtrain.etc.generators import (
    AFTER, APPROACH, CLOSE, CONTACT, GENERATORS, OPEN, action_chunk, frame_order, future_trajectory, gripper_next,
    gripper_state, nearest_object, next_subaction, point_object, relative_position, task_stages,
)  # fmt: skip


def points(text: str) -> np.ndarray:
    return np.array([[float(a), float(b)] for a, b in re.findall(r"\(([-\d.]+), ([-\d.]+)\)", text)])


def test_projection_is_the_pinhole_model():
    pixels, depth = project_points(np.array([[0.1, 0.2, 0.0], [0.0, 0.0, 2.0]]), [50, 50, 32, 32],
                                   np.array([[1.0, 0, 0, 0], [0, -1, 0, 0], [0, 0, -1, 1]]))  # fmt: skip
    np.testing.assert_allclose(pixels[0], [37.0, 22.0])
    assert depth[0] == pytest.approx(1.0) and np.isnan(pixels[1]).all()  # behind the camera: no pixel


def test_point_object_answers_the_projected_position():
    ep = episode(goal=None, goal_name=None)
    qas = list(point_object(ep, np.array([0, 10]), context()))
    assert len(qas) == 2
    u, v = pixel_of([-0.1, 0.05, 0.0])
    np.testing.assert_allclose(points(qas[0].answer)[0], [u / W, v / H], atol=6e-4)


def test_keypoints_outside_the_image_are_dropped_and_counted_not_clipped():
    T = 10
    far = np.tile(np.array([[[3.0, 0.0, 0.0]]]), (T, 1, 1))  # projects to u = 182 > 64
    ctx = context()
    ep = episode(T=T, objects=far, goal=None, goal_name=None)
    assert list(point_object(ep, np.arange(T), ctx)) == []
    assert ctx.counts["keypoints_outside_image"] == T and ctx.counts["questions_dropped_outside_image"] == T
    # a trajectory partly outside: that question is dropped, the others keep all their points in [0, 1]
    ee = np.stack([np.linspace(0, 1.0, 40), np.zeros(40), np.zeros(40)], axis=1)  # leaves the image at x > 0.64
    ctx = context()
    qas = list(future_trajectory(episode(ee_pos=ee), np.arange(0, 40, 2), ctx))
    assert ctx.counts["questions_dropped_outside_image"] > 0 and qas
    for qa in qas:
        pts = points(qa.answer)
        assert len(pts) == 4 and (pts >= 0).all() and (pts <= 1).all()  # 3 decimals: u just below W reads 1.000


def test_future_trajectory_keypoints_follow_the_end_effector():
    ep = episode()
    config = EtcConfig(trajectory_points=3, trajectory_stride=4)
    (qa,) = list(future_trajectory(ep, np.array([5]), context(config)))
    expected = [pixel_of(ep.fields["ee_pos"][5 + 4 * k]) for k in (1, 2, 3)]
    np.testing.assert_allclose(points(qa.answer), np.array(expected) / [W, H], atol=6e-4)
    assert list(future_trajectory(ep, np.array([30]), context(config))) == []  # 30 + 12 is past the end (T = 40)


@pytest.mark.parametrize(
    "axes, obj, words",
    [(["right", "forward", "up"], [-0.1, 0.15, 0.0], "is 15-30 cm from the gripper, to the left, forward and below"),
     (["forward", "left", "up"], [0.1, 0.0, 0.2], "is 5-15 cm from the gripper, forward"),
     (["right", "forward", "up"], [0.005, 0.0, 0.21], "is within 5 cm of the gripper, level with it on every axis")],
)  # fmt: skip
def test_relative_position_names_directions_in_the_robot_frame(axes, obj, words):
    T = 4
    ee = np.tile([0.0, 0.0, 0.2], (T, 1))
    ep = episode(T=T, ee_pos=ee, objects=np.tile(np.array([[obj]]), (T, 1, 1)), goal=None, goal_name=None)
    (qa,) = list(relative_position(ep, np.array([0]), context(EtcConfig(axes=axes))))
    assert qa.answer == f"The puck {words}."


def test_nearest_object_only_with_a_clear_margin():
    T = 2
    objects = np.array([[[0.0, 0.0, 0.1], [0.0, 0.0, 0.5]], [[0.0, 0.0, 0.1], [0.0, 0.0, 0.105]]])  # t=1: a tie
    ep = episode(T=T, ee_pos=np.zeros((T, 3)), objects=objects, names=("puck", "block"), goal=None, goal_name=None)
    ctx = context()
    qas = list(nearest_object(ep, np.arange(T), ctx))
    assert [qa.answer for qa in qas] == ["The puck."] and ctx.counts["questions_ambiguous"] == 1
    assert "the puck or the block" in qas[0].question


def test_task_stages_from_gripper_command_opening_and_contact():
    command = np.array([-1] * 6 + [1] * 10 + [-1] * 6, dtype=float)
    opening = np.array([1.0] * 6 + [0.9, 0.8, 0.7, 0.6] + [0.6] * 6 + [0.7, 0.8, 0.9, 1.0, 1.0, 1.0])
    contact = np.array([False] * 10 + [True] * 6 + [False] * 6)
    stages = task_stages(command, opening, contact, min_steps=1)
    # the trend at t is the change of the opening from t to t + 1
    expected = [APPROACH] * 6 + [CLOSE] * 3 + [APPROACH] + [CONTACT] * 6 + [OPEN] * 3 + [AFTER] * 3
    assert stages.tolist() == expected
    merged = task_stages(command, opening, contact, min_steps=3)  # the 1-step approach run joins the closing run
    assert merged[9] == CLOSE and merged[:6].tolist() == [APPROACH] * 6


def test_next_subaction_is_the_next_stage():
    ep = episode()  # closes at T/2 = 20, touches from 28 on
    qas = {qa.frames[0]: qa.answer for qa in next_subaction(ep, np.array([0, 22, 35]), context())}
    assert qas[0] == "Close the gripper."
    assert qas[22] == "Grasp and move the puck."
    assert qas[35].startswith("Grasp and move the puck until the task is done")


def test_gripper_state_and_next_state():
    ep = episode()
    states = {qa.frames[0]: qa.answer for qa in gripper_state(ep, np.array([0, 21, 39]), context())}
    assert states == {0: "The gripper is open.", 21: "The gripper is closing.",
                      39: "The gripper is closed and holding the puck."}  # fmt: skip
    nxt = {qa.frames[0]: qa.answer for qa in gripper_next(ep, np.array([0, 12, 25]), context(EtcConfig(gripper_horizon=10)))}
    assert nxt == {0: "It will stay open.", 12: "It will close.", 25: "It will stay closed."}


def test_action_chunk_is_the_next_actions_as_text():
    ep = episode()
    (qa,) = list(action_chunk(ep, np.array([3]), context(EtcConfig(action_horizon=2, action_decimals=2))))
    rows = re.findall(r"\[([^\[\]]+)\]", qa.answer)
    got = np.array([[float(v) for v in r.split(", ")] for r in rows])
    np.testing.assert_allclose(got, ep.fields["action"][3:5], atol=0.005 + 1e-9)
    assert "-0.00" not in qa.answer


def test_frame_order_answer_matches_the_image_order():
    ep = episode()
    for qa in frame_order(ep, np.arange(0, 40, 4), context(EtcConfig(frame_order_gap=8))):
        first, second = qa.frames
        assert abs(first - second) >= 8 and qa.question.count("<image>") == 2
        assert qa.answer == ("The first image." if first < second else "The second image.")


def test_every_domain_has_a_generator():
    from midtrain.etc.config import CATEGORIES, DOMAINS

    assert {g.domain for g in GENERATORS.values()} == set(DOMAINS)
    assert {g.category for g in GENERATORS.values()} == set(CATEGORIES)


@pytest.mark.parametrize(
    "override, key",
    [("generators=[nope]", "generators"), ("axes=[right,left,up]", "axes"), ("domains={point_object: Vision}", "domains"),
     ("fields.ee_pos='observation.state[a]'", "fields.ee_pos"), ("distance_buckets_m=[0.3,0.1]", "distance_buckets_m")],
)  # fmt: skip
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(EtcConfig, overrides=[override])


def test_field_specs():
    assert parse_field_spec("action[3]", "k") == ("action", slice(3, 4))
    assert parse_field_spec("observation.state[0:3]", "k") == ("observation.state", slice(0, 3))
    assert parse_field_spec("observation.ee_pos", "k") == ("observation.ee_pos", None)
