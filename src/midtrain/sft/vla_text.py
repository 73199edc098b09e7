"""VLA frames as VLM conversations (Action-NTP text): the data ``midtrain sft`` trains the perplexity
scorers' VLA model on (``robot_text`` data in the study)."""

from __future__ import annotations

import numpy as np


def render_vla_as_text(row: dict, bins: int = 256, low: float = -1.0, high: float = 1.0) -> dict:
    """A VLA frame as a VLM conversation: the camera image(s) and the instruction as the user
    turn, the action chunk as text as the answer (each dimension discretised into ``bins``
    uniform bins over ``[low, high]``, one line per step, padded steps left out) - the
    RT-2/OpenVLA action-as-tokens rendering, as plain text any tokenizer reads.

    Fine-tuning a VLM on these rows gives the ``vla_model`` of the perplexity scorers.
    """
    action = np.asarray(row.get("action") or [], dtype=np.float64)
    mask = row.get("action_mask")
    if action.ndim == 2 and mask is not None and len(mask) == len(action):
        action = action[np.asarray(mask, dtype=bool)]
    ids = np.clip(np.floor((action - low) / (high - low) * bins), 0, bins - 1).astype(int) if action.size else action
    answer = "\n".join(" ".join(str(int(v)) for v in step) for step in np.atleast_2d(ids)) if action.size else ""
    n_images = len(row.get("image_refs") or [])
    instruction = row.get("instruction") or ""
    return {
        "id": row["id"], "source": row.get("source"), "kind": "vla", "image_refs": row.get("image_refs") or [],
        "messages": [{"role": "user", "content": "<image>\n" * n_images + f"What action should the robot take to {instruction}?"},
                     {"role": "assistant", "content": answer}],
        "origin": row.get("origin"),
    }  # fmt: skip
