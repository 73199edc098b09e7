"""Calling a VLM's language model, written once for every stage that does: which keyword arguments
a forward takes (a batch from ``build_batch`` carries keys some architectures do not accept), and
the LM head's cross-entropy on answer tokens.

The answer-token loss: the hidden state at position ``t - 1`` predicts token ``t``; only assistant
answer tokens count (labels ``!= IGNORE``). Logits are the LM head's in float32, soft-capped as the
model itself does when its config sets ``final_logit_softcapping`` (Gemma 2: ``c * tanh(z / c)``).
``midtrain sft`` and a policy's VQA co-training take the mean over answer tokens
(:func:`chunked_answer_loss`, which never holds more than ``HEAD_CHUNK_ELEMENTS`` logits with a
graph); the perplexity scorers take each token's NLL (:func:`answer_token_nll`).
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional

IGNORE = -100  # the label of a token that is not an answer token (PyTorch's ignore_index)
HEAD_CHUNK_ELEMENTS = 1 << 27  # logits per chunk (512 MiB in fp32) before the loss is chunked


def accepted_arguments(forward: Callable) -> set[str]:
    """The named parameters of ``forward`` (not ``*args`` / ``**kwargs``): the batch keys to pass."""
    params = inspect.signature(forward).parameters
    return {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def logit_softcap(model) -> Optional[float]:
    """The model's final-logit soft cap (None when it has none)."""
    return getattr(model.config.get_text_config(), "final_logit_softcapping", None)


def answer_logits(head, hidden, softcap: Optional[float] = None):
    """``head(hidden)`` in float32, soft-capped when ``softcap`` is set."""
    import torch

    logits = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def answer_token_nll(hidden, head, targets, softcap: Optional[float] = None):
    """Each answer token's negative log-likelihood (``hidden`` ``[n, d]``, ``targets`` ``[n]`` -> ``[n]``)."""
    import torch.nn.functional as F

    return F.cross_entropy(answer_logits(head, hidden, softcap), targets, reduction="none")


def chunked_answer_loss(hidden, head, targets, softcap: Optional[float] = None):
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (``hidden`` ``[n, d]``, targets ``[n]``),
    in chunks whose logits are recomputed in the backward pass when ``n x vocab`` is large."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(h, y):
        return F.cross_entropy(answer_logits(head, h, softcap), y, reduction="sum")

    n = hidden.shape[0]
    vocab = head.weight.shape[0]
    if n * vocab <= HEAD_CHUNK_ELEMENTS:
        return chunk_sum(hidden, targets) / n
    step = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, step):
        total = total + checkpoint(chunk_sum, hidden[s : s + step], targets[s : s + step], use_reentrant=False)
    return total / n
