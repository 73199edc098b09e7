"""Meta-World closed loop: disjoint initial states, observations as the corpus records them,
outputs, workers vs one process, a crashed worker, and bad input caught before any episode."""

from __future__ import annotations

import os
import signal

import av
import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("metaworld")

from midtrain.config import ConfigError  # noqa: E402
from midtrain.eval.api import EVAL_SEED_OFFSET, eval_seed, evaluate_policy  # noqa: E402
from midtrain.eval.config import EvalSettings  # noqa: E402
from midtrain.eval.policies import (  # noqa: E402
    IMAGE_PREFIX, MetaWorldExpertPolicy, PolicyInterface, RandomActionPolicy, save_scripted_policy,
)  # fmt: skip
from midtrain.runs import StageError  # noqa: E402
from midtrain.sim.metaworld_env import (  # noqa: E402
    DEFAULT_TASKS, TASK_INSTRUCTIONS, CameraView, episode_seed, make_env, make_policy, run_episode,
)  # fmt: skip

CORNER = IMAGE_PREFIX + "corner"


def test_eval_seeds_are_disjoint_from_every_collection_seed():
    collection = {episode_seed(s, t, i) for s in range(4) for t in DEFAULT_TASKS for i in range(100)}
    evaluation = {eval_seed("metaworld", s, t, i) for s in range(4) for t in DEFAULT_TASKS for i in range(100)}
    # sim collect's seeds are 32-bit (SeedSequence.generate_state -> uint32) for ANY seed/task/index;
    # evaluation seeds are offset past them, so the sets cannot meet.
    assert max(collection) < EVAL_SEED_OFFSET <= min(evaluation)
    assert len(evaluation) == 4 * len(DEFAULT_TASKS) * 100


@pytest.mark.parametrize("task", ["push-v3", "pick-place-v3"])
def test_eval_initial_states_differ_from_the_recorded_ones(task):
    env = make_env(task)

    def initial_state(seed):
        env.seed(seed)
        obs, _ = env.reset()
        return np.concatenate([env._last_rand_vec, obs[4:7]])  # sampled object/goal positions, object as placed

    recorded = np.stack([initial_state(episode_seed(0, task, i)) for i in range(40)])  # sim collect, seed 0
    evaluated = np.stack([initial_state(eval_seed("metaworld", 0, task, i)) for i in range(10)])
    gaps = np.abs(evaluated[:, None, :] - recorded[None, :, :]).max(-1)
    assert gaps.min() > 1e-4  # no evaluation episode starts where a recorded one did
    assert np.abs(evaluated[:, None] - evaluated[None]).max(-1)[~np.eye(10, dtype=bool)].min() > 1e-4


class RecordingExpert(MetaWorldExpertPolicy):
    interface = PolicyInterface(action_dim=4, camera_keys=(CORNER,), state_dim=4, needs_env_state=True)

    def __init__(self):
        super().__init__()
        self.seen = []

    def select_action(self, observation):
        self.seen.append(dict(observation))  # a copy made now: the fast path renders a frame when it is read
        return super().select_action(observation)


@pytest.mark.parametrize("fast_path", [True, False])
def test_observations_are_what_sim_collect_records(tmp_path, fast_path):
    """Raw frames: bitwise the frames ``sim collect`` records from the same initial state
    (camera, size, upright orientation), the same state vector and the same instruction."""
    task, steps = "push-v3", 25
    policy = RecordingExpert()
    settings = EvalSettings(tasks=[task], episodes_per_task=1, max_steps=steps, frames="raw", workers=1, videos_per_task=0,
                            fast_path=fast_path)  # fmt: skip
    evaluate_policy(policy, settings, tmp_path)
    env = make_env(task)
    view = CameraView(env.model, "corner", 128, 128)
    try:
        recorded = run_episode(env, view, make_policy(task, "expert", 0), eval_seed("metaworld", 0, task, 0), steps)
    finally:
        view.close()
    seen = policy.seen
    assert len(seen) == len(recorded.frames) == steps
    assert all(o["task"] == TASK_INSTRUCTIONS[task] for o in seen)
    np.testing.assert_array_equal(np.stack([o[CORNER] for o in seen]), recorded.frames)
    np.testing.assert_array_equal(np.stack([o["observation.state"] for o in seen]), recorded.state)
    assert seen[0][CORNER].dtype == np.uint8 and seen[0]["observation.state"].dtype == np.float32


