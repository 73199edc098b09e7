"""Model inputs from catalog rows, built with the model's own processor and chat template.

Architecture-agnostic: everything model-specific (image placeholder tokens, how many tokens an
image expands to, tiling, chat formatting) is left to the processor; this module only

1. turns a catalog row into a chat conversation with content blocks, images in their places
   (a VLM sample is its whole conversation; a VLA frame is its camera image(s) plus its
   instruction as one user turn),
2. renders it with the processor's chat template (or a plain "images, then turns" prompt for
   processors without one, e.g. PaliGemma),
3. runs the processor on a whole batch (right padding, so every sample's real tokens keep the
   positions they would have alone), truncates over-long samples or leaves them out with a
   reason, and
4. optionally marks which tokens belong to assistant answers (``answer_mask``), which a
   perplexity scorer needs to score only the answer tokens.

``build_batch`` never raises for one bad sample: it leaves it out and returns a
:class:`~midtrain.runs.SampleError` for it in ``BatchInfo.errors``, so callers apply ``on_error``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.images import load_image
from ..runs import SampleError

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")

# Processor outputs aligned with input_ids ([batch, tokens]); truncation and padding apply to them.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids", "labels")
# Processor outputs that are bookkeeping, not model inputs.
NON_MODEL_KEYS = ("offset_mapping", "text_replacement_offsets", "labels")


def _where(row: dict) -> str:
    return row.get("origin") or row.get("id") or "<sample>"


def conversation_of(row: dict, include_assistant: bool = True) -> tuple[list[dict], list[int]]:
    """Chat messages with content blocks for one catalog row, and the indices of the images it uses.

    VLM rows: ``messages`` with ``<image>`` placeholders become ``{"type": "image"}`` blocks in
    place (a newline right after a placeholder, LLaVA's layout, is dropped); images without a
    placeholder go first in the first user turn. With ``include_assistant=False`` assistant turns
    (and images placed in them) are left out. VLA rows (no messages): one user turn with the
    camera image(s) then the instruction.
    """
    refs = row.get("image_refs") or []
    messages = row.get("messages")
    where, sid = _where(row), row.get("id")
    if not messages:
        instruction = row.get("instruction")
        if not instruction and not refs:
            raise SampleError("empty sample", where, "no messages, instruction or images", sid)
        content = [{"type": "image"} for _ in refs]
        if instruction:
            content.append({"type": "text", "text": instruction})
        return [{"role": "user", "content": content}], list(range(len(refs)))

    placeholders = sum((m.get("content") or "").count(IMAGE_PLACEHOLDER) for m in messages)
    if placeholders > len(refs):
        raise SampleError(
            "more <image> placeholders than images", where, f"{placeholders} placeholders, {len(refs)} images", sid
        )
    unplaced = list(range(placeholders, len(refs)))  # images with no placeholder: prepend to the first user turn
    next_image = 0
    used: list[int] = []
    out = []
    for m in messages:
        role, text = m.get("role"), m.get("content") or ""
        if role not in ROLES:
            raise SampleError("unknown message role", where, f"role {role!r}; expected one of {', '.join(ROLES)}", sid)
        parts = text.split(IMAGE_PLACEHOLDER)
        n_here = len(parts) - 1
        if role == "assistant" and not include_assistant:
            next_image += n_here
            continue
        blocks: list[dict] = []
        if unplaced and role == "user":
            blocks += [{"type": "image"} for _ in unplaced]
            used += unplaced
            unplaced = []
        for i, part in enumerate(parts):
            if i > 0:
                blocks.append({"type": "image"})
                used.append(next_image)
                next_image += 1
                part = part.removeprefix("\n")
            if part:
                blocks.append({"type": "text", "text": part})
        out.append({"role": role, "content": blocks or [{"type": "text", "text": ""}]})
    if unplaced:
        raise SampleError("images without a user turn to place them in", where, f"{len(unplaced)} image(s)", sid)
    if not out:
        raise SampleError("empty sample", where, "no turns left after dropping assistant turns", sid)
    return out, used  # image indices in the order their blocks appear, as the processor consumes them


def _text_blocks(message: dict) -> str:
    return "".join(b.get("text", "") for b in message["content"] if b["type"] == "text")


def _render_plain(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Prompt for processors without a chat template (PaliGemma): all image tokens first, then the
    turns' text separated by newlines, which is the prefix/suffix layout those models were trained on."""
    image_token = getattr(processor, "image_token", IMAGE_PLACEHOLDER)
    n_images = sum(1 for m in messages for b in m["content"] if b["type"] == "image")
    text = image_token * n_images
    spans = []
    for i, m in enumerate(messages):
        piece = _text_blocks(m)
        if i:
            text += "\n"
        if m["role"] == "assistant":
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def _render_template(processor, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_prompt(processor, messages: list[dict], where: str = "", sample_id: str | None = None,
                  with_answer_spans: bool = False) -> tuple[str, list[tuple[int, int]]]:  # fmt: skip
    """The prompt string for ``messages`` and, if asked, the character spans of assistant answers.

    An answer span covers the assistant's text and the template's end-of-turn marker (what a
    fine-tuning recipe trains on), found by rendering the conversation up to that turn; if the
    template is not prefix-stable (e.g. it rewrites earlier turns), the answer text is searched.
    """
    if processor.chat_template is None:
        return _render_plain(processor, messages)
    try:
        text = _render_template(processor, messages)
        if not with_answer_spans:
            return text, []
        spans = []
        cursor = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = _render_template(processor, messages[:k], add_generation_prompt=True) if k else ""
            after = _render_template(processor, messages[: k + 1])
            if after.startswith(before) and text.startswith(after) and len(before) >= cursor:
                start, end = len(before), len(after.rstrip())
            else:
                answer = _text_blocks(m)
                start = text.find(answer, cursor)
                if start < 0:
                    raise SampleError("assistant turn not found in the rendered chat template", where, "", sample_id)
                end = start + len(answer)
            spans.append((start, end))
            cursor = end
        return text, spans
    except SampleError:
        raise
    except Exception as exc:  # jinja errors: the template cannot render this conversation
        raise SampleError("chat template failed", where, f"{type(exc).__name__}: {exc}", sample_id) from None


@dataclass
class BatchInfo:
    """What ``build_batch`` did with each row.

    ``positions[i]``: index into the input ``rows`` of batch row ``i`` (rows with images come first);
    ``lengths``: real tokens
    per batch row (after truncation); ``truncated``: rows cut to ``max_length``; ``errors``: rows
    left out, one :class:`SampleError` each (with ``sample_id``); ``answer_mask``: ``[batch, tokens]``
    bool tensor, True on assistant-answer tokens (only when asked for).
    """

    positions: np.ndarray
    lengths: np.ndarray
    truncated: np.ndarray
    errors: list[SampleError] = field(default_factory=list)
    answer_mask: Any = None

    @property
    def size(self) -> int:
        return len(self.positions)


@dataclass
class _Sample:
    position: int
    text: str
    images: list
    spans: list[tuple[int, int]]
    where: str
    sample_id: str | None


def _prepare_sample(row: dict, position: int, processor, include_assistant: bool, answer_mask: bool) -> _Sample:
    where, sid = _where(row), row.get("id")
    messages, image_order = conversation_of(row, include_assistant)
    refs = row.get("image_refs") or []
    images = [load_image(refs[i], where, sid) for i in image_order]
    text, spans = render_prompt(processor, messages, where, sid, with_answer_spans=answer_mask)
    return _Sample(position, text, images, spans, where, sid)


def _call_processor(processor, samples: list[_Sample], answer_mask: bool):
    texts = [s.text for s in samples]
    images = [s.images for s in samples]
    kwargs: dict[str, Any] = {"padding": True, "padding_side": "right", "return_tensors": "pt"}
    if answer_mask:
        kwargs.update(return_offsets_mapping=True, return_text_replacement_offsets=True)
    return processor(text=texts, images=images if any(images) else None, **kwargs)


def _process(processor, samples: list[_Sample], answer_mask: bool, errors: list[SampleError]):
    """Process the batch in one call; if the processor rejects it, find the culprit(s) one by one."""
    try:
        return _call_processor(processor, samples, answer_mask), samples
    except Exception as exc:  # noqa: BLE001 - any processor failure is attributed to samples below
        if len(samples) == 1:
            s = samples[0]
            errors.append(SampleError("processor rejected the sample", s.where, f"{type(exc).__name__}: {exc}"[:400], s.sample_id))
            return None, []
    good = []
    for s in samples:
        out, kept = _process(processor, [s], answer_mask, errors)
        good += kept
    if not good:
        return None, []
    return _call_processor(processor, good, answer_mask), good


def _mm_token_ids(processor) -> list[int]:
    ids = set()
    for attr in ("image_token_ids", "video_token_ids"):
        ids.update(i for i in (getattr(processor, attr, None) or []) if isinstance(i, int))
    for attr in ("image_token_id", "video_token_id", "fake_image_token_id"):
        if isinstance(getattr(processor, attr, None), int):
            ids.add(getattr(processor, attr))
    return sorted(ids)


def _laid_out_texts(processor, samples: list[_Sample]) -> list[str]:
    """The texts as the processor will tokenize them before expanding image tokens (some processors,
    e.g. PaliGemma's, insert tokens around the prompt)."""
    texts = [s.text for s in samples]
    images = [s.images for s in samples]
    try:
        laid = processor.prepare_inputs_layout(images=images if any(images) else None, text=list(texts))
        out = laid[1]
        return list(out) if isinstance(out, (list, tuple)) and len(out) == len(texts) else texts
    except Exception:  # noqa: BLE001 - layout is only used to relocate spans; fall back to the rendered text
        return texts


def _answer_mask(processor, batch, samples: list[_Sample]):
    """Tokens overlapping assistant answer spans, through image-token expansion and layout changes."""
    import torch

    offsets = batch["offset_mapping"]  # [B, T, 2] char offsets in the expanded text
    replacements = batch.get("text_replacement_offsets")
    if replacements is None or (hasattr(replacements, "numel") and replacements.numel() == 0):  # none, or tensorised empty
        replacements = [[] for _ in samples]
    laid = _laid_out_texts(processor, samples)
    mask = torch.zeros(offsets.shape[:2], dtype=torch.bool)
    starts, ends = offsets[..., 0], offsets[..., 1]
    nonempty = ends > starts
    for i, s in enumerate(samples):
        spans = s.spans
        if laid[i] != s.text:  # relocate each answer in the laid-out text (answers themselves are unchanged)
            cursor, moved = 0, []
            for a, b in spans:
                j = laid[i].find(s.text[a:b], cursor)
                if j < 0:
                    raise SampleError("answer span lost in processor layout", s.where, "", s.sample_id)
                moved.append((j, j + b - a))
                cursor = j + b - a
            spans = moved
        reps = replacements[i] if i < len(replacements) else []
        ends_orig = np.array([r["span"][1] for r in reps], dtype=np.int64)
        gained = np.concatenate([[0], np.cumsum([(r["new_span"][1] - r["new_span"][0]) - (r["span"][1] - r["span"][0]) for r in reps])])
        for a, b in spans:
            shift_a = gained[np.searchsorted(ends_orig, a, side="right")]
            shift_b = gained[np.searchsorted(ends_orig, b - 1, side="right")] if b > a else shift_a
            a2, b2 = a + int(shift_a), b + int(shift_b)
            mask[i] |= (starts[i] < b2) & (ends[i] > a2) & nonempty[i]
    return mask


def build_batch(
    rows: list[dict],
    processor,
    include_assistant: bool = True,
    max_length: int | None = None,
    overlong: str = "truncate",
    answer_mask: bool = False,
):
    """Processor inputs for a batch of catalog rows: ``(BatchFeature or None, BatchInfo)``.

    ``rows`` are catalog rows as dicts (``id``, ``kind``, ``image_refs``, ``messages``,
    ``instruction``, ``origin``). Images are decoded here. Padding is on the right. Samples longer
    than ``max_length`` tokens are cut to it when ``overlong="truncate"`` and the cut leaves every
    image token in place (counted in ``info.truncated``); otherwise they are left out with reason
    ``"over-long sample"``. Rows that fail (undecodable image, template/processor rejection) are
    left out with a reason in ``info.errors``. The BatchFeature is None when no row survives.
    With ``answer_mask=True``, ``info.answer_mask`` marks assistant-answer tokens.
    """
    errors: list[SampleError] = []
    samples: list[_Sample] = []
    for position, row in enumerate(rows):
        try:
            samples.append(_prepare_sample(row, position, processor, include_assistant, answer_mask))
        except SampleError as err:
            errors.append(err)
    # Samples with images first: transformers decides from the first sample whether a ragged output
    # (text_replacement_offsets) can become a tensor, and a text-only first sample makes it try and fail.
    samples.sort(key=lambda s: not s.images)
    batch, samples = _process(processor, samples, answer_mask, errors) if samples else (None, [])
    if batch is not None and max_length is not None:
        batch, samples, truncated = _apply_max_length(processor, batch, samples, max_length, overlong, answer_mask, errors)
    else:
        truncated = np.zeros(len(samples), dtype=bool)
    if batch is None:
        empty = np.zeros(0, dtype=np.int64)
        return None, BatchInfo(empty, empty, np.zeros(0, dtype=bool), errors)
    mask = _answer_mask(processor, batch, samples) if answer_mask else None
    if mask is not None:
        mask &= batch["attention_mask"].bool()
    for key in NON_MODEL_KEYS:
        batch.pop(key, None)
    lengths = batch["attention_mask"].sum(1).numpy().astype(np.int64)
    positions = np.array([s.position for s in samples], dtype=np.int64)
    return batch, BatchInfo(positions, lengths, truncated, errors, mask)


def _apply_max_length(processor, batch, samples, max_length, overlong, answer_mask, errors):
    """Cut rows longer than ``max_length`` (right padding: zero their tail) or drop them and re-process."""
    import torch

    attn = batch["attention_mask"]
    lengths = attn.sum(1)
    over = lengths > max_length
    if not bool(over.any()):
        return batch, samples, np.zeros(len(samples), dtype=bool)
    ids = batch["input_ids"]
    mm = torch.tensor(_mm_token_ids(processor), dtype=ids.dtype)
    is_mm = torch.isin(ids, mm) & attn.bool()
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    last_mm = torch.where(is_mm, positions, torch.full_like(positions, -1)).max(1).values
    cuttable = over & (last_mm < max_length) if overlong == "truncate" else torch.zeros_like(over)
    drop = over & ~cuttable
    if bool(drop.any()):
        kept = []
        for i, s in enumerate(samples):
            if drop[i]:
                detail = f"{int(lengths[i])} tokens > max_length {max_length}"
                if overlong == "truncate":
                    detail += f"; image tokens run to position {int(last_mm[i])}, so cutting would drop image tokens"
                errors.append(SampleError("over-long sample", s.where, detail, s.sample_id))
            else:
                kept.append(s)
        if not kept:
            return None, [], np.zeros(0, dtype=bool)
        batch, kept = _process(processor, kept, answer_mask, errors)
        if batch is None:
            return None, [], np.zeros(0, dtype=bool)
        return _apply_max_length(processor, batch, kept, max_length, overlong, answer_mask, errors)
    pad_id = processor.tokenizer.pad_token_id or 0
    tail = positions >= max_length
    batch["attention_mask"] = attn.masked_fill(tail, 0)
    batch["input_ids"] = ids.masked_fill(tail, pad_id)
    for key in ("mm_token_type_ids", "token_type_ids"):
        if key in batch:
            batch[key] = batch[key].masked_fill(tail, 0)
    new_len = int(batch["attention_mask"].sum(1).max())
    for key in SEQUENCE_KEYS + ("offset_mapping",):
        if key in batch and hasattr(batch[key], "shape"):
            batch[key] = batch[key][:, :new_len]
    return batch, samples, over.numpy()
