"""``backend: ray``: episodes cut into groups that keep a task's episodes together, run as Ray
tasks on a local 2-CPU cluster with the same episodes, results and videos as the local backend;
a dead Ray worker fails its group's episodes only; an address that does not answer or a group no
node can fit is refused in one line before any episode."""

from __future__ import annotations

import hashlib
import os
import signal
from pathlib import Path

import pytest

from midtrain.config import ConfigError
from midtrain.eval.config import EvalSettings
from midtrain.eval.rollout import EpisodeJob, ObservationSpec, episode_groups
from midtrain.runs import StageError

ray = pytest.importorskip("ray")


def _job(task: str, index: int) -> EpisodeJob:
    obs = ObservationSpec(cameras=(), height=16, width=16, codec=None, fps=10.0, video_key="")
    return EpisodeJob("metaworld", "", task, task, index, index, None, 5, obs, 4)


def test_episode_groups_keep_a_tasks_episodes_together_and_balance_sizes():
    jobs = [_job(t, i) for i in range(2) for t in ("a", "b", "c")]  # interleaved: a0 b0 c0 a1 b1 c1
    groups = episode_groups(jobs, 3)
    assert [[(j.task, j.index) for j in g] for g in groups] == [[("a", 0), ("a", 1)], [("b", 0), ("b", 1)],
                                                                [("c", 0), ("c", 1)]]  # fmt: skip
    two = episode_groups(jobs, 2)  # 3 tasks over 2 groups: one cut falls inside b
    assert [[(j.task, j.index) for j in g] for g in two] == [[("a", 0), ("a", 1), ("b", 0)],
                                                             [("b", 1), ("c", 0), ("c", 1)]]  # fmt: skip
    many = episode_groups(jobs, 10)  # more groups than jobs: one episode each
    assert len(many) == 6 and sorted((j.task, j.index) for g in many for j in g) == sorted(
        (j.task, j.index) for j in jobs)
    assert [len(g) for g in episode_groups([_job("a", i) for i in range(7)], 3)] == [2, 2, 3]
    assert episode_groups([], 2) == []


def test_an_address_that_does_not_answer_fails_in_one_line_before_any_episode(tmp_path, expert_dir):
    pytest.importorskip("metaworld")
    from midtrain.eval.api import evaluate_policy

    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    settings = EvalSettings(tasks=["push-v3"], episodes_per_task=2, backend="ray", ray={"address": "127.0.0.1:1"})
    with pytest.raises(StageError, match=r"^ray\.address: no Ray cluster answers at '127\.0\.0\.1:1' \(Connection"):
        evaluate_policy(expert_dir, settings, tmp_path)
    assert not (tmp_path / "episodes.parquet").exists()


class DiesOnTask:
    """The scripted expert, except that its process is killed (as by a segfault) on one task."""

    def __init__(self, fatal_task):
        from midtrain.eval.policies import MetaWorldExpertPolicy
        from midtrain.sim.metaworld_env import TASK_INSTRUCTIONS

        self.expert, self.fatal_instruction = MetaWorldExpertPolicy(), TASK_INSTRUCTIONS[fatal_task]
        self.interface = self.expert.interface

    def reset(self):
        self.expert.reset()

    def select_action(self, observation):
        if observation["task"] == self.fatal_instruction:
            os.kill(os.getpid(), signal.SIGKILL)
        return self.expert.select_action(observation)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local 2-CPU cluster whose workers can import this module (the pickled test policy)."""
    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent)] + ([before] if before else []))
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        if before is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = before
    yield ray
    ray.shutdown()


def _episodes(out: Path) -> list[dict]:
    """Each episode's row without its timings, and the digest of its video's decoded frames."""
    import av
    import pyarrow.parquet as pq

    rows = []
    for row in pq.read_table(out / "episodes.parquet").to_pylist():
        row = {k: v for k, v in row.items() if not k.endswith("_s")}
        if row["video"]:
            with av.open(str(out / row["video"])) as container:
                frames = b"".join(f.to_ndarray(format="rgb24").tobytes() for f in container.decode(video=0))
            row["video_frames_sha1"] = hashlib.sha1(frames).hexdigest()
        rows.append(row)
    return rows


@pytest.mark.slow  # starts a local Ray cluster and simulates 8 episodes (a few minutes on the shared 2 cores)
def test_ray_backend_writes_the_local_backends_episodes_results_and_videos(tmp_path, expert_dir, expert_eval,
                                                                           ray_cluster):  # fmt: skip
    from midtrain.eval.api import evaluate_policy

    local_out, local = expert_eval  # push-v3 and drawer-open-v3, 2 episodes each, in this process
    settings = EvalSettings(tasks=["push-v3", "drawer-open-v3"], episodes_per_task=2, max_steps=150, workers=2,
                            videos_per_task=1, backend="ray")  # fmt: skip
    on_ray = evaluate_policy(expert_dir, settings, tmp_path)
    rows, local_rows = _episodes(tmp_path), _episodes(local_out)
    assert [r["video_frames_sha1"] for r in rows if r["video"]] and rows == local_rows
    assert {t: (v["successes"], v["lengths"]) for t, v in on_ray["tasks"].items()} == {
        t: (v["successes"], v["lengths"]) for t, v in local["tasks"].items()}
    assert on_ray["files"] == local["files"] and on_ray["observation"] == local["observation"]

    wide = EvalSettings(tasks=["push-v3"], episodes_per_task=1, backend="ray", ray={"cpus_per_stage": 8})
    with pytest.raises(ConfigError, match=r"^ray: a group of episodes asks for 8 CPU and 0 GPU per task, and no node"):
        evaluate_policy(expert_dir, wide, tmp_path / "wide")
    assert not (tmp_path / "wide" / "episodes.parquet").exists()


@pytest.mark.slow  # starts a local Ray cluster (see above)
def test_a_dead_ray_worker_fails_its_groups_episodes_only(tmp_path, expert_eval, ray_cluster):
    from midtrain.eval.api import evaluate_policy

    _, local = expert_eval
    settings = EvalSettings(tasks=["push-v3", "drawer-open-v3"], episodes_per_task=2, max_steps=150, workers=2,
                            videos_per_task=0, backend="ray")  # fmt: skip
    results = evaluate_policy(DiesOnTask("drawer-open-v3"), settings, tmp_path)
    assert results["tasks"]["push-v3"]["successes"] == 2
    assert results["tasks"]["push-v3"]["lengths"] == local["tasks"]["push-v3"]["lengths"]
    assert results["errors"] == 2 and results["tasks"]["drawer-open-v3"]["errors"] == 2
    import pyarrow.parquet as pq

    dead = [r for r in pq.read_table(tmp_path / "episodes.parquet").to_pylist() if r["task"] == "drawer-open-v3"]
    assert len(dead) == 2 and all(r["outcome"] == "error" and "Ray worker died" in r["failure"] for r in dead)
    assert all("\n" not in r["failure"] for r in dead)
