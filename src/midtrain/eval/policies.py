"""The policy contract of the closed-loop evaluator, the checkpoint loader, scripted policies.

A policy is any object with (LeRobot's contract)::

    policy.reset()                               # a new episode starts
    policy.select_action(observation) -> np.ndarray [A]   # one action, in the env's units

    observation = {
        "observation.images.<camera>": uint8 [H, W, 3],   # one entry per camera the policy uses
        "observation.state": float32 [S],                  # proprioception (Meta-World: hand xyz +
                                                           # gripper, S=4; LIBERO: eef xyz, axis-angle,
                                                           # 2 gripper joints, S=8)
        "task": str,                                       # the instruction
        "observation.environment_state": float [D],       # the simulator's full state vector (Meta-World:
                                                           # its 39-D observation) - for scripted experts
    }

Optionally ``policy.seed(int)``: called with the episode's seed before ``reset`` so a stochastic
policy (flow-matching noise, random baselines) acts the same whichever worker runs the episode.

What the policy expects is read from it before any episode runs (:func:`interface_of`), from the
first of: a ``policy.interface`` (:class:`PolicyInterface`); attributes ``camera_keys``,
``action_dim``, ``state_dim`` (0: none), ``image_size`` (the (H, W) of the frames it was trained
on) of the policy or of its ``config`` (``midtrain.policy.PolicyConfig``); or LeRobot-style
``policy.config.input_features`` / ``output_features`` (``{key: feature with .shape}``, images
as the dataset stores them).

A checkpoint directory is loaded by :func:`load_policy`, dispatching on ``config.json``'s
``"type"``: the scripted types below, anything else is a ``midtrain.policy.VLAPolicy``
checkpoint (imported only then).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional, Protocol, runtime_checkable

import numpy as np

from ..runs import StageError, write_json_atomic

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ENV_STATE_KEY = "observation.environment_state"
TASK_KEY = "task"
CONFIG_FILE = "config.json"

METAWORLD_EXPERT = "metaworld_expert"  # the scripted Meta-World policy of the task: the success ceiling
RANDOM_ACTIONS = "random_actions"  # uniform actions in [-1, 1]: the floor
SCRIPTED_TYPES = (METAWORLD_EXPERT, RANDOM_ACTIONS)


@runtime_checkable
class Policy(Protocol):
    def reset(self) -> None: ...

    def select_action(self, observation: dict[str, Any]) -> np.ndarray: ...


@dataclass(frozen=True)
class PolicyInterface:
    """What a policy consumes and produces. ``camera_keys``: observation keys of the frames it
    reads (empty: none); ``image_size``: (H, W) of the frames it was trained on, or None;
    ``state_dim`` None: not declared; ``needs_env_state``: reads ``observation.environment_state``."""

    action_dim: int
    camera_keys: tuple[str, ...] = ()
    image_size: Optional[tuple[int, int]] = None
    state_dim: Optional[int] = None
    needs_env_state: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _size(value: Any) -> Optional[tuple[int, int]]:
    if value is None:
        return None
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 3:  # [C, H, W] (LeRobot policy features) or [H, W, C] (dataset features)
        value = value[1:] if value[0] in (1, 3) else value[:2]
    return (value[0], value[1])


def interface_of(policy: Any) -> PolicyInterface:
    """The policy's declared interface (see the module docstring), or a StageError naming what is missing."""
    given = getattr(policy, "interface", None)
    if isinstance(given, PolicyInterface):
        return given
    name = type(policy).__name__
    for method in ("select_action", "reset"):
        if not callable(getattr(policy, method, None)):
            raise StageError(f"policy {name} has no {method}() method; a policy needs select_action(observation) and reset()")
    config = getattr(policy, "config", None)

    def declared(attribute):  # an attribute of the policy, else of its config (VLAPolicy's PolicyConfig)
        value = getattr(policy, attribute, None)
        return getattr(config, attribute, None) if value is None else value

    action_dim, cameras, state_dim = declared("action_dim"), declared("camera_keys"), declared("state_dim")
    image_size = _size(declared("image_size") or None)
    state_dim = state_dim or None  # 0: the policy takes no state
    inputs = getattr(config, "input_features", None) or {}
    outputs = getattr(config, "output_features", None) or {}
    if action_dim is None and "action" in outputs:
        action_dim = int(np.prod(_shape(outputs["action"])))
    if cameras is None and inputs:
        cameras = [k for k in inputs if k.startswith(IMAGE_PREFIX)]
    if state_dim is None and STATE_KEY in inputs:
        state_dim = int(np.prod(_shape(inputs[STATE_KEY])))
    if image_size is None and cameras and cameras[0] in inputs:
        image_size = _size(_shape(inputs[cameras[0]]))
    if action_dim is None:
        raise StageError(
            f"policy {name} does not declare its action dimension: give it an `action_dim` attribute, an "
            "`interface` (midtrain.eval.policies.PolicyInterface) or config.output_features['action']"
        )
    return PolicyInterface(
        action_dim=int(action_dim), camera_keys=tuple(cameras or ()), image_size=image_size,
        state_dim=None if state_dim is None else int(state_dim),
        needs_env_state=bool(getattr(policy, "needs_env_state", False)),
    )  # fmt: skip


