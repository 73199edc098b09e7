"""Action heads by name: ``policy.head: <name>`` builds ``HEADS[name]`` (the contract:
:class:`midtrain.policy.action_heads.base.ActionHead`). The processor, the config and the ``vla``
stage ask the head class, never its name: what it adds to the prompt (``prompt``, a
:class:`HeadPrompt`), whether the language model predicts (``predicts_with_language_model``) and
where its settings are (``settings_field``). ``policy.head`` accepts exactly the names below.

Adding a head:

1. a file here with an :class:`ActionHead` subclass (``loss``, ``sample``, and whatever of
   ``prompt`` / ``added_tokens`` / ``injected`` / ``read`` it needs);
2. one line in :data:`HEADS` below;
3. only if it has settings of its own: a ``Settings`` dataclass and one field for it in
   :class:`midtrain.policy.configuration.PolicySettings` (the YAML section ``policy.<field>``,
   saved in ``config.json``), named by the class's ``settings_field``. So a head with settings is
   one file plus two lines; without, one file plus one line.
"""

from __future__ import annotations

from .base import ActionHead, HeadContext, HeadPrompt
from .flow import FlowHead
from .mlp import MLPHead
from .tokens import TokensHead

HEADS: dict[str, type[ActionHead]] = {
    "mlp": MLPHead,
    "flow": FlowHead,
    "tokens": TokensHead,
}

__all__ = ["HEADS", "ActionHead", "HeadContext", "HeadPrompt"]
