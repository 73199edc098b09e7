"""The ``cka`` stage of a study: how far each row's VLM (and VLA backbone) drifted from the base VLM,
as linear CKA per layer on the same robot frames (:mod:`midtrain.experiments.study.cka`).

Output ``<run>/cka/cka.json``::

    {"frames": n, "layers": L + 1, "frame_ids": [...],
     "models": {label: {"path": ..., "cka": [CKA of layer 0 (embeddings), 1, ..., L]}}}

Labels are the study's (``<row>`` for a row's VLM, ``<row>/vla_s<seed>`` for a trained VLA's
backbone). The frames are ``frames`` rows spread evenly over the robot dataset (every episode
represented), each with its instruction, as the policies see them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...config import StageConfig, option
from ...runs import RunDir, StageError, stage_run, write_json_atomic
from .cka import cka_per_layer, evenly_spaced, layer_representations

CKA_FILE = "cka.json"


@dataclass
class CKAStageConfig(StageConfig):
    """What the ``cka`` stage compares (its fingerprint)."""

    base: str = option("", "the reference VLM")
    models: dict[str, str] = option(factory=dict, help="label -> VLM checkpoint compared with the base")
    robot_data: str = option("", "the LeRobot dataset the frames come from")
    frames: int = option(64, "frames represented")
    batch_size: int = option(8, "frames per forward pass", throughput=True)


def robot_frames(root: Path, n: int, seed: int) -> list[dict]:
    """``n`` frames spread evenly over a LeRobot dataset (decoding about 4n frames, not all of them)."""
    from ...data.lerobot import load_lerobot_info
    from ...vla.data import read_lerobot

    total = int(load_lerobot_info(root).get("total_frames") or 0)
    stride = max(1, total // (4 * n)) if total else 1

    def refuse(err) -> None:
        raise StageError(f"cka: {err}")

    rows, _ = read_lerobot(root, 1, None, None, stride, seed, refuse)
    if len(rows) < 3:
        raise StageError(f"cka: {root} gives only {len(rows)} frame(s); CKA needs at least 3")
    return evenly_spaced(rows, n)


def measure_drift(config: CKAStageConfig, run_dir: RunDir, name: str = "cka", force: bool = False) -> Path:
    """Compute ``cka.json`` (see the module docstring); returns the stage folder."""
    inputs = {"base": Path(config.base), **{f"model/{k}": Path(v) for k, v in config.models.items()}}
    inputs = {k: v for k, v in inputs.items() if v.exists()}
    with stage_run(run_dir, name, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.final_dir
        with st.timed("frames"):
            frames = robot_frames(Path(config.robot_data), config.frames, config.seed)
        with st.timed("base"):
            base = layer_representations(config.base, frames, config.batch_size)
        out = {"frames": len(frames), "layers": int(base.shape[0]), "base": config.base,
               "frame_ids": [str(f["id"]) for f in frames], "pooling": "mean over image tokens", "models": {}}  # fmt: skip
        for label, path in config.models.items():
            with st.timed(f"model/{label}"):
                reps = layer_representations(path, frames, config.batch_size)
            if reps.shape[:2] != base.shape[:2]:
                raise StageError(f"cka: {path} has {reps.shape[0]} layers, the base {base.shape[0]}; CKA per layer needs the same architecture")
            out["models"][label] = {"path": path, "cka": [round(c, 6) for c in cka_per_layer(base, reps)]}
            st.log.info("cka %s: %s", label, " ".join(f"{c:.3f}" for c in out["models"][label]["cka"]))
        write_json_atomic(Path(st.dir) / CKA_FILE, out)
        st.counts.update(frames=len(frames), models=len(config.models))
    return st.final_dir
