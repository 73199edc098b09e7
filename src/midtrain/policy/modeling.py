"""``VLAPolicy``: a VLM backbone with an action head, behind LeRobot's policy contract.

- ``forward(batch) -> (loss, logs)`` on a training batch (:meth:`PolicyProcessor.collate`), or on
  a batch whose backbone output was computed once beforehand (``batch["features"]``, the frozen
  probe: see :meth:`VLAPolicy.backbone_features`), or on a VQA batch with ``labels`` (ETC
  co-training: the backbone's next-token loss on the answer tokens, :meth:`VLAPolicy.answer_loss`);
- ``predict_action_chunk(batch) -> [B, H, A]`` in the dataset's action units;
- ``select_action(observation) -> np.ndarray [A]``: pops actions from a queue filled with the
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
from .backbone import ACTION_QUERY_TOKEN, STATE_TOKEN, Backbone, action_bin_token, add_special_tokens, is_bidirectional
from .configuration import PolicyConfig
from .heads import FlowActionExpert, MLPActionHead, masked_mean, step_dim_mask
from .processor import PolicyProcessor

HEAD_WEIGHTS = "model.safetensors"


class VLAPolicy(nn.Module):
    """See the module docstring. Build a new one with :meth:`build`, load one with :meth:`from_pretrained`."""

    def __init__(self, config: PolicyConfig, vlm, processor):
        super().__init__()
        s = config.settings
        if s.head == "tokens" and is_bidirectional(vlm):
            raise ValueError(
                f"policy.head: tokens needs a causal language model; {vlm.config.get_text_config().model_type!r} attends "
                "both ways (the demo VLM's MiniLM), so next-token targets would be visible. Use head: mlp or flow"
            )
        tokens = {"mlp": [ACTION_QUERY_TOKEN], "flow": [],
                  "tokens": [action_bin_token(k) for k in range(s.tokens.bins)] + ([STATE_TOKEN] if config.state_dim else [])}[s.head]  # fmt: skip
        add_special_tokens(vlm, processor, tokens)
        self.config = config
        self.backbone = Backbone(vlm, processor)
        self.io = PolicyProcessor(processor, config)
        self.register_buffer("binary", self.io.binary.clone(), persistent=False)
        d, a, h, sd = self.backbone.hidden_size, config.action_dim, config.chunk_size, config.state_dim
        if s.head == "mlp":
            scale = self.backbone.embedding_scale()
            self.queries = nn.Parameter(torch.randn(self.io.num_queries, d) * scale)
            self.head = MLPActionHead(d, a, h, sd, s.mlp)
        elif s.head == "flow":
            self.head = FlowActionExpert(d, a, h, sd, s.flow)
        else:
            self.state_proj = nn.Linear(sd, d) if sd else None
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
        state = load_safetensors(directory / HEAD_WEIGHTS)
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
    def _injected(self, batch_size: int, state: torch.Tensor | None) -> dict[int, torch.Tensor]:
        io = self.io
        out = {}
        if io.query_id is not None:
            out[io.query_id] = self.queries[None].expand(batch_size, -1, -1)
        if io.state_id is not None:
            out[io.state_id] = self.state_proj(state.to(self.device))[:, None, :]
        return out

    def backbone_features(self, inputs: dict[str, Any], state: torch.Tensor | None = None) -> list[torch.Tensor]:
        """What the head reads from the backbone, per sample: the query states ``[Q, D]`` (mlp) or
        the unpadded last hidden states ``[T_i, D]`` (flow). With a frozen backbone these are fixed,
        so they can be computed once per sample and passed as ``batch["features"]``."""
        if self.config.head == "tokens":
            raise ValueError("the tokens head has no fixed backbone features: it trains the backbone")
        hidden, mask = self._context(inputs, state)
        if self.config.head == "mlp":
            return list(hidden)
        return [hidden[i, mask[i]] for i in range(len(hidden))]

    def _context(self, inputs: dict[str, Any], state: torch.Tensor | None):
        ids = inputs["input_ids"].to(self.device)
        with self.backbone.injected(self._injected(ids.shape[0], state)):
            hidden = self.backbone.hidden_states(inputs)
        if self.config.head == "mlp":
            where = ids == self.io.query_id
            return hidden[where].reshape(ids.shape[0], self.io.num_queries, hidden.shape[-1]), None
        return hidden, inputs["attention_mask"].to(self.device).bool()

    def _features_or_context(self, batch: dict[str, Any]):
        """``(hidden, mask)`` from precomputed ``features`` (padded here) or by running the backbone."""
        feats = batch.get("features")
        if feats is None:
            return self._context(batch["inputs"], batch.get("state"))
        feats = [f.to(self.device) for f in feats]
        if self.config.head == "mlp":
            return torch.stack(feats), None
        lengths = torch.tensor([len(f) for f in feats], device=self.device)
        hidden = nn.utils.rnn.pad_sequence(feats, batch_first=True)
        return hidden, torch.arange(hidden.shape[1], device=self.device)[None] < lengths[:, None]

    # -- training ------------------------------------------------------------------------
    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss on a training batch (normalised targets from :meth:`PolicyProcessor.collate`), or the
        answer-token loss of a VQA batch (one with ``labels``)."""
        if "labels" in batch:
            return self.answer_loss(batch), {}
        target = batch["action"].to(self.device).float()
        mask = batch["action_mask"].to(self.device)
        state = batch.get("state")
        state = state.to(self.device) if state is not None else None
        head = self.config.head
        if head == "tokens":
            loss, logs = self._token_loss(batch["inputs"], target, mask, state)
        else:
            hidden, ctx_mask = self._features_or_context(batch)
            if head == "mlp":
                loss, logs = self.head.loss(self.head(hidden, state), target, mask, self.binary)
            else:
                loss, logs = self.head.loss(target, mask, self.binary, hidden, ctx_mask, state)
        logs = {"loss": float(loss.detach()), **logs}
        return loss, logs

    def answer_loss(self, batch: dict[str, Any]) -> torch.Tensor:
        """Mean next-token cross-entropy of the backbone's LM head on a VQA batch's answer tokens
        (``labels`` != -100, as :func:`midtrain.sft.data.collate_sft` builds them): the loss
        ``midtrain sft`` trains, computed on the policy's own backbone (LoRA or full)."""
        from ..sft.model import IGNORE, chunked_answer_loss

        vlm = self.backbone.vlm
        hidden = self.backbone.hidden_states({k: v for k, v in batch.items() if k != "labels"})
        labels = batch["labels"].to(self.device)[:, 1:]  # token t is predicted from position t - 1
        answer = labels != IGNORE
        softcap = getattr(vlm.config.get_text_config(), "final_logit_softcapping", None)
        return chunked_answer_loss(hidden[:, :-1][answer], vlm.get_output_embeddings(), labels[answer], softcap)

    def action_token_logits(self, inputs: dict[str, Any], state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forced ``(logits [B, H*A, vocab], labels [B, H*A])`` of the action tokens in
        ``inputs`` (training format): each token's logits come from the hidden state before it, and
        only those rows go through the LM head (no ``[B, T, vocab]`` tensor)."""
        ids = inputs["input_ids"].to(self.device)
        with self.backbone.injected(self._injected(ids.shape[0], state)):
            hidden = self.backbone.hidden_states(inputs)
        is_action = torch.isin(ids, self.io.bin_ids.to(self.device))
        b, n = ids.shape[0], self.config.chunk_size * self.config.action_dim
        pos = torch.nonzero(is_action)[:, 1].reshape(b, n)
        prev = hidden.gather(1, (pos - 1)[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.backbone.vlm.get_output_embeddings()(prev).float(), ids.gather(1, pos)

    def _token_loss(self, inputs, target, mask, state):
        """Cross-entropy of the LM on the action tokens only, over valid chunk steps."""
        logits, labels = self.action_token_logits(inputs, state)
        b, n = labels.shape
        ce = nn.functional.cross_entropy(logits.reshape(b * n, -1), labels.reshape(-1), reduction="none").reshape(b, n)
        weights = mask[:, :, None].expand(-1, -1, self.config.action_dim).reshape(b, n)
        loss = masked_mean(ce, weights)
        acc = masked_mean((logits.argmax(-1) == labels).float(), weights)
        return loss, {"token_accuracy": float(acc)}

    # -- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def predict_normalized(self, inputs: dict[str, Any], state: torch.Tensor | None, noise: torch.Tensor | None = None,
                           features: list[torch.Tensor] | None = None) -> torch.Tensor:  # fmt: skip
        """The normalised chunk ``[B, H, A]`` (binarised dims as probabilities / indicators) for
        ``inputs`` as :meth:`PolicyProcessor.encode` builds them (for the tokens head, the prompt is
        cut before the action tokens here)."""
        head = self.config.head
        state = state.to(self.device) if state is not None else None
        if head == "tokens":
            return self._decode_tokens(inputs, state)
        hidden, ctx_mask = self._features_or_context({"inputs": inputs, "state": state, "features": features})
        if head == "mlp":
            return self.head.decode(self.head(hidden, state), self.binary)
        if noise is not None:
            noise = noise.to(self.device)
        return self.head.sample(hidden, ctx_mask, self.binary, state, noise)

    def _decode_tokens(self, inputs, state) -> torch.Tensor:
        from transformers import LogitsProcessor, LogitsProcessorList

        allowed = self.io.bin_ids.to(self.device)

        class OnlyActionTokens(LogitsProcessor):
            def __call__(self, input_ids, scores):
                keep = torch.full_like(scores, float("-inf"))
                keep[:, allowed] = 0
                return scores + keep

        kw = self.backbone.model_inputs(self.io.prompt_inputs(inputs))
        n = self.config.chunk_size * self.config.action_dim
        with self.backbone.injected(self._injected(kw["input_ids"].shape[0], state)):
            out = self.backbone.vlm.generate(
                **kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1,
                logits_processor=LogitsProcessorList([OnlyActionTokens()]),
                pad_token_id=self.io.processor.tokenizer.pad_token_id, eos_token_id=None,
            )  # fmt: skip
        return self.io.decode_tokens(out[:, -n:])

    @torch.no_grad()
    def predict_action_chunk(self, batch: dict[str, Any], noise: torch.Tensor | None = None) -> torch.Tensor:
        """Action chunks ``[B, H, A]`` (float32, CPU) in the dataset's units for a batch of
        observations (see :mod:`midtrain.policy.processor` for the keys)."""
        was_training = self.training
        self.eval()
        try:
            rows, state = self.io.observation_rows(batch)
            if noise is None and self._noise is not None and self.config.head == "flow":
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
        """One action ``[A]`` (float32, dataset units) for one observation; a new chunk is predicted
        only when the first ``n_action_steps`` of the previous one have been executed."""
        if not self._queue:
            chunk = self.predict_action_chunk(observation)[0].numpy()
            self._queue.extend(chunk[: self.config.n_action_steps])
        return self._queue.popleft()

    # -- trainable parts ----------------------------------------------------------------
    def configure_trainable(self, mode: str, vision: str = "frozen", lora=None) -> dict[str, int]:
        """Backbone ``full | lora | frozen``, vision tower ``frozen | trainable``; the head always
        trains. ``frozen`` also fixes the learned queries (they are backbone inputs), so the
        backbone's output depends only on the sample and :meth:`backbone_features` can be computed
        once per sample. Returns trainable parameter counts per part."""
        counts = self.backbone.configure_trainable(mode, vision, lora, train_token_matrix=self.config.head == "tokens")
        self.frozen_backbone = mode == "frozen"
        if self.frozen_backbone and self.config.head == "mlp":
            self.queries.requires_grad_(False)
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
