"""VLA policies: a VLM backbone (any ``AutoModelForImageTextToText`` checkpoint) with an action head.

- :class:`VLAPolicy` (``modeling``): LeRobot's policy contract (``forward``, ``predict_action_chunk``,
  ``select_action``, ``reset``, ``save_pretrained`` / ``from_pretrained``);
- heads by name (``action_heads``: ``HEADS``, each behind ``loss(context, batch)`` / ``sample(context)``):
  ``mlp`` (OpenVLA-OFT / VLM4VLA regression), ``flow`` (pi0-style flow-matching expert), ``tokens``
  (action next-token prediction); their networks and math are in ``heads``;
- :class:`Normalizer` (``normalize``): per-dimension ``mean_std | min_max | q01_q99``, gripper binarised;
- :class:`PolicyProcessor` (``processor``): prompts, targets and observations to model inputs;
- :class:`PolicyConfig` / :class:`PolicySettings` (``configuration``): what a checkpoint is.

The names load on first use, so ``midtrain.policy.configuration`` (what ``midtrain vla --help``
reads) does not import torch.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "PolicyConfig": "configuration", "PolicySettings": "configuration", "VLAPolicy": "modeling",
    "Normalizer": "normalize", "compute_stats": "normalize", "PolicyProcessor": "processor",
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'midtrain.policy' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
