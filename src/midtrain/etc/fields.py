"""One episode as ETC generators see it (the quantities of :mod:`midtrain.etc.episodes`, read for
them): a type the reader builds and the generators take, so neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


@dataclass
class TaskNames:
    """What questions call a task's things (see ``midtrain.sim.metaworld_env.TaskObjects``)."""

    objects: list[str]
    goal: Optional[str] = None
    verb: str = "reach"
    target: str = "object"  # the interaction point: "object" (object 1) or "goal"

    def target_name(self) -> Optional[str]:
        if self.target == "goal":
            return self.goal or "goal position"
        return self.objects[0] if self.objects else None


@dataclass
class EpisodeFields:
    """One episode's quantities (see the module docstring); rows sorted by frame index."""

    index: int
    instruction: str
    frame_ids: np.ndarray  # [T] frame_index
    times: np.ndarray  # [T] timestamps, seconds
    fields: dict[str, np.ndarray]
    names: TaskNames
    images: Optional[list] = field(default=None, repr=False)  # image-feature cells (image datasets only)

    @property
    def length(self) -> int:
        return len(self.frame_ids)
