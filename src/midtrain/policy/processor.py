"""From samples to backbone inputs and training targets: the policy's pre- and post-processing.

A sample is either a VLA catalog row (``image_refs`` in camera order, ``instruction``, ``state``,
``action`` ``[H', A]``, ``action_mask`` ``[H']``, ``id``, ``origin``) or a live observation in the
LeRobot feature names the closed-loop evaluator sends::

    {"observation.images.<camera>": uint8 [H, W, 3] (or batched [B, H, W, 3]),
     "observation.state": float32 [S] (or [B, S]), "task": str (or list of B str)}

Both become the same prompt, rendered with the VLM's chat template through
:func:`midtrain.models.inputs.build_batch`: one user turn with the camera images (resized to the
policy's ``image_size`` first, so evaluation frames match training frames) then the instruction,
then what the head adds (its :class:`midtrain.policy.action_heads.HeadPrompt`, ``prompt``): placeholders
at the end of the user turn and an assistant turn. ``mlp``: Q ``<|action_query|>`` placeholders
(their embeddings are the learned queries); ``flow``: nothing (the expert attends to the whole
prompt); ``tokens``: a ``<|state|>`` placeholder if the state is used, and the chunk's ``H * A``
action-bin tokens, cut off again for decoding.

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
from ..models.inputs import build_batch
from ..runs import SampleError
from .action_heads import HEADS
from .configuration import PolicyConfig
from .normalize import Normalizer

IMAGE_PLACEHOLDER = "<image>"
BLANK_PIXEL = 128  # the blind control's constant frame: mid-grey in every channel


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
        self.prompt = HEADS[s.head].prompt(config, processor.tokenizer, self.binary)
        self.blank_ref = None
        if s.blank_images:
            h, w = config.image_size
            self.blank_ref = {"path": None, "bytes": encode_image(np.full((h, w, 3), BLANK_PIXEL, dtype=np.uint8), "BMP")}

    # -- prompts -------------------------------------------------------------------------
    def _row(self, row: dict, answer: str | None) -> dict:
        user = IMAGE_PLACEHOLDER * len(row["image_refs"]) + (row.get("instruction") or "") + self.prompt.user_suffix
        messages = [{"role": "user", "content": user}]
        if answer:
            messages.append({"role": "assistant", "content": answer})
        refs = [self.blank_ref] * len(row["image_refs"]) if self.blank_ref is not None else row["image_refs"]
        return {"id": row.get("id"), "origin": row.get("origin"), "image_refs": refs, "messages": messages}

    def encode(self, rows: list[dict], targets: list[np.ndarray] | None = None) -> dict[str, Any]:
        """Processor outputs for ``rows`` (right-padded); ``targets`` (normalised ``[H, A]`` each) fill
        the answer of a head whose answer is the target. Raises SampleError for the first row the
        processor leaves out."""
        prompts = [self._row(r, self.prompt.answer(None if targets is None else targets[i])) for i, r in enumerate(rows)]
        inputs, info = build_batch(prompts, self.processor)
        if info.errors:
            raise info.errors[0]
        inputs = dict(inputs)
        ids = inputs["input_ids"]
        for token_id, n in self.prompt.placeholders().items():
            counts = (ids == token_id).sum(1)
            if bool((counts != n).any()):
                i = int(torch.nonzero(counts != n)[0])
                raise SampleError("prompt lost its placeholders", rows[i].get("origin") or str(rows[i].get("id")),
                                  f"{int(counts[i])} of {n} placeholder tokens survived the processor", rows[i].get("id"))  # fmt: skip
        return self.prompt.finish(inputs)

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
            "inputs": self.encode(rows, list(target) if self.prompt.answer_is_target else None),
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
