"""Catalog rows for tests: VLM conversations and VLA frames, and a completed ``catalog`` stage.

A plain module (not ``conftest``), so tests in any folder import it unambiguously:
``from catalog_rows import vlm_rows``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

QUESTIONS = [
    "What is on the table?", "Describe the image in detail.", "How many objects are there?",
    "Where is the red block relative to the bowl?", "What color is the cup?", "Is the drawer open?",
]  # fmt: skip
ANSWERS = [
    "A red block and a bowl.", "The image shows a kitchen with a white counter.", "There are three objects.",
    "The red block is to the left of the bowl.", "The cup is blue.", "Yes, the drawer is open.",
]  # fmt: skip
INSTRUCTIONS = ["pick up the red block", "open the top drawer", "push the green button", "close the microwave door"]


def png_ref(rng: np.random.Generator, height: int, width: int) -> dict:
    from midtrain.data.images import encode_image, ref_from_bytes

    return ref_from_bytes(encode_image(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)))


def vlm_rows(n: int, source: str = "llava", seed: int = 0, multi_turn_every: int = 3) -> list[dict]:
    """Catalog rows of LLaVA-like conversations (one image, 1-2 turns; every 5th has no image)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % len(QUESTIONS)], ANSWERS[(i * 5) % len(ANSWERS)]
        messages = [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]
        if multi_turn_every and i % multi_turn_every == 1:
            messages += [{"role": "user", "content": QUESTIONS[(i + 1) % len(QUESTIONS)]},
                         {"role": "assistant", "content": ANSWERS[(i + 2) % len(ANSWERS)]}]  # fmt: skip
        images = [png_ref(rng, int(rng.integers(40, 100)), int(rng.integers(40, 100)))]
        if i % 5 == 4:
            images, messages[0] = [], {"role": "user", "content": q}
        rows.append({"id": f"{source}/{i}", "source": source, "kind": "vlm", "image_refs": images,
                     "messages": messages, "origin": f"{source}.json:{i + 1}"})  # fmt: skip
    return rows


def vla_rows(n: int, source: str = "robot", seed: int = 1, frames_per_episode: int = 4) -> list[dict]:
    """Catalog rows of VLA frames: a 64x64 camera image, an instruction, state and an action chunk."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        ep, fr = divmod(i, frames_per_episode)
        rows.append({
            "id": f"{source}/{ep}/{fr}", "source": source, "kind": "vla", "image_refs": [png_ref(rng, 64, 64)],
            "instruction": INSTRUCTIONS[ep % len(INSTRUCTIONS)], "episode": ep, "frame": fr,
            "state": rng.standard_normal(4).astype(np.float32).tolist(),
            "action": rng.standard_normal((2, 4)).astype(np.float32).tolist(), "action_mask": [True, True],
            "origin": f"episode {ep} frame {fr}",
        })  # fmt: skip
    return rows


def write_catalog(run_dir: Path, rows_by_source: dict[str, list[dict]], row_group_size: int | None = None) -> Path:
    """Write ``<run_dir>/catalog/<source>/part-00000.parquet`` as a completed ``catalog`` stage."""
    from midtrain.config import StageConfig
    from midtrain.data.catalog import rows_to_table
    from midtrain.runs import stage_run, write_parquet_atomic

    @dataclass
    class _CatalogFixtureConfig(StageConfig):
        sources: str = ""

    cfg = _CatalogFixtureConfig(sources=",".join(sorted(rows_by_source)))
    with stage_run(run_dir, "catalog", cfg, force=True, kind="catalog") as st:
        for source, rows in rows_by_source.items():
            kwargs = {"row_group_size": row_group_size} if row_group_size else {}
            write_parquet_atomic(st.dir / source / "part-00000.parquet", rows_to_table(rows), **kwargs)
            st.counts["written"] += len(rows)
    return st.dir
