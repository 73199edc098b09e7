"""Does an aligned VLM see? Held-out visual questions, linear probes and language-model loss by depth.

- :func:`heldout_samples`: pictures of the synthetic web's ``heldout`` split (seeds disjoint from
  the ``train`` split the stage draws, so no picture was trained on);
- :func:`answer_accuracy`: greedy answers through the checkpoint's own ``generate`` (pixels in,
  tokens out), exact match after lower-casing and stripping a final period, per question kind;
- :func:`depth_readout`: at each depth ``d``, the featurizer's view - the first ``d`` decoder layers,
  the final norm, the mean over the prompt's tokens (``featurize``'s ``mean`` pooling) - of each
  picture with one neutral prompt (no question, no answer: the label cannot leak), and the
  next-token cross-entropy of its held-out caption read out at ``d`` through the final norm and the
  LM head, beside the uniform guess ``ln(vocab)``;
- :func:`probe_accuracy`: a logistic-regression probe of an attribute on those features,
  cross-validated.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..sim.web import ANSWERS, CAPTION_PROMPTS, WEB_KINDS, WebSample, vqa_prompt, web_rng, web_sample

NEUTRAL_PROMPT = CAPTION_PROMPTS[0]


def heldout_samples(per_kind: int, seed: int = 0, kinds: Sequence[str] = WEB_KINDS, image_size: int = 224) -> list[WebSample]:
    return [web_sample(kind, web_rng(seed, "heldout", kind, i), image_size) for kind in kinds for i in range(per_kind)]


def normalise_answer(text: str) -> str:
    return text.strip().lower().rstrip(".").strip()


def _messages(prompt: str, answer: str | None = None) -> list[dict]:
    out = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if answer is not None:
        out.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return out


def generate_answers(vlm, processor, samples: list[WebSample], batch: int = 16, max_new_tokens: int = 6) -> list[str]:
    """Greedy answers to each sample's question (short-answer VQA prompt)."""
    import torch

    out = []
    for s in range(0, len(samples), batch):
        chunk = samples[s : s + batch]
        texts = [processor.apply_chat_template(_messages(vqa_prompt(x.question)), add_generation_prompt=True) for x in chunk]
        inputs = processor(text=texts, images=[[x.image] for x in chunk], padding=True, padding_side="left", return_tensors="pt")
        with torch.no_grad():
            ids = vlm.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += processor.tokenizer.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def answer_accuracy(samples: list[WebSample], answers: list[str]) -> dict[str, float]:
    """Exact-match accuracy per kind."""
    hits: dict[str, list[bool]] = {}
    for sample, answer in zip(samples, answers):
        hits.setdefault(sample.kind, []).append(normalise_answer(answer) == sample.answer)
    return {kind: float(np.mean(v)) for kind, v in hits.items()}


def chance(kinds: Sequence[str]) -> dict[str, float]:
    return {kind: 1.0 / len(ANSWERS[kind]) for kind in kinds}


def _encode(processor, samples: list[WebSample], answers: bool):
    texts = [processor.apply_chat_template(_messages(NEUTRAL_PROMPT, x.caption if answers else None),
                                           add_generation_prompt=not answers) for x in samples]  # fmt: skip
    return processor(text=texts, images=[[x.image] for x in samples], padding=True, padding_side="right", return_tensors="pt")


def _depth_states(vlm, inputs, depths: Sequence[int]):
    """``{d: final_norm(h_d)}`` for each depth (``h_0`` is the embedding output)."""
    import torch

    with torch.no_grad():
        out = vlm.model(**inputs, output_hidden_states=True, use_cache=False)
    norm = vlm.model.language_model.norm
    layers = len(out.hidden_states) - 1
    # the last entry of hidden_states is already normed in Llama-style decoders; earlier ones are not
    return {d: (out.hidden_states[d] if d == layers else norm(out.hidden_states[d])) for d in depths}


def depth_readout(vlm, processor, samples: list[WebSample], depths: Sequence[int], batch: int = 16):
    """One forward pass per batch over (neutral prompt, caption) gives, per depth:

    - pooled features ``[n, width]``: the mean over the *prompt's* tokens of the normed state (causal
      attention: the caption after them does not change them, so this is the featurizer's view of the
      picture with the prompt alone);
    - the mean next-token cross-entropy (nats) of the caption's tokens read out at that depth.
    """
    import torch
    import torch.nn.functional as F

    head = vlm.get_output_embeddings()
    feats: dict[int, list] = {d: [] for d in depths}
    sums, count = {d: 0.0 for d in depths}, 0
    for s in range(0, len(samples), batch):
        chunk = samples[s : s + batch]
        inputs = _encode(processor, chunk, answers=True)
        prompt = _encode(processor, chunk, answers=False)["attention_mask"].sum(1)
        ids, attn = inputs["input_ids"], inputs["attention_mask"].bool()
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        in_prompt = (positions < prompt.unsqueeze(1)).unsqueeze(-1).float()
        targets = ((positions >= prompt.unsqueeze(1)) & attn)[:, 1:]
        count += int(targets.sum())
        with torch.no_grad():
            for d, h in _depth_states(vlm, inputs, depths).items():
                feats[d].append(((h.float() * in_prompt).sum(1) / in_prompt.sum(1)).numpy())
                logits = head(h[:, :-1][targets])
                sums[d] += float(F.cross_entropy(logits.float(), ids[:, 1:][targets], reduction="sum"))
    return {d: np.concatenate(v) for d, v in feats.items()}, {d: sums[d] / max(count, 1) for d in depths}


def probe_accuracy(features: np.ndarray, labels: Sequence[str], folds: int = 5, seed: int = 0) -> float:
    """Cross-validated accuracy of a standardised logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    smallest = min(np.unique(y, return_counts=True)[1])
    k = max(2, min(folds, int(smallest)))
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    return float(cross_val_score(probe, features, y, cv=StratifiedKFold(k, shuffle=True, random_state=seed)).mean())


def uniform_loss(vlm) -> float:
    return math.log(vlm.get_output_embeddings().weight.shape[0])
