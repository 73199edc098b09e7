"""Robot data for policy training: the bad-input checks (one line naming dataset, episode and frame,
or a recorded skip) and the split by episode."""

from __future__ import annotations

import numpy as np
import pytest

from midtrain.runs import SampleError, StageError
from midtrain.vla.data import check_rows, lerobot_meta, read_catalog, read_lerobot, split_by_episode
from robot_data import CAMERA, robot_rows, write_lerobot


def _raise(err: SampleError) -> None:
    raise err


@pytest.fixture(scope="module")
def nan_dataset(tmp_path_factory):
    return write_lerobot(tmp_path_factory.mktemp("nan") / "robot", episodes=3, length=6, nan_action=(1, 3))


def test_nan_in_an_action_names_dataset_episode_and_frame(nan_dataset):
    rows, _ = read_lerobot(nan_dataset, 4, None, None, 1, 0, _raise)
    with pytest.raises(SampleError) as info:
        check_rows(rows, str(nan_dataset), 4, 4, None, None, _raise)
    msg = str(info.value)
    assert "\n" not in msg and str(nan_dataset) in msg and "episode 1 frame 0" in msg and "NaN or inf in action" in msg
    assert "frame 3" in msg  # where the NaN is: step 3 of the chunk that starts at frame 0


def test_nan_frames_are_skipped_and_recorded_under_on_error_skip(nan_dataset):
    rows, _ = read_lerobot(nan_dataset, 4, None, None, 1, 0, _raise)
    skipped: list[SampleError] = []
    kept, counts = check_rows(rows, str(nan_dataset), 4, 4, None, None, skipped.append)
    bad = {(e.where.rsplit(" frame ", 1)[0].rsplit(" episode ", 1)[1], int(e.where.rsplit(" ", 1)[1])) for e in skipped}
    assert bad == {("1", 0), ("1", 1), ("1", 2), ("1", 3)}  # every chunk that reaches frame 3 of episode 1
    assert counts["frames"] == 18 - 4 and counts["frames_skipped"] == 4 and len(kept) == 14
    assert all(np.isfinite(np.asarray(r["action"])[:4]).all() for r in kept)


def test_short_episodes_and_dimension_mismatches():
    rows = robot_rows(episodes=2, length=5, chunk=4) + robot_rows(episodes=1, length=2, chunk=4, source="short")
    skipped: list[SampleError] = []
    kept, counts = check_rows(rows, "robots", 4, 4, None, None, skipped.append)
    assert [e.reason for e in skipped] == ["episode shorter than needed"]
    assert "source short episode 0" in skipped[0].where and "2 frames < 4" in skipped[0].detail
    assert counts["episodes"] == 2 and counts["episodes_skipped"] == 1 and len(kept) == 10
    with pytest.raises(SampleError, match="action dimension differs.*3-D action, expected 4-D \\(the policy"):
        three = [dict(r, action=np.asarray(r["action"])[:, :3].tolist()) for r in rows]
        check_rows(three, "robots", 4, 4, 4, None, _raise, "the policy checkpoint p")
    with pytest.raises(SampleError, match="state dimension differs"):
        check_rows([dict(rows[0], state=[0.0, 1.0])] + rows[1:], "robots", 4, 4, None, 4, _raise)
    with pytest.raises(StageError, match="action chunks of 4 steps, but policy.chunk_size is 8"):
        check_rows(rows, "robots", 8, 8, None, None, _raise)


def test_a_camera_the_dataset_lacks_is_named(tmp_path):
    root = write_lerobot(tmp_path / "robot", episodes=1, length=4)
    assert lerobot_meta(root, None).cameras == [CAMERA]
    with pytest.raises(StageError, match="camera 'observation.images.wrist' is not in the dataset; its cameras are"):
        lerobot_meta(root, ["observation.images.wrist"])


def test_catalog_sources_and_cameras(tmp_path):
    from catalog_rows import write_catalog

    catalog = write_catalog(tmp_path / "run", {"robot": robot_rows(episodes=2, length=3), "other": robot_rows(1, 3, source="other")})
    rows, _ = read_catalog(catalog, ["robot"], None)
    assert {r["source"] for r in rows} == {"robot"} and len(rows) == 6
    with pytest.raises(StageError, match="no VLA rows"):
        read_catalog(catalog, ["nope"], None)
    with pytest.raises(StageError, match="camera 'observation.images.top' is not in this source"):
        read_catalog(catalog, [], ["observation.images.top"])


def test_split_holds_out_whole_episodes():
    rows = robot_rows(episodes=5, length=3) + robot_rows(episodes=2, length=3, source="b")
    train, val, held = split_by_episode(rows, 0.3, seed=0)
    key = lambda r: (r["source"], r["episode"])  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in val})
    assert len(held) == 2 and len(train) + len(val) == len(rows)
    assert sorted({key(r) for r in val}) == sorted(tuple(h) for h in held)
    assert split_by_episode(rows, 0.3, seed=0)[2] == held and split_by_episode(rows, 0.3, seed=1)[2] != held
    assert split_by_episode(rows[:3], 0.5, 0)[1] == []  # one episode: nothing to hold out
