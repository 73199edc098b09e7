"""From samples to backbone inputs and training targets: the policy's pre- and post-processing.

A sample is either a VLA catalog row (``image_refs`` in camera order, ``instruction``, ``state``,
``action`` ``[H', A]``, ``action_mask`` ``[H']``, ``id``, ``origin``) or a live observation in the
LeRobot feature names the closed-loop evaluator sends::

    {"observation.images.<camera>": uint8 [H, W, 3] (or batched [B, H, W, 3]),
     "observation.state": float32 [S] (or [B, S]), "task": str (or list of B str)}

Both become the same prompt, rendered with the VLM's chat template through
:func:`midtrain.models.inputs.build_batch`: one user turn with the camera images (resized to the
policy's ``image_size`` first, so evaluation frames match training frames) then the instruction,
and an assistant turn that depends on the head:

- ``mlp``: Q ``<|action_query|>`` placeholders (their embeddings are the learned queries);
- ``flow``: none (the expert attends to the whole prompt);
- ``tokens``: the chunk's ``H * A`` action-bin tokens; at inference the prompt is the same
  sequence cut before its first action token, so training and decoding see identical prefixes.
  The state, if used, is a ``<|state|>`` placeholder at the end of the user turn.

With ``blank_images`` (the blind control) every camera image of the prompt is one constant
mid-grey frame of ``image_size``, whatever the sample or observation shows: training rows and live
observations go through :meth:`PolicyProcessor.encode`, so the policy sees the same frame in both.

:class:`PolicyProcessor` holds only the HF processor and the policy's config, so it is cheap to
pickle into DataLoader workers; :meth:`PolicyProcessor.collate` is the training ``collate``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..data.images import encode_image
from ..models.inputs import SEQUENCE_KEYS, build_batch
from ..runs import SampleError
from .backbone import ACTION_QUERY_TOKEN, STATE_TOKEN, action_bin_token
from .configuration import PolicyConfig
from .heads import ActionBins
from .normalize import Normalizer

IMAGE_PLACEHOLDER = "<image>"
BLANK_PIXEL = 128  # the blind control's constant frame: mid-grey in every channel


def tokens_bin_range(config: PolicyConfig) -> float:
    s = config.settings
    if s.tokens.bin_range is not None:
        return s.tokens.bin_range
    return 3.0 if s.normalization == "mean_std" else 1.0


class PolicyProcessor:
    """Prompts, targets and their tensors for one policy (see the module docstring)."""

    def __init__(self, processor, config: PolicyConfig):
        self.processor = processor
        self.config = config
        stats = config.normalization_stats
        s = config.settings
        self.action_normalizer = Normalizer(s.normalization, stats["action"], config.gripper_dims, s.binarize_gripper)
        self.state_normalizer = Normalizer(s.normalization, stats["state"]) if config.state_dim else None
        self.binary = torch.as_tensor(self.action_normalizer.binary)
        tok = processor.tokenizer
        self.query_id = tok.convert_tokens_to_ids(ACTION_QUERY_TOKEN) if s.head == "mlp" else None
        self.state_id = tok.convert_tokens_to_ids(STATE_TOKEN) if s.head == "tokens" and config.state_dim else None
        if s.head == "tokens":
            self.bins = ActionBins(s.tokens.bins, tokens_bin_range(config))
            self.bin_ids = torch.as_tensor(tok.convert_tokens_to_ids([action_bin_token(k) for k in range(s.tokens.bins)]))
        self.num_queries = (s.chunk_size if s.mlp.queries == "chunk" else 1) if s.head == "mlp" else 0
        self.blank_ref = None
        if s.blank_images:
            h, w = config.image_size
            self.blank_ref = {"path": None, "bytes": encode_image(np.full((h, w, 3), BLANK_PIXEL, dtype=np.uint8), "BMP")}

    # -- prompts -------------------------------------------------------------------------
    def _row(self, row: dict, answer: str | None) -> dict:
        user = IMAGE_PLACEHOLDER * len(row["image_refs"]) + (row.get("instruction") or "")
        if self.state_id is not None:
            user += STATE_TOKEN
        messages = [{"role": "user", "content": user}]
        if answer:
            messages.append({"role": "assistant", "content": answer})
        refs = [self.blank_ref] * len(row["image_refs"]) if self.blank_ref is not None else row["image_refs"]
        return {"id": row.get("id"), "origin": row.get("origin"), "image_refs": refs, "messages": messages}

    def _answer(self, target: np.ndarray | None) -> str | None:
        head = self.config.head
        if head == "mlp":
            return ACTION_QUERY_TOKEN * self.num_queries
        if head == "tokens":
            h, a = self.config.chunk_size, self.config.action_dim
            k = np.zeros((h, a), dtype=np.int64) if target is None else self._bins_of(target)
            return "".join(action_bin_token(int(i)) for i in k.reshape(-1))
        return None

    def _bins_of(self, target: np.ndarray) -> np.ndarray:
        y = torch.as_tensor(target)
        y = torch.where(self.binary, 2 * y - 1, y)
        return self.bins.encode(y).numpy()

    def encode(self, rows: list[dict], targets: list[np.ndarray] | None = None) -> dict[str, Any]:
        """Processor outputs for ``rows`` (right-padded); ``targets`` (normalised ``[H, A]`` each) fill
        the tokens head's answer. Raises SampleError for the first row the processor leaves out."""
        prompts = [self._row(r, self._answer(None if targets is None else targets[i])) for i, r in enumerate(rows)]
        inputs, info = build_batch(prompts, self.processor)
        if info.errors:
            raise info.errors[0]
        inputs = dict(inputs)
        ids = inputs["input_ids"]
        expected = {self.query_id: self.num_queries, self.state_id: 1}
        for token_id, n in expected.items():
            if token_id is None:
                continue
            counts = (ids == token_id).sum(1)
            if bool((counts != n).any()):
                i = int(torch.nonzero(counts != n)[0])
                raise SampleError("prompt lost its placeholders", rows[i].get("origin") or str(rows[i].get("id")),
                                  f"{int(counts[i])} of {n} placeholder tokens survived the processor", rows[i].get("id"))  # fmt: skip
        if self.config.head == "tokens":
            is_action = torch.isin(ids, self.bin_ids)
            if "token_type_ids" in inputs:  # PaliGemma: a causal suffix from the first action token on
                started = is_action.cumsum(1) > 0
                inputs["token_type_ids"] = torch.where(started & inputs["attention_mask"].bool(), 1, inputs["token_type_ids"])
        return inputs

    # -- training batches ----------------------------------------------------------------
    def collate(self, rows: list[dict]) -> dict[str, Any]:
        """A training batch from catalog rows: backbone ``inputs``, the normalised ``action``
        ``[B, H, A]`` (binarised dims in {0, 1}), its ``action_mask`` ``[B, H]``, the normalised
        ``state`` ``[B, S]`` (or None) and ``sample_ids``."""
        h = self.config.chunk_size
        actions = np.stack([np.asarray(r["action"], dtype=np.float32)[:h] for r in rows])
        mask = np.stack([np.asarray(r["action_mask"], dtype=bool)[:h] for r in rows])
        target = self.action_normalizer.normalize(actions).astype(np.float32)
        batch = {
            "inputs": self.encode(rows, list(target) if self.config.head == "tokens" else None),
            "action": torch.from_numpy(target),
            "action_mask": torch.from_numpy(mask),
            "state": self.state_tensor([r["state"] for r in rows]),
            "sample_ids": [str(r.get("id")) for r in rows],
        }
        return batch

    def state_tensor(self, states: list) -> torch.Tensor | None:
        if self.state_normalizer is None:
            return None
        s = np.asarray(states, dtype=np.float32).reshape(len(states), -1)
        return torch.from_numpy(self.state_normalizer.normalize(s).astype(np.float32))

    # -- live observations ---------------------------------------------------------------
    def observation_rows(self, batch: dict[str, Any]) -> tuple[list[dict], torch.Tensor | None]:
        """Rows (images encoded losslessly after resizing) and the normalised state of an
        observation batch; a single observation counts as a batch of one."""
        cfg = self.config
        missing = [k for k in cfg.camera_keys if k not in batch]
        if missing:
            raise KeyError(f"observation has no {missing[0]!r}; this policy reads cameras {cfg.camera_keys} (keys given: {sorted(batch)})")
        frames = {k: _as_uint8_frames(batch[k], k) for k in cfg.camera_keys}
        n = len(next(iter(frames.values())))
        tasks = batch.get("task")
        if tasks is None:
            raise KeyError("observation has no 'task' (the instruction string)")
        tasks = [tasks] * n if isinstance(tasks, str) else list(tasks)
        if len(tasks) != n:
            raise ValueError(f"observation: {len(tasks)} tasks for {n} images")
        state = None
        if cfg.state_dim:
            if "observation.state" not in batch:
                raise KeyError(f"observation has no 'observation.state'; this policy reads a {cfg.state_dim}-D state")
            raw = np.asarray(_numpy(batch["observation.state"]), dtype=np.float32).reshape(n, -1)
            if raw.shape[1] != cfg.state_dim:
                raise ValueError(f"observation.state has {raw.shape[1]} dimensions; this policy was trained on {cfg.state_dim}")
            state = self.state_tensor(list(raw))
        h, w = cfg.image_size
        rows = []
        for i in range(n):
            refs = [{"path": None, "bytes": encode_image(_resized(frames[k][i], h, w), "BMP")} for k in cfg.camera_keys]
            rows.append({"id": f"observation/{i}", "origin": "observation", "image_refs": refs, "instruction": tasks[i]})
        return rows, state

    def prompt_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The tokens head's decoding prompt: :meth:`encode` outputs cut before each row's first
        action token and left-padded (what ``generate`` needs)."""
        return left_padded_prefix(inputs, torch.isin(inputs["input_ids"], self.bin_ids), self.processor.tokenizer.pad_token_id or 0)

    def decode_tokens(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Generated action tokens ``[B, H * A]`` -> the normalised chunk ``[B, H, A]``."""
        lookup = torch.full((int(self.bin_ids.max()) + 1,), -1, dtype=torch.long)
        lookup[self.bin_ids] = torch.arange(len(self.bin_ids))
        k = lookup[token_ids.cpu().clamp(0, len(lookup) - 1)]
        if bool((k < 0).any()):
            raise RuntimeError("decoding produced a token that is not an action token")
        y = self.bins.decode(k).reshape(len(k), self.config.chunk_size, self.config.action_dim)
        return torch.where(self.binary, (y > 0).float(), y)


