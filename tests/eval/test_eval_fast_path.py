"""The fast path (frames made only when read, the codec dropped once shown lossless) gives the
policy the same frames, so the same actions and outcomes, as today's path - and makes fewer."""

from __future__ import annotations

import copy
import hashlib
import pickle

import numpy as np
import pytest

from midtrain.eval import rollout
from midtrain.eval.codec import resolve_codec
from midtrain.eval.config import CodecSettings
from midtrain.eval.policies import PolicyInterface
from midtrain.eval.rollout import EpisodeJob, Observation, ObservationSpec, run_episode

CORNER = "observation.images.corner"
GRIPPER = "observation.images.gripperPOV"
H = W = 32
LOSSY = resolve_codec(CodecSettings(name="libx264", crf=23, pix_fmt="yuv420p"), None, 80)
LOSSLESS = resolve_codec(CodecSettings(name="libx264rgb", crf=0, pix_fmt="rgb24"), None, 80)


class FakeSim:
    """A deterministic 'simulator': the state moves with the actions, each camera's frame is a
    textured image that depends on the state (so a lossy codec changes it); success when the
    state passes a threshold. Counts what is rendered."""

    def __init__(self, cameras):
        self.cameras = dict(cameras)
        self.physics_s = self.render_s = 0.0
        self.rendered: list[str] = []

    def reset(self, seed, init_state):
        self.pos = np.random.default_rng(seed).uniform(-1, 1, 4)
        self.t = 0

    def render(self, key):
        self.rendered.append(key)
        rng = np.random.default_rng([self.t, int(1e6 * abs(self.pos[0])) % 2**31, len(key)])
        base = rng.integers(0, 256, (H // 4, W // 4, 3), dtype=np.uint8)
        return np.kron(base, np.ones((4, 4, 1), dtype=np.uint8))  # blocks: a real image for the codec

    def state(self):
        return self.pos[:4].astype(np.float32), self.pos.copy()

    def observe(self):
        return {key: self.render(key) for key in self.cameras}, *self.state()

    def step(self, action):
        self.pos = self.pos + 0.05 * np.clip(action, -1, 1)
        self.t += 1
        return bool(self.pos.sum() > 1.5)

    def close(self):
        pass


class ChunkedFramePolicy:
    """Reads its camera once per chunk of ``chunk`` actions (as a VLA executing whole chunks);
    every action depends on the exact pixels read; keeps a digest of every frame it saw."""

    def __init__(self, keys=(CORNER,), chunk=4, declare=True):
        if declare:
            self.interface = PolicyInterface(action_dim=4, camera_keys=tuple(keys), state_dim=4)
        else:
            self.action_dim, self.state_dim = 4, 4
        self.keys, self.chunk = keys, chunk
        self.seen: list[str] = []

    def reset(self):
        self.queue = []

    def select_action(self, observation):
        if not self.queue:
            pixels = np.concatenate([observation[k].ravel() for k in self.keys]).astype(np.float64)
            self.seen.append(hashlib.sha1(b"".join(observation[k].tobytes() for k in self.keys)).hexdigest())
            state = np.asarray(observation["observation.state"], dtype=np.float64)
            self.queue = [np.tanh(state * (i + 1) + pixels[i :: 7].mean() / 255 - 0.3) for i in range(self.chunk)]
        return self.queue.pop(0).astype(np.float32)


def _jobs(codec, fast, cameras=((CORNER, "corner"),), read_keys=(CORNER,), video_path=None, n=3, steps=30):
    spec = ObservationSpec(tuple(cameras), H, W, codec, 80.0, CORNER, read_keys, fast)
    return [EpisodeJob("metaworld", "", "fake-v3", "do it", i, 1000 + i, None, steps, spec, 4,
                       video_path if i == 0 else None) for i in range(n)]  # fmt: skip


def _run(monkeypatch, jobs, policy):
    sims = []

    def fake_sim_for(job):
        sims.append(FakeSim(job.obs.cameras))
        return sims[-1]

    monkeypatch.setattr(rollout, "_sim_for", fake_sim_for)
    results = list(rollout.run_episodes(jobs, policy, workers=1))
    rendered = [key for sim in sims for key in sim.rendered]
    return results, rendered


@pytest.mark.parametrize("codec", [LOSSY, LOSSLESS, None], ids=["h264-crf23", "lossless", "raw"])
def test_fast_path_gives_the_policy_the_same_frames_and_actions(monkeypatch, codec):
    base_policy, fast_policy = ChunkedFramePolicy(), ChunkedFramePolicy()
    base, base_rendered = _run(monkeypatch, _jobs(codec, False), base_policy)
    fast, fast_rendered = _run(monkeypatch, _jobs(codec, True), fast_policy)
    assert [(r.success, r.length, r.outcome) for r in fast] == [(r.success, r.length, r.outcome) for r in base]
    assert fast_policy.seen == base_policy.seen and len(base_policy.seen) > 3  # bit-identical frames read
    steps = sum(r.length for r in base)
    assert len(base_rendered) == steps  # today: every camera, every step
    if codec is LOSSY:  # a lossy stream needs every frame of the camera the policy reads, in order
        assert len(fast_rendered) == steps
        assert [r.codec_lossless for r in fast] == [False] * 3
        assert sum(r.timings["codec_s"] > 0 for r in fast) == 3
    else:  # one frame per chunk (after the first LOSSLESS_CHECK_FRAMES frames of the check)
        assert len(fast_rendered) <= rollout.LOSSLESS_CHECK_FRAMES + len(base_policy.seen)
    if codec is LOSSLESS:
        assert fast[-1].codec_lossless is True and fast[-1].timings["codec_s"] == 0.0


def test_the_lossless_check_is_what_drops_the_codec(monkeypatch):
    """A codec that is lossy is never dropped: a policy reading frames through it on the fast path
    sees exactly the baseline's decoded frames, which differ from raw renders."""
    raw_policy, lossy_policy = ChunkedFramePolicy(), ChunkedFramePolicy()
    _run(monkeypatch, _jobs(None, True, n=1), raw_policy)
    _run(monkeypatch, _jobs(LOSSY, True, n=1), lossy_policy)
    assert raw_policy.seen[0] != lossy_policy.seen[0]


def test_cameras_nobody_reads_are_not_rendered_and_videos_still_get_every_frame(monkeypatch, tmp_path):
    cameras = ((CORNER, "corner"), (GRIPPER, "gripperPOV"))
    policy = ChunkedFramePolicy(keys=(GRIPPER,), chunk=5)
    jobs = _jobs(LOSSY, True, cameras=cameras, read_keys=(GRIPPER,), video_path=str(tmp_path / "v.mp4"), n=2)
    results, rendered = _run(monkeypatch, jobs, policy)
    first, second = results
    corner = rendered.count(CORNER)
    assert corner == first.length + 1  # the video camera: every step of the recorded episode, and the last state
    assert first.video and (tmp_path / "v.mp4").stat().st_size > 0 and second.video is None
    assert rendered.count(GRIPPER) == first.length + second.length  # read through a lossy stream: every step


def test_a_policy_that_declares_no_cameras_still_gets_every_camera(monkeypatch):
    """Undeclared cameras (read_keys None) are all offered: lazily, or eagerly under a lossy codec."""
    policy = ChunkedFramePolicy(declare=False)
    results, rendered = _run(monkeypatch, _jobs(LOSSY, True, read_keys=None, n=1), policy)
    assert results[0].outcome != "error" and len(rendered) == results[0].length


def test_observation_renders_on_first_read_and_refuses_a_late_read():
    made = []
    obs = Observation({"task": "t"}, [CORNER, GRIPPER], lambda key: made.append(key) or np.zeros((2, 2, 3), np.uint8))
    assert CORNER in obs and "nope" not in obs and len(obs) == 3 and set(obs) == {"task", CORNER, GRIPPER}
    assert made == []  # membership, length and iteration render nothing
    obs[CORNER], obs[CORNER]
    assert made == [CORNER]
    with pytest.raises(KeyError):
        obs["nope"]
    copied = copy.deepcopy(obs)  # a policy that keeps the observation: a plain dict, every frame made now
    assert type(copied) is dict and set(copied) == {"task", CORNER, GRIPPER} and made == [CORNER, GRIPPER]
    assert type(pickle.loads(pickle.dumps(obs))) is dict and type(copy.copy(obs)) is dict
    obs = Observation({"task": "t"}, [CORNER, GRIPPER], lambda key: made.append(key) or np.zeros((2, 2, 3), np.uint8))
    obs[CORNER]
    obs.expire()
    assert obs[CORNER].shape == (2, 2, 3)  # read in time: kept
    with pytest.raises(RuntimeError, match="after select_action returned"):
        obs[GRIPPER]


@pytest.mark.slow
@pytest.mark.parametrize("frames", ["lossless", "h264"])
def test_metaworld_episodes_are_identical_on_both_paths(tmp_path, frames):
    """Real Meta-World episodes (the scripted expert nudged by the pixels it reads once per chunk):
    the same per-episode success, length and actions on today's path and the fast path."""
    pytest.importorskip("metaworld")
    import pyarrow.parquet as pq

    from midtrain.eval.api import evaluate_policy
    from midtrain.eval.config import EvalSettings
    from midtrain.eval.policies import MetaWorldExpertPolicy

    class PixelNudgedExpert(MetaWorldExpertPolicy):
        interface = PolicyInterface(action_dim=4, camera_keys=(CORNER,), state_dim=4, needs_env_state=True)

        def __init__(self):
            super().__init__()
            self.actions, self.t = [], 0

        def reset(self):
            self.t = 0

        def select_action(self, observation):
            action = super().select_action(observation)
            if self.t % 8 == 0:
                self.nudge = (observation[CORNER].astype(np.float64).mean() / 255 - 0.5) * 1e-2
            self.t += 1
            self.actions.append(action + self.nudge)
            return self.actions[-1]

    codec = {"lossless": CodecSettings(name="libx264rgb", crf=0, pix_fmt="rgb24"), "h264": CodecSettings()}[frames]
    out = {}
    for fast in (False, True):
        policy = PixelNudgedExpert()
        settings = EvalSettings(tasks=["drawer-open-v3", "reach-v3"], episodes_per_task=2, max_steps=60, workers=1,
                                videos_per_task=0, codec=codec, fast_path=fast)  # fmt: skip
        results = evaluate_policy(policy, settings, tmp_path / str(fast))
        rows = pq.read_table(tmp_path / str(fast) / "episodes.parquet").to_pylist()
        out[fast] = ([(r["task"], r["seed"], r["success"], r["length"]) for r in rows], np.stack(policy.actions), results)
    assert out[True][0] == out[False][0]
    np.testing.assert_array_equal(out[True][1], out[False][1])
    assert sum(r[2] for r in out[True][0]) >= 1  # the nudged expert still succeeds somewhere
    expected = "dropped once" if frames == "lossless" else "applied to every frame the policy reads"
    assert out[True][2]["observation"]["codec"]["round_trip"].startswith(expected)
