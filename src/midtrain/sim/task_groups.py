"""Meta-World tasks in groups, and a robot corpus's episodes per group: how the demo and the study
turn one recorded corpus into several VLA sources (a simulator fact, kept with the simulator)."""

from __future__ import annotations

from pathlib import Path

from .metaworld_env import TASK_INSTRUCTIONS

# The demo's robot corpus enters the catalog as two VLA sources, one per task family, as the paper
# compares several robot datasets: tasks that move objects vs tasks that work articulated parts.
# Every Meta-World MT50 task, by kind. "objects": the task moves a free object (puck, ball, mug,
# nut, peg, plate, stick, lid, hammer; reach and reach-wall, which move only the arm, go here too);
# "articulated": the task works a part jointed to a fixed fixture (button, dial, door, lock,
# drawer, faucet, handle, lever, window).
MT50_GROUPS = {
    "metaworld_objects": [
        "assembly-v3", "basketball-v3", "bin-picking-v3", "box-close-v3", "coffee-pull-v3", "coffee-push-v3",
        "disassemble-v3", "hammer-v3", "hand-insert-v3", "peg-insert-side-v3", "peg-unplug-side-v3",
        "pick-out-of-hole-v3", "pick-place-v3", "pick-place-wall-v3", "plate-slide-v3", "plate-slide-side-v3",
        "plate-slide-back-v3", "plate-slide-back-side-v3", "push-v3", "push-wall-v3", "push-back-v3", "reach-v3",
        "reach-wall-v3", "shelf-place-v3", "soccer-v3", "stick-push-v3", "stick-pull-v3", "sweep-v3", "sweep-into-v3",
    ],
    "metaworld_articulated": [
        "button-press-topdown-v3", "button-press-topdown-wall-v3", "button-press-v3", "button-press-wall-v3",
        "coffee-button-v3", "dial-turn-v3", "door-close-v3", "door-lock-v3", "door-open-v3", "door-unlock-v3",
        "drawer-close-v3", "drawer-open-v3", "faucet-open-v3", "faucet-close-v3", "handle-press-side-v3",
        "handle-press-v3", "handle-pull-side-v3", "handle-pull-v3", "lever-pull-v3", "window-open-v3",
        "window-close-v3",
    ],
}  # fmt: skip


def episodes_by_group(lerobot_root: Path, groups: dict[str, list[str]]) -> dict[str, list[int]]:
    """Episode indices of a LeRobot v3.0 dataset per group of task names (from its episode metadata).

    Episodes record their task as the instruction string, mapped back to the Meta-World task
    name through the simulator's instruction table. Episodes of tasks in no group form
    ``metaworld_other``.
    """
    import pyarrow.parquet as pq

    episodes = pq.read_table(sorted((lerobot_root / "meta" / "episodes").glob("*/*.parquet"))[0]).to_pylist()
    instruction_to_task = {v: k for k, v in TASK_INSTRUCTIONS.items()}
    task_to_group = {t: g for g, ts in groups.items() for t in ts}
    out: dict[str, list[int]] = {}
    for ep in episodes:
        tasks = ep["tasks"] if isinstance(ep["tasks"], list) else [ep["tasks"]]
        task = instruction_to_task.get(tasks[0], tasks[0])
        out.setdefault(task_to_group.get(task, "metaworld_other"), []).append(int(ep["episode_index"]))
    return out
