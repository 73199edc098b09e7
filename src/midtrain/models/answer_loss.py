"""The answer-token loss of every VLM training stage (``sft``, ``align``), from hidden states.

Mean next-token cross-entropy over answer tokens (labels != -100)::

    L = -1/|A| sum_{t in A} log softmax(W h_{t-1})[y_t]

computed from the backbone's last hidden state at the ``|A|`` answer positions only: the
``[batch, tokens, vocab]`` logits are never built (with a 150k vocabulary they dominate a small
VLM's compute and memory), and large answer sets go through the head in checkpointed chunks so
the logits in memory stay bounded.
"""

from __future__ import annotations

HEAD_CHUNK_ELEMENTS = 1 << 27  # logits per chunk (512 MiB in fp32) before the loss is chunked
IGNORE = -100


def chunked_answer_loss(hidden, head, targets, softcap: float | None = None):
    """Mean cross-entropy of ``head(hidden)`` against ``targets`` (``hidden`` ``[n, d]``, targets ``[n]``),
    in chunks whose logits are recomputed in the backward pass when ``n x vocab`` is large."""
    import torch
    import torch.nn.functional as F
    from torch.utils.checkpoint import checkpoint

    def chunk_sum(h, y):
        logits = head(h).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return F.cross_entropy(logits, y, reduction="sum")

    n = hidden.shape[0]
    vocab = head.weight.shape[0]
    if n * vocab <= HEAD_CHUNK_ELEMENTS:
        return chunk_sum(hidden, targets) / n
    step = max(1, HEAD_CHUNK_ELEMENTS // vocab)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, n, step):
        total = total + checkpoint(chunk_sum, hidden[s : s + step], targets[s : s + step], use_reentrant=False)
    return total / n
