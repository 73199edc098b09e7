"""ETC stage outputs for tests outside ``tests/etc`` (co-training, recipes): ``midtrain etc`` run on a
small LeRobot dataset without simulator ground truth (``etc_fixtures.plain_dataset`` + an overhead
camera calibration, the end effector read from the state), which writes five of the seven domains:
Plan & Reasoning, Camera Prediction, Egocentric Understanding, Temporal Understanding, Action-NTP."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "etc"))  # etc_fixtures, when tests/etc is not collected

WRITTEN = ("plan_reasoning", "camera_prediction", "egocentric", "temporal", "action_ntp")


def etc_run(run_dir, data_dir: Path, name: str = "etc", episodes: int = 3, generators=None) -> Path:
    """Run ``midtrain etc`` (stage folder ``name``) into ``run_dir`` on a fresh plain dataset under ``data_dir``."""
    from etc_fixtures import plain_dataset, write_calibration

    from midtrain.etc.config import EtcConfig
    from midtrain.etc.stage import generate_etc
    from midtrain.runs import RunDir

    data_dir.mkdir(parents=True, exist_ok=True)
    root = data_dir / f"plain_{episodes}"
    if not root.exists():
        plain_dataset(root, episodes=episodes)
    cal = write_calibration(data_dir / "cal.json")
    config = EtcConfig(name=name, dataset=root, calibration=cal, generators=list(generators or []),
                       fields={"ee_pos": "observation.state[0:3]", "gripper_command": "action[3]"})  # fmt: skip
    return generate_etc(config, run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir))
