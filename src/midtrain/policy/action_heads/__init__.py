"""Action heads by name: ``policy.head: <name>`` builds ``HEADS[name]`` (the contract:
:class:`midtrain.policy.action_heads.base.ActionHead`). A new head is a file here and a line below."""

from __future__ import annotations

from .base import ActionHead, HeadContext
from .flow import FlowHead
from .mlp import MLPHead
from .tokens import TokensHead

HEADS: dict[str, type[ActionHead]] = {
    "mlp": MLPHead,
    "flow": FlowHead,
    "tokens": TokensHead,
}

__all__ = ["HEADS", "ActionHead", "HeadContext"]
