"""``VLAPolicy``: a VLM backbone with an action head, behind LeRobot's policy contract.

- ``forward(batch) -> (loss, logs)`` on a training batch (:meth:`PolicyProcessor.collate`), or on
  a batch whose backbone output was computed once beforehand (``batch["features"]``, the frozen
  probe: see :meth:`VLAPolicy.backbone_features`), or on a VQA batch with ``labels`` (ETC
  co-training: the backbone's next-token loss on the answer tokens, :meth:`VLAPolicy.answer_loss`);
- ``predict_action_chunk(batch) -> [B, H, A]`` in the dataset's action units;
- ``select_action(observation) -> np.ndarray [A]`` (``[B, A]`` for a batch): pops actions from a queue filled with the
  first ``n_action_steps`` of a predicted chunk, predicting again only when it is empty;
- ``reset()`` empties the queue (call it at every episode start); ``seed(n)`` makes the flow
  head's noise a function of ``n`` (the closed-loop evaluator seeds every episode);
- ``save_pretrained(dir)`` / ``VLAPolicy.from_pretrained(dir)``: a self-describing directory::

      config.json          PolicyConfig ("type": "midtrain_vla"): head, chunking, cameras, image
                           size, action/state names, normalisation statistics
      model.safetensors    the head, the learned queries / state projection
      backbone/            the VLM (save_pretrained; LoRA merged) and its processor, with the
                           added placeholder / action tokens
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..devices import resolve_device
from .action_heads import HEADS, HeadContext
from .backbone import Backbone, add_special_tokens, is_bidirectional
from .configuration import PolicyConfig
from .heads import step_dim_mask
from .processor import PolicyProcessor

HEAD_WEIGHTS = "model.safetensors"


class VLAPolicy(nn.Module):
    """See the module docstring. Build a new one with :meth:`build`, load one with :meth:`from_pretrained`."""

    def __init__(self, config: PolicyConfig, vlm, processor):
        super().__init__()
        head_cls = HEADS[config.head]
        if head_cls.needs_causal_lm and is_bidirectional(vlm):
            raise ValueError(
                f"policy.head: {config.head} needs a causal language model; {vlm.config.get_text_config().model_type!r} "
                "attends both ways (the demo VLM's MiniLM), so next-token targets would be visible. Use head: mlp or flow"
            )
        add_special_tokens(vlm, processor, head_cls.added_tokens(config))
        self.config = config
        self.backbone = Backbone(vlm, processor)
        self.io = PolicyProcessor(processor, config)
        self.register_buffer("binary", self.io.binary.clone(), persistent=False)
        self.head = head_cls(config, self.backbone, self.io)
        self.frozen_backbone = False
        self._eval_modules: list[nn.Module] = []
        self._noise: torch.Generator | None = None
        self.reset()

    # -- construction --------------------------------------------------------------------
    @classmethod
    def build(cls, config: PolicyConfig, backbone: str | Path, dtype: str = "float32", device: str = "auto",
              attn_implementation: str = "sdpa", trust_remote_code: bool = False, seed: int = 0) -> "VLAPolicy":  # fmt: skip
        """A new policy on the VLM ``backbone`` (hub id, path, or an ``sft`` output); the head is
        initialised from ``seed``."""
        from ..models.loading import load_vlm

        vlm, processor = load_vlm(backbone, dtype, device, attn_implementation, trust_remote_code)
        config.hidden_size = int(vlm.config.get_text_config().hidden_size)
        config.backbone_source = str(backbone)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            policy = cls(config, vlm, processor)
        return policy.to(next(vlm.parameters()).device)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "auto", dtype: str = "float32") -> "VLAPolicy":
        """Load a policy saved by :meth:`save_pretrained`; needs nothing but the directory."""
        from ..models.loading import load_vlm
        from ..runs import load_safetensors

        directory = Path(directory)
        config = PolicyConfig.load(directory)
        vlm, processor = load_vlm(directory / config.backbone, dtype, device)
        policy = cls(config, vlm, processor)
        state = {policy.head.checkpoint_key(k): v for k, v in load_safetensors(directory / HEAD_WEIGHTS).items()}
        missing, unexpected = policy.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise ValueError(f"{directory / HEAD_WEIGHTS}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
        policy.to(next(vlm.parameters()).device).eval()
        return policy

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Every weight that is not the backbone's (the head, queries, state projection)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(self, directory: str | Path) -> Path:
        from ..runs import save_safetensors_atomic

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(directory / self.config.backbone)
        save_safetensors_atomic(directory / HEAD_WEIGHTS, {k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()})
        self.config.save(directory)  # last: a directory with config.json is complete
        return directory

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    # -- backbone ------------------------------------------------------------------------
    def _context(self, inputs: dict[str, Any] | None, state: torch.Tensor | None,
                 features: list[torch.Tensor] | None = None) -> HeadContext:  # fmt: skip
        """What the head reads of a batch: the backbone's output as the head keeps it (computed here,
        or from precomputed ``features``), the state and the binarised dims."""
        ctx = HeadContext(inputs, state.to(self.device) if state is not None else None, self.binary)
        if not self.head.reads_backbone:
            return ctx
        if self.config.settings.features == "vision_tower":
            pooled = torch.stack([f.to(self.device) for f in features]) if features is not None else (
                self.backbone.pooled_image_features(inputs))  # fmt: skip
            ctx.hidden, ctx.mask = self.head.read_pooled(pooled)
            return ctx
        if features is not None:
            ctx.hidden, ctx.mask = self.head.collate_features([f.to(self.device) for f in features])
            return ctx
        ids = inputs["input_ids"].to(self.device)
        with self.backbone.injected(self.head.injected(ids.shape[0], ctx.state)):
            hidden = self.backbone.hidden_states(inputs)
        ctx.hidden, ctx.mask = self.head.read(hidden, inputs)
        return ctx

    def backbone_features(self, inputs: dict[str, Any], state: torch.Tensor | None = None) -> list[torch.Tensor]:
        """What the head reads from the backbone, per sample: the query states ``[Q, D]`` (mlp) or
        the unpadded last hidden states ``[T_i, D]`` (flow), or the pooled image features ``[1, D]``
        (``features: vision_tower``). With a frozen backbone these are fixed, so they can be computed
        once per sample and passed as ``batch["features"]``."""
        if not self.head.reads_backbone:
            raise ValueError(f"the {self.config.head} head has no fixed backbone features: it trains the backbone")
        if self.config.settings.features == "vision_tower":
            return list(self.backbone.pooled_image_features(inputs))
        ctx = self._context(inputs, state)
        return self.head.features(ctx.hidden, ctx.mask)

    # -- training ------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a training batch (normalised targets from :meth:`PolicyProcessor.collate`), or the
        answer-token loss of a VQA batch (one with ``labels``)."""
        if "labels" in batch:
            return self.answer_loss(batch), {}
        ctx = self._context(batch.get("inputs"), batch.get("state"), batch.get("features"))
        loss, logs = self.head.loss(ctx, batch)
        return loss, {"loss": float(loss.detach()), **logs}

    def answer_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token cross-entropy of the backbone's LM head on a VQA batch's answer tokens
        (``labels`` != -100, as :func:`midtrain.sft.data.collate_sft` builds them): the loss
        ``midtrain sft`` trains, computed on the policy's own backbone (LoRA or full)."""
        from ..models.forward import IGNORE, chunked_answer_loss, logit_softcap

        vlm = self.backbone.vlm
        hidden = self.backbone.hidden_states({k: v for k, v in batch.items() if k != "labels"})
        labels = batch["labels"].to(self.device)[:, 1:]  # token t is predicted from position t - 1
        answer = labels != IGNORE
        return chunked_answer_loss(hidden[:, :-1][answer], vlm.get_output_embeddings(), labels[answer], logit_softcap(vlm))

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def predict_normalized(self, inputs: dict[str, Any], state: torch.Tensor | None, noise: torch.Tensor | None = None,
                           features: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """The normalised chunk ``[B, H, A]`` (binarised dims as probabilities / indicators) for
        ``inputs`` as :meth:`PolicyProcessor.encode` builds them (for the tokens head, the prompt is
        cut before the action tokens)."""
        return self.head.sample(self._context(inputs, state, features), noise)

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        """Action chunks ``[B, H, A]`` (float32, CPU) in the dataset's units for a batch of
        observations (see :mod:`midtrain.policy.processor` for the keys)."""
        was_training = self.training
        self.eval()
        try:
            rows, state = self.io.observation_rows(batch)
            if noise is None and self._noise is not None and self.head.draws_noise:
                noise = torch.randn(len(rows), self.config.chunk_size, self.config.action_dim, generator=self._noise)
            y = self.predict_normalized(self.io.encode(rows), state, noise)
        finally:
            self.train(was_training)
        return torch.as_tensor(self.io.action_normalizer.unnormalize(y.float().cpu().numpy()), dtype=torch.float32)

    def reset(self) -> None:
        """Empty the action queue; call at the start of every episode."""
        self._queue: deque = deque()

    def seed(self, seed: int) -> None:
        """Draw the flow head's noise from a generator seeded with ``seed`` (the evaluator calls this
        with each episode's seed, so an episode acts the same in whichever worker runs it)."""
        self._noise = torch.Generator().manual_seed(int(seed))

    @torch.no_grad()
    def select_action(self, observation: dict[str, Any]) -> np.ndarray:
        """One action per observation (float32, dataset units): ``[A]`` for one observation, ``[B, A]``
        for a batch of B (images ``[B, H, W, 3]``). A new chunk is predicted only when the first
        ``n_action_steps`` of the previous one have been executed; a batch keeps its size until
        :meth:`reset`."""
        camera = observation.get(self.config.camera_keys[0]) if self.config.camera_keys else None
        batched = camera is not None and len(np.shape(camera)) == 4
        if not self._queue:
            chunk = self.predict_action_chunk(observation).numpy()  # [B, H, A]
            self._queue.extend(chunk[:, : self.config.n_action_steps].transpose(1, 0, 2))
        actions, n = self._queue[0], np.shape(camera)[0] if batched else 1
        if n != len(actions):
            raise ValueError(f"select_action: {n} observation(s), but the queued actions are for {len(actions)}; "
                             "call reset() when the batch changes")  # fmt: skip
        self._queue.popleft()
        return actions if batched else actions[0]

    # -- trainable parts ----------------------------------------------------------------
    def configure_trainable(self, mode: str, vision: str = "frozen", lora=None) -> dict[str, int]:
        """Backbone ``full | lora | frozen``, vision tower ``frozen | trainable``; the head always
        trains. ``frozen`` also fixes the learned queries (they are backbone inputs), so the
        backbone's output depends only on the sample and :meth:`backbone_features` can be computed
        once per sample. Returns trainable parameter counts per part."""
        counts = self.backbone.configure_trainable(mode, vision, lora, train_token_matrix=self.head.trains_token_matrix)
        self.frozen_backbone = mode == "frozen"
        if self.frozen_backbone:
            for p in self.head.backbone_inputs():
                p.requires_grad_(False)
        self._eval_modules = [self.backbone.vlm] if self.frozen_backbone else []
        if not self.frozen_backbone and vision != "trainable":
            from .backbone import vision_module

            vis = vision_module(self.backbone.vlm)
            self._eval_modules += [vis] if vis is not None else []
        counts["head"] = sum(p.numel() for n, p in self.named_parameters() if p.requires_grad and not n.startswith("backbone."))
        self.train(self.training)
        return counts

    def train(self, mode: bool = True) -> "VLAPolicy":
        """As ``nn.Module.train``, but frozen parts stay in eval mode (no dropout, and batch-norm
        statistics of a frozen vision tower, e.g. the demo VLM's EfficientNet, do not drift)."""
        super().train(mode)
        for module in self._eval_modules:
            module.eval()
        return self

    def gradient_checkpointing_enable(self) -> None:
        """Recompute the backbone's activations in the backward pass (the training loop's switch)."""
        self.backbone.vlm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def metrics(self, batch: dict[str, Any], noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Offline metrics of one batch against its targets, as sums to aggregate over batches:
        per-dimension absolute error on the normalised scale of the continuous dims and gripper
        accuracy of the binarised ones, over valid steps only."""
        target = batch["action"].to(self.device).float()
        mask = batch["action_mask"].to(self.device)
        pred = self.predict_normalized(batch.get("inputs"), batch.get("state"), noise, batch.get("features")).float()
        valid = step_dim_mask(mask, torch.ones_like(self.binary))
        err = (pred - target).abs() * valid
        correct = ((pred > 0.5) == (target > 0.5)).float() * valid
        return {"abs_error": err.sum((0, 1)), "correct": correct.sum((0, 1)), "count": valid.sum((0, 1))}
