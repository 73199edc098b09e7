"""Settings checks, Wilson intervals and the per-task summary (no simulator needed)."""

from __future__ import annotations

import pytest
from scipy.stats import binomtest

from midtrain.config import ConfigError, load_config
from midtrain.eval.config import EvalConfig, EvalSettings
from midtrain.eval.policies import PolicyInterface, RandomActionPolicy, interface_of
from midtrain.eval.results import summarize, wilson_interval
from midtrain.eval.rollout import EpisodeResult
from midtrain.runs import StageError


def test_unknown_task_names_the_closest_ones():
    with pytest.raises(ConfigError, match=r"tasks: unknown Meta-World v3 task 'pick-place-v2'; did you mean 'pick-place-v3'"):
        EvalSettings(tasks=["pick-place-v2"])


@pytest.mark.parametrize("overrides, message", [
    (["policy=p", "max_steps=501"], "max_steps: must be in"),
    (["policy=p", "height=64"], "height, width: give both or neither"),
    (["policy=p", "height=63", "width=64"], "height: must be an even number"),
    (["policy=p", "episodes_per_task=0"], "episodes_per_task: must be >= 1"),
    (["policy=p", "codec.crf=70"], "codec.crf: must be in"),
    (["policy=p", "tasks=[push-v3, push-v3]"], "tasks: listed more than once"),
    ([], "policy: required"),
])  # fmt: skip
def test_bad_settings_are_one_line_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(EvalConfig, overrides=overrides)


def test_wilson_interval_matches_scipy():
    for k, n in [(0, 10), (1, 10), (5, 10), (10, 10), (3, 7), (37, 50)]:
        ci = binomtest(k, n).proportion_ci(method="wilson")
        assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def _result(task, i, success, length, outcome=None):
    return EpisodeResult(task, i, 100 + i, None, success, length, outcome or ("success" if success else "step_limit"),
                         "" if success else "x", None, {})  # fmt: skip


def test_summary_per_task_and_mean():
    results = [_result("a", 0, True, 10), _result("a", 1, True, 20), _result("a", 2, False, 50),
               _result("b", 0, False, 50), _result("b", 1, False, 0, "error"), _result("b", 2, True, 30)]  # fmt: skip
    s = summarize(results, {"a": "do a", "b": "do b"})
    assert s["tasks"]["a"]["success_rate"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["tasks"]["a"]["lengths"] == [10, 20, 50] and s["tasks"]["a"]["mean_length_of_successes"] == 15.0
    assert s["tasks"]["b"]["errors"] == 1 and s["errors"] == 1
    assert s["mean_success"] == pytest.approx(0.5, abs=1e-4)
    lo, hi = wilson_interval(3, 6)
    assert s["mean_success_ci95"] == [round(lo, 4), round(hi, 4)]


def test_interface_is_read_from_attributes_or_lerobot_features():
    class LeRobotLike:
        class config:  # noqa: N801 - mimics policy.config.input_features / output_features
            input_features = {"observation.images.corner": {"shape": [3, 96, 96]}, "observation.state": {"shape": [4]}}
            output_features = {"action": {"shape": [4]}}

        def reset(self): ...
        def select_action(self, observation): ...

    got = interface_of(LeRobotLike())
    assert got == PolicyInterface(action_dim=4, camera_keys=("observation.images.corner",), image_size=(96, 96), state_dim=4)
    assert interface_of(RandomActionPolicy(7)).action_dim == 7

    class Silent:
        def reset(self): ...
        def select_action(self, observation): ...

    class VLAPolicyLike:  # midtrain.policy.VLAPolicy keeps its interface in a PolicyConfig
        class config:  # noqa: N801
            action_dim, state_dim, camera_keys, image_size = 7, 0, ["observation.images.image"], [256, 256]

        def reset(self): ...
        def select_action(self, observation): ...

    got = interface_of(VLAPolicyLike())
    assert got == PolicyInterface(action_dim=7, camera_keys=("observation.images.image",), image_size=(256, 256))

    with pytest.raises(StageError, match="does not declare its action dimension"):
        interface_of(Silent())
