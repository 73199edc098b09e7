"""What a VLA policy is: its head, chunking, inputs and normalisation, saved as the checkpoint's
``config.json`` (``"type": "midtrain_vla"``).

The head settings (:class:`MLPHeadSettings`, :class:`FlowHeadSettings`,
:class:`TokensHeadSettings`) and :class:`PolicySettings` are what a user chooses (the ``vla``
stage nests them under ``policy:``); :class:`PolicyConfig` adds what the data decides (action and
state dimensions and names, camera keys, image size, normalisation statistics) and is everything
:meth:`midtrain.policy.VLAPolicy.from_pretrained` needs besides the weights.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from ..config import ConfigError, Settings, from_dict, option, to_plain
from ..models.parts import LoraSettings  # noqa: F401 (the backbone's LoRA settings)

POLICY_TYPE = "midtrain_vla"
CONFIG_NAME = "config.json"


@dataclass
class MLPHeadSettings(Settings):
    """OpenVLA-OFT / VLM4VLA regression head: learnable action queries read out of the backbone's last
    hidden states, an MLP-ResNet producing the whole chunk in one pass.

    ``gripper_weight`` defaults to 1, not VLM4VLA's 0.01: in the few hundred steps of a CPU run the
    gripper barely learns at 0.01 (12 Meta-World episodes, frozen demo VLM, 200 steps: held-out
    gripper accuracy 0.54 at 0.01 and 1.00 at 1; held-out arm L1 0.18 and 0.14 in the same two runs)."""

    queries: Literal["chunk", "single"] = option(
        "chunk", "chunk: one placeholder per chunk step (OpenVLA-OFT); single: one action token for the whole chunk (VLM4VLA)"
    )
    hidden_dim: int = option(512, "width of the MLP-ResNet")
    blocks: int = option(2, "residual blocks of the MLP-ResNet (OpenVLA-OFT uses 2)")
    loss: Literal["l1", "huber"] = option("l1", "regression loss on the continuous (arm) dimensions: l1 (OFT) or huber (VLM4VLA)")
    huber_delta: float = option(1.0, "Huber loss transition point, on the normalised scale")
    gripper_weight: float = option(
        1.0, "weight of the BCE loss on binarised gripper dimensions (VLM4VLA: 0.01, for long runs; see the class docstring)"
    )

    def validate(self) -> None:
        for key in ("hidden_dim", "blocks"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.huber_delta <= 0 or self.gripper_weight < 0:
            raise ConfigError(f"huber_delta must be > 0 and gripper_weight >= 0, got {self.huber_delta}, {self.gripper_weight}")


@dataclass
class FlowHeadSettings(Settings):
    """pi0 / SmolVLA / QwenPI-style flow-matching action expert: a small transformer over the noisy
    chunk (and a time embedding) that cross-attends to the backbone's last hidden states."""

    width: int = option(256, "hidden size of the action expert")
    layers: int = option(4, "transformer layers of the action expert")
    heads: int = option(4, "attention heads of the action expert")
    num_steps: int = option(10, "Euler integration steps at inference")
    time_alpha: float = option(1.5, "training time t ~ Beta(alpha, beta) (pi0: 1.5)")
    time_beta: float = option(1.0, "training time t ~ Beta(alpha, beta) (pi0: 1.0)")

    def validate(self) -> None:
        for key in ("width", "layers", "heads", "num_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.width % self.heads:
            raise ConfigError(f"width: {self.width} must be divisible by heads ({self.heads})")
        if self.time_alpha <= 0 or self.time_beta <= 0:
            raise ConfigError(f"time_alpha, time_beta: must be > 0, got {self.time_alpha}, {self.time_beta}")


@dataclass
class TokensHeadSettings(Settings):
    """Action next-token prediction (RT-2 / OpenVLA): each dimension quantised into bins over the
    normalised range, one added token per bin, cross-entropy on action tokens, greedy decoding."""

    bins: int = option(256, "bins per action dimension (one added token each)")
    bin_range: Optional[float] = option(
        None, "bins cover [-r, r] of the normalised scale; null: 1 for min_max / q01_q99, 3 for mean_std"
    )

    def validate(self) -> None:
        if not 2 <= self.bins <= 4096:
            raise ConfigError(f"bins: must be in [2, 4096], got {self.bins}")
        if self.bin_range is not None and self.bin_range <= 0:
            raise ConfigError(f"bin_range: must be > 0, got {self.bin_range}")


@dataclass
class PolicySettings(Settings):
    """The policy a user chooses: head, chunking, normalisation, state input, head settings."""

    head: str = option("mlp", "action head, a name in midtrain.policy.action_heads.HEADS: mlp (regression), flow (flow matching), "
                              "tokens (action tokens)")  # fmt: skip
    chunk_size: int = option(8, "actions predicted per chunk (H)")
    n_action_steps: Optional[int] = option(None, "actions of a chunk executed by select_action before predicting again (null: the whole chunk)")
    normalization: Literal["mean_std", "min_max", "q01_q99"] = option(
        "q01_q99", "per-dimension action/state normalisation (min_max, q01_q99: to [-1, 1]; mean_std: unit variance)"
    )
    gripper_dims: Optional[list[int]] = option(
        None, "action dimensions that are grippers (null: those whose name contains 'grip'; [] for none)"
    )
    binarize_gripper: bool = option(True, "learn gripper dimensions as open/closed (BCE for mlp) instead of regressing them")
    use_state: bool = option(True, "give the proprioceptive state to the policy as one projected token")
    blank_images: bool = option(
        False, "replace every camera image with one constant mid-grey frame, in training and in closed loop alike (the "
        "study's blind control: the policy sees the state and the instruction only)")  # fmt: skip
    features: Literal["vlm", "vision_tower"] = option(
        "vlm", "what the head reads: vlm (the VLM's last hidden states) or vision_tower (the VLM's image features after its "
        "projector, mean-pooled over each sample's image tokens; the language model does not run: the study's "
        "vision_tower reference)")  # fmt: skip
    # each head's own section, ``policy.<its settings_field>`` (see midtrain.policy.action_heads):
    mlp: MLPHeadSettings = option(factory=MLPHeadSettings, help="mlp head settings")
    flow: FlowHeadSettings = option(factory=FlowHeadSettings, help="flow head settings")
    tokens: TokensHeadSettings = option(factory=TokensHeadSettings, help="tokens head settings")

    def validate(self) -> None:
        head = self.head_class
        if self.chunk_size < 1:
            raise ConfigError(f"chunk_size: must be >= 1, got {self.chunk_size}")
        if self.n_action_steps is not None and not 1 <= self.n_action_steps <= self.chunk_size:
            raise ConfigError(f"n_action_steps: must be in [1, chunk_size={self.chunk_size}], got {self.n_action_steps}")
        if self.features == "vision_tower" and head.predicts_with_language_model:
            raise ConfigError(f"features: vision_tower runs no language model, which the {self.head} head predicts with; use a head "
                              f"that reads the backbone ({', '.join(n for n, h in _heads().items() if not h.predicts_with_language_model)})")  # fmt: skip

    @property
    def head_class(self):
        """The registered head class of ``head`` (ConfigError for a name not in ``HEADS``)."""
        heads = _heads()
        if self.head not in heads:
            raise ConfigError(f"head: expected one of {', '.join(heads)}, got {self.head!r}")
        field = heads[self.head].settings_field
        if field is not None and field not in {f.name for f in dataclasses.fields(self)}:
            raise ConfigError(f"head: {self.head} keeps its settings in policy.{field}, which PolicySettings lacks (add the field)")
        return heads[self.head]

    @property
    def steps_per_chunk(self) -> int:
        return self.n_action_steps or self.chunk_size


@dataclass
class PolicyConfig(Settings):
    """A policy checkpoint's ``config.json``: the settings plus what the training data decided.

    ``camera_keys``: observation keys of the images, in the order the model sees them;
    ``image_size``: ``[height, width]`` the images are resized to before the VLM's processor (the
    training frames' size); ``action_names`` / ``state_names``: per-dimension names (may be
    empty); ``state_dim`` 0 means no state input; ``normalization_stats``: ``{"action": stats,
    "state": stats}`` (see :mod:`midtrain.policy.normalize`); ``backbone``: the sub-directory with
    the VLM and its processor (saved with ``save_pretrained``); ``hidden_size``: the backbone's
    text hidden size.
    """

    settings: PolicySettings = option(factory=PolicySettings, help="head, chunking, normalisation")
    action_dim: int = option(0, "action dimensions")
    action_names: list[str] = option(factory=list, help="names of the action dimensions")
    state_dim: int = option(0, "state dimensions given to the policy (0: none)")
    state_names: list[str] = option(factory=list, help="names of the state dimensions")
    camera_keys: list[str] = option(factory=list, help="observation keys of the camera images, in model order")
    image_size: list[int] = option(factory=list, help="[height, width] images are resized to")
    gripper_dims: list[int] = option(factory=list, help="resolved gripper dimensions")
    normalization_stats: dict[str, Any] = option(factory=dict, help="per-dimension statistics of action and state")
    backbone: str = option("backbone", "sub-directory holding the backbone VLM and its processor")
    backbone_source: str = option("", "where the backbone came from (hub id or path), for the record")
    hidden_size: int = option(0, "backbone text hidden size")
    type: str = option(POLICY_TYPE, "checkpoint type tag")

    def validate(self) -> None:
        if self.type != POLICY_TYPE:
            raise ConfigError(f"type: expected {POLICY_TYPE!r}, got {self.type!r}")
        if self.action_dim < 1:
            raise ConfigError(f"action_dim: must be >= 1, got {self.action_dim}")
        if not self.camera_keys:
            raise ConfigError("camera_keys: the policy needs at least one camera")
        if len(self.image_size) != 2 or min(self.image_size) < 1:
            raise ConfigError(f"image_size: expected [height, width], got {self.image_size}")
        for name, names, dim in (("action_names", self.action_names, self.action_dim), ("state_names", self.state_names, self.state_dim)):
            if names and len(names) != dim:
                raise ConfigError(f"{name}: {len(names)} names for {dim} dimensions")
        bad = [d for d in self.gripper_dims if not 0 <= d < self.action_dim]
        if bad:
            raise ConfigError(f"gripper_dims: {bad} out of range for action_dim {self.action_dim}")

    @property
    def head(self) -> str:
        return self.settings.head

    @property
    def chunk_size(self) -> int:
        return self.settings.chunk_size

    @property
    def n_action_steps(self) -> int:
        return self.settings.steps_per_chunk

    def save(self, directory: Path) -> None:
        from ..runs import write_json_atomic

        write_json_atomic(Path(directory) / CONFIG_NAME, to_plain(self))

    @classmethod
    def load(cls, directory: Path) -> "PolicyConfig":
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ConfigError(f"{directory}: not a policy checkpoint ({CONFIG_NAME} is missing)")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: malformed JSON ({exc})") from None
        if data.get("type") != POLICY_TYPE:
            raise ConfigError(f"{path}: type {data.get('type')!r} is not a midtrain VLA policy ({POLICY_TYPE!r})")
        try:
            return from_dict(cls, data)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _heads() -> dict:
    """The registered heads (imported here, not at the top: the heads import torch and the backbone)."""
    from .action_heads import HEADS

    return HEADS


def resolve_gripper_dims(settings: PolicySettings, action_names: list[str], action_dim: int) -> list[int]:
    """The configured gripper dimensions, or the ones named like a gripper (``*grip*``)."""
    if settings.gripper_dims is not None:
        dims = [d % action_dim if d < 0 else d for d in settings.gripper_dims]
        bad = [d for d in dims if not 0 <= d < action_dim]
        if bad:
            raise ConfigError(f"policy.gripper_dims: {settings.gripper_dims} out of range for {action_dim} action dimensions")
        return sorted(set(dims))
    return [i for i, n in enumerate(action_names) if "grip" in n.lower()]