def _shape(feature: Any) -> tuple[int, ...]:
    shape = feature.get("shape") if isinstance(feature, dict) else getattr(feature, "shape", None)
    return tuple(int(s) for s in (shape or ()))


# --------------------------------------------------------------------------- scripted policies


class MetaWorldExpertPolicy:
    """The task's scripted Meta-World policy, acting from the full simulator observation
    (``observation.environment_state``); the task is recognised from the instruction. What
    collected the corpus, so its success rate is the ceiling a learned policy can reach."""

    interface = PolicyInterface(action_dim=4, state_dim=4, needs_env_state=True)

    def __init__(self) -> None:
        from ..sim.metaworld_env import TASK_INSTRUCTIONS

        self._task_of = {instruction: task for task, instruction in TASK_INSTRUCTIONS.items()}
        self._experts: dict[str, Any] = {}

    def reset(self) -> None:
        pass

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        from ..sim.metaworld_env import make_policy

        instruction = observation[TASK_KEY]
        task = self._task_of.get(instruction)
        if task is None:
            raise StageError(f"the Meta-World expert has no task with the instruction {instruction!r}")
        if task not in self._experts:
            self._experts[task] = make_policy(task, "expert", 0)
        return np.asarray(self._experts[task](np.asarray(observation[ENV_STATE_KEY], dtype=np.float64)), dtype=np.float32)


class RandomActionPolicy:
    """Uniform random actions in [-1, 1]^A (the floor; any benchmark with that action size).
    Seeded per episode through :meth:`seed`, so outcomes do not depend on the worker."""

    def __init__(self, action_dim: int, seed: int = 0):
        self.interface = PolicyInterface(action_dim=int(action_dim))
        self._base_seed = int(seed)
        self._rng = np.random.default_rng(self._base_seed)

    def seed(self, episode_seed: int) -> None:
        self._rng = np.random.default_rng([self._base_seed, int(episode_seed)])

    def reset(self) -> None:
        pass

    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        return self._rng.uniform(-1.0, 1.0, size=self.interface.action_dim).astype(np.float32)


def save_scripted_policy(directory: Path | str, policy_type: str, **params: Any) -> Path:
    """Write a checkpoint directory for a scripted policy (``config.json`` only):
    ``save_scripted_policy(d, "metaworld_expert")``, ``save_scripted_policy(d, "random_actions", action_dim=7)``."""
    if policy_type not in SCRIPTED_TYPES:
        raise ValueError(f"unknown scripted policy type {policy_type!r}; known: {', '.join(SCRIPTED_TYPES)}")
    directory = Path(directory)
    write_json_atomic(directory / CONFIG_FILE, {"type": policy_type, **params})
    return directory


def checkpoint_type(directory: Path | str) -> str:
    """The ``type`` in a checkpoint's ``config.json`` ("" when it has none)."""
    path = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise StageError(f"policy checkpoint {directory}: not a directory; pass the folder a policy was saved to")
    if not path.is_file():
        raise StageError(f"policy checkpoint {directory}: no {CONFIG_FILE}; is this a saved policy directory?")
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StageError(f"{path}: not readable JSON ({exc})") from None
    return str(config.get("type", "")) if isinstance(config, dict) else ""


def load_policy(directory: Path | str) -> Any:
    """Load a policy checkpoint directory: a scripted policy by its ``config.json`` type, else a
    ``midtrain.policy.VLAPolicy`` (``VLAPolicy.from_pretrained(directory)``)."""
    directory = Path(directory)
    kind = checkpoint_type(directory)
    config = json.loads((directory / CONFIG_FILE).read_text())
    if kind == METAWORLD_EXPERT:
        return MetaWorldExpertPolicy()
    if kind == RANDOM_ACTIONS:
        if "action_dim" not in config:
            raise StageError(f"{directory / CONFIG_FILE}: a random_actions policy needs action_dim")
        return RandomActionPolicy(int(config["action_dim"]), int(config.get("seed", 0)))
    try:
        from ..policy import VLAPolicy  # the seam: VLA checkpoints (midtrain vla)
    except ImportError as exc:
        raise StageError(
            f"policy checkpoint {directory}: type {kind or '(none)'!r} is not a scripted policy "
            f"({', '.join(SCRIPTED_TYPES)}) and midtrain.policy.VLAPolicy cannot be imported ({exc})"
        ) from None
    return VLAPolicy.from_pretrained(directory)