def test_expert_evaluation_writes_episodes_results_and_videos(expert_eval):
    out, results = expert_eval
    assert results["tasks"]["push-v3"]["successes"] == 2 and results["tasks"]["drawer-open-v3"]["successes"] == 2
    assert results["mean_success"] == 1.0 and results["mean_success_ci95"][1] == 1.0
    assert results["observation"]["frames"] == "codec" and results["observation"]["codec"]["encoder"] == "libx264"
    rows = pq.read_table(out / "episodes.parquet").to_pylist()
    assert [(r["task"], r["episode"]) for r in rows] == [("push-v3", 0), ("push-v3", 1), ("drawer-open-v3", 0),
                                                         ("drawer-open-v3", 1)]  # fmt: skip
    assert all(r["seed"] >= EVAL_SEED_OFFSET and r["outcome"] == "success" and r["failure"] == "" for r in rows)
    assert [r["length"] for r in rows[:2]] == results["tasks"]["push-v3"]["lengths"]
    videos = [r for r in rows if r["video"]]
    assert [r["episode"] for r in videos] == [0, 0]  # the first videos_per_task=1 episode of each task
    for r in videos:
        with av.open(str(out / r["video"])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == r["length"] + 1 and frames[0].shape == (128, 128, 3)  # before each action, and after
    shares = results["timing"]["shares"]
    assert shares["render"] > 0 and shares["physics"] > 0 and abs(sum(shares.values()) - 1) < 1e-3


class DiesOnTask(MetaWorldExpertPolicy):
    """The expert, except that its process is killed (as by a segfault) on one task."""

    def __init__(self, fatal_task):
        super().__init__()
        self.fatal_instruction = TASK_INSTRUCTIONS[fatal_task]

    def select_action(self, observation):
        if observation["task"] == self.fatal_instruction:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().select_action(observation)


@pytest.mark.slow
def test_workers_reproduce_the_in_process_episodes_and_record_a_dead_worker(tmp_path, expert_eval):
    _, in_process = expert_eval  # push-v3 and drawer-open-v3, 2 episodes each, one process
    settings = EvalSettings(tasks=["push-v3", "drawer-open-v3", "reach-v3"], episodes_per_task=2, max_steps=150,
                            workers=2, videos_per_task=0)  # fmt: skip
    results = evaluate_policy(DiesOnTask("drawer-open-v3"), settings, tmp_path)
    assert results["tasks"]["push-v3"]["lengths"] == in_process["tasks"]["push-v3"]["lengths"]
    assert results["tasks"]["push-v3"]["successes"] == 2
    assert results["tasks"]["reach-v3"]["successes"] == 2  # workers replaced after the deaths carry on
    rows = pq.read_table(tmp_path / "episodes.parquet").to_pylist()
    dead = [r for r in rows if r["task"] == "drawer-open-v3"]
    assert len(dead) == 2 and all(r["outcome"] == "error" and not r["success"] for r in dead)
    assert all("worker process died" in r["failure"] and "SIGKILL" in r["failure"] for r in dead)
    assert results["errors"] == 2 and results["tasks"]["drawer-open-v3"]["errors"] == 2


def test_bad_input_fails_before_any_episode(tmp_path, expert_dir, monkeypatch):
    with pytest.raises(StageError, match=r"policy action dimension 7 does not match metaworld's 4-D actions"):
        evaluate_policy(RandomActionPolicy(7), EvalSettings(tasks=["push-v3"], workers=1), tmp_path / "a")
    with pytest.raises(ConfigError, match="did you mean 'drawer-open-v3'"):
        EvalSettings(tasks=["drawer-opn-v3"])
    wrong_camera = RecordingExpert()
    wrong_camera.interface = PolicyInterface(action_dim=4, camera_keys=(IMAGE_PREFIX + "wrist",))
    with pytest.raises(StageError, match="camera key 'observation.images.wrist' is not a metaworld camera"):
        evaluate_policy(wrong_camera, EvalSettings(tasks=["push-v3"], workers=1), tmp_path / "b")
    monkeypatch.setenv("MUJOCO_GL", "no-such-backend")
    with pytest.raises(StageError, match="MUJOCO_GL=no-such-backend: no offscreen OpenGL context"):
        evaluate_policy(expert_dir, EvalSettings(tasks=["push-v3"], workers=1), tmp_path / "c")
    assert not any((tmp_path / d / "episodes.parquet").exists() for d in "abc")


def test_the_corpus_decides_frame_size_and_codec(tmp_path):
    import json

    meta = tmp_path / "corpus" / "meta"
    meta.mkdir(parents=True)
    video = {"video.codec": "h264", "video.pix_fmt": "yuv444p", "video.crf": 10}
    features = {CORNER: {"dtype": "video", "shape": [64, 96, 3], "info": video}}
    (meta / "info.json").write_text(json.dumps({"fps": 80, "features": features}))
    policy = RecordingExpert()
    settings = EvalSettings(tasks=["reach-v3"], episodes_per_task=1, max_steps=2, corpus=tmp_path / "corpus", workers=1)
    results = evaluate_policy(policy, settings, tmp_path / "out")
    obs = results["observation"]
    assert (obs["height"], obs["width"], obs["size_from"]) == (64, 96, "corpus")
    assert (obs["codec"]["encoder"], obs["codec"]["pix_fmt"], obs["codec"]["crf"], obs["codec"]["source"]) == (
        "libx264", "yuv444p", 10, "corpus")
    assert policy.seen[0][CORNER].shape == (64, 96, 3)
    other = RecordingExpert()
    other.interface = PolicyInterface(action_dim=4, camera_keys=(IMAGE_PREFIX + "corner2",))
    with pytest.raises(StageError, match="the corpus has no camera 'observation.images.corner2'"):
        evaluate_policy(other, settings, tmp_path / "out2")


def test_an_episode_that_raises_is_recorded_and_the_rest_run(tmp_path):
    class BadShape(MetaWorldExpertPolicy):
        def select_action(self, observation):
            if observation["task"] == TASK_INSTRUCTIONS["reach-v3"]:
                return np.zeros(3)
            return super().select_action(observation)

    results = evaluate_policy(BadShape(), EvalSettings(tasks=["reach-v3", "push-v3"], episodes_per_task=1, max_steps=5,
                                                       workers=1, videos_per_task=0), tmp_path)  # fmt: skip
    rows = {r["task"]: r for r in pq.read_table(tmp_path / "episodes.parquet").to_pylist()}
    assert rows["reach-v3"]["outcome"] == "error" and "action of shape (3,)" in rows["reach-v3"]["failure"]
    assert rows["push-v3"]["outcome"] == "step_limit" and rows["push-v3"]["length"] == 5
    assert results["errors"] == 1