def left_padded_prefix(inputs: dict[str, Any], cut: torch.Tensor, pad_id: int) -> dict[str, Any]:
    """Sequence tensors cut at each row's first ``cut`` position and re-padded on the left."""
    attn = inputs["attention_mask"]
    lengths = torch.where(cut.any(1), cut.float().argmax(1), attn.sum(1)).long()
    width = int(lengths.max())
    out = dict(inputs)
    for key in SEQUENCE_KEYS:
        value = inputs.get(key)
        if value is None or not hasattr(value, "shape") or value.dim() != 2:
            continue
        fill = pad_id if key == "input_ids" else 0
        new = torch.full((value.shape[0], width), fill, dtype=value.dtype)
        for i, n in enumerate(lengths.tolist()):
            new[i, width - n :] = value[i, :n]
        out[key] = new
    return out


def _numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_uint8_frames(value, key: str) -> np.ndarray:
    """``[B, H, W, 3]`` uint8 from uint8 HWC, or float [0, 1] HWC/CHW (LeRobot tensors), batched or not."""
    x = _numpy(value)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"{key}: expected an image [H, W, 3] or a batch [B, H, W, 3], got shape {x.shape}")
    if x.shape[-1] != 3 and x.shape[1] == 3:
        x = x.transpose(0, 2, 3, 1)
    if x.shape[-1] != 3:
        raise ValueError(f"{key}: expected 3 colour channels, got shape {x.shape}")
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return x


def _resized(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    if frame.shape[:2] == (height, width):
        return frame
    from PIL import Image

    return np.asarray(Image.fromarray(np.ascontiguousarray(frame)).resize((width, height), Image.BILINEAR))
