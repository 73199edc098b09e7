"""Perplexity baselines: how likely are a pool sample's answers under a VLA-adapted VLM?

- ``vla_perplexity``: per-sample perplexity of the assistant-answer tokens under a VLM
  fine-tuned on VLA data rendered as text (:func:`midtrain.sft.vla_text.render_vla_as_text`). Lower = closer, so
  ``score = -log ppl_vla = -mean answer-token NLL``.
- ``delta_perplexity``: the same minus the base VLM's, ranked ascending:
  ``score = -(log ppl_vla - log ppl_base)`` (``delta: log``, the default: a per-token
  log-likelihood ratio, scale-free) or ``score = -(ppl_vla - ppl_base)`` (``delta: ppl``).

Both stream the catalog's VLM rows, batch them (length-sorted within a read chunk, so
padding stays small) through ``midtrain.models.inputs.build_batch`` with answer-token
masks, run only the backbone, and apply the LM head to the hidden states at answer
positions only (in blocks), so no ``[batch, tokens, vocab]`` logits tensor is built.
Rows the processor or either model cannot score go through ``on_error``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..data.catalog import catalog_files
from ..runs import SampleError, StageError, StageRun

CATALOG_COLUMNS = ["id", "source", "kind", "image_refs", "messages", "instruction", "origin"]
READ_ROWS = 512  # catalog rows read (and length-sorted) at a time
HEAD_BLOCK = 1024  # answer positions per LM-head block


class AnswerPerplexity:
    """A frozen VLM that gives each row's mean NLL over its assistant-answer tokens (nats/token)."""

    def __init__(self, name_or_path: str | Path, *, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, max_length: int | None = 2048):  # fmt: skip
        from ..models.forward import accepted_arguments, logit_softcap
        from ..models.loading import backbone, load_vlm

        self.name = str(name_or_path)
        self.model, self.processor = load_vlm(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        self.backbone = backbone(self.model)
        self.head = self.model.get_output_embeddings()
        self.softcap = logit_softcap(self.model)
        self.device = next(self.model.parameters()).device
        self.dtype = next(self.model.parameters()).dtype
        self.max_length = max_length
        self.accepted = accepted_arguments(self.backbone.forward)

    def _inputs(self, batch) -> dict:
        out = {}
        for key, value in dict(batch).items():
            if key not in self.accepted or not hasattr(value, "to"):
                continue
            out[key] = value.to(self.device, dtype=self.dtype) if value.is_floating_point() else value.to(self.device)
        return out

    def answer_nll(self, rows: list[dict]) -> tuple[np.ndarray, list[SampleError]]:
        """``(nll [len(rows)] float64, errors)``; NaN where a row was left out (its error is listed)."""
        import torch

        from ..models.forward import answer_token_nll
        from ..models.inputs import build_batch

        nll = np.full(len(rows), np.nan)
        batch, info = build_batch(rows, self.processor, include_assistant=True, max_length=self.max_length, answer_mask=True)
        errors = list(info.errors)
        if batch is None:
            return nll, errors
        with torch.inference_mode():
            kw = self._inputs(batch)
            hidden = self.backbone(**kw, use_cache=False).last_hidden_state
            ids = kw["input_ids"]
            targets = info.answer_mask.to(hidden.device)[:, 1:]  # token t is predicted from position t - 1
            b_idx, t_idx = targets.nonzero(as_tuple=True)
            sums = torch.zeros(len(ids), dtype=torch.float64, device=hidden.device)
            for s in range(0, len(b_idx), HEAD_BLOCK):
                b, t = b_idx[s : s + HEAD_BLOCK], t_idx[s : s + HEAD_BLOCK]
                tok = answer_token_nll(hidden[b, t], self.head, ids[b, t + 1], self.softcap)
                sums.index_add_(0, b, tok.double())
            counts = targets.sum(1).cpu().numpy()
            sums = sums.cpu().numpy()
        for j, pos in enumerate(info.positions):
            if counts[j] == 0:
                row = rows[pos]
                errors.append(SampleError("no answer tokens", row.get("origin") or row["id"],
                                          "no assistant answer left to score (empty answer or truncated away)", row["id"]))  # fmt: skip
            else:
                nll[pos] = sums[j] / counts[j]
        return nll, errors


def check_pool_sources(catalog_dir: Path, wanted: set[str]) -> None:
    """The catalog has VLM rows, and every requested pool source is a VLM source of it."""
    kinds: dict[str, set[str]] = {}
    for path in catalog_files(catalog_dir):
        t = pq.read_table(path, columns=["source", "kind"]).group_by(["source", "kind"]).aggregate([])
        for src, kind in zip(t.column("source").to_pylist(), t.column("kind").to_pylist()):
            kinds.setdefault(src, set()).add(kind)
    vlm = sorted(s for s, k in kinds.items() if "vlm" in k)
    for src in sorted(wanted):
        if src not in vlm:
            raise StageError(f"pool_sources: {src!r} is not a VLM source of the catalog {catalog_dir}; VLM sources: {', '.join(vlm) or '(none)'}")
    if not vlm:
        raise StageError(f"{catalog_dir}: the catalog has no VLM (kind 'vlm') rows to score")


def _length_key(row: dict) -> int:
    return sum(len(m["content"]) for m in row.get("messages") or []) + 1000 * len(row.get("image_refs") or [])


def score_catalog_with_perplexity(st: StageRun, config, catalog_dir: Path, write_part: Callable) -> None:
    """Stream the catalog's pool rows through the perplexity model(s); one score part per catalog file."""
    import torch

    from ..devices import torch_threads

    vla = AnswerPerplexity(config.vla_model, device=config.device, dtype=config.dtype,
                           trust_remote_code=config.trust_remote_code, max_length=config.max_length)  # fmt: skip
    base = None
    if config.scorer == "delta_perplexity":
        base = AnswerPerplexity(config.base_model, device=config.device, dtype=config.dtype,
                                trust_remote_code=config.trust_remote_code, max_length=config.max_length)  # fmt: skip
    catalog_manifest = st.run_dir.manifest("catalog") or {}
    st.extra.update({"scorer": config.scorer, "order_column": "score", "catalog_fingerprint": catalog_manifest.get("fingerprint"),
                     "vla_model": str(config.vla_model), "base_model": str(config.base_model) if base else None,
                     "delta": config.delta if base else None,
                     "score_definition": ("-(log ppl_vla - log ppl_base)" if config.delta == "log" else "-(ppl_vla - ppl_base)")
                     if base else "-log ppl_vla"})  # fmt: skip
    wanted = set(config.pool_sources)
    check_pool_sources(catalog_dir, wanted)
    with torch_threads(config.num_threads), torch.inference_mode():
        for path in catalog_files(catalog_dir):
            name = f"{path.parent.name}-{path.stem}"
            if st.shard_done(name):
                continue
            st.current_shard = name
            cols: dict[str, list] = {"id": [], "source": [], "score": [], "nll_vla": []}
            if base:
                cols["nll_base"] = []
            read = 0
            for record_batch in pq.ParquetFile(path).iter_batches(batch_size=READ_ROWS, columns=CATALOG_COLUMNS):
                rows = [r for r in record_batch.to_pylist() if r["kind"] == "vlm" and (not wanted or r["source"] in wanted)]
                read += len(rows)
                rows.sort(key=_length_key)
                for s in range(0, len(rows), config.batch_size):
                    chunk = rows[s : s + config.batch_size]
                    with st.timed("perplexity"):
                        nll_v, errors = vla.answer_nll(chunk)
                        if base:
                            nll_b, errors_b = base.answer_nll(chunk)
                            failed = {e.sample_id for e in errors}
                            errors += [e for e in errors_b if e.sample_id not in failed]
                    for err in errors:
                        st.handle(err)
                    ok = np.isfinite(nll_v) & (np.isfinite(nll_b) if base else True)
                    for j in np.flatnonzero(ok):
                        cols["id"].append(chunk[j]["id"])
                        cols["source"].append(chunk[j]["source"])
                        cols["nll_vla"].append(float(nll_v[j]))
                        if base:
                            cols["nll_base"].append(float(nll_b[j]))
                            d = nll_v[j] - nll_b[j] if config.delta == "log" else math.exp(nll_v[j]) - math.exp(nll_b[j])
                            cols["score"].append(float(-d))
                        else:
                            cols["score"].append(float(-nll_v[j]))
            table = pa.table({k: pa.array(v, type=pa.string() if k in ("id", "source") else pa.float64()) for k, v in cols.items()})
            write_part(st, name, table, read=read)
    st.current_shard = None
