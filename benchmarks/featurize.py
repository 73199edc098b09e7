"""Featurize throughput: the loop a researcher would write vs midtrain's featurizer, same inputs.

(a) naive: one sample at a time, decode, chat template, processor, ``model(**inputs,
    output_hidden_states=True)`` (full model: LM head logits and every layer's hidden states),
    mean of the last hidden state;
(b) midtrain: :class:`~midtrain.featurize.featurizer.BatchPreparer` in a DataLoader worker
    (length-bucketed batches, images decoded and processed off the model's thread) feeding
    :class:`~midtrain.featurize.featurizer.FeatureExtractor` (backbone only, batched, pooled) -
    the code the ``featurize`` stage runs.

Both run in this process on the same rows (VLM conversations with 160-400 px JPEG images, VLA
frames at 224 px) and the same randomly initialised real architecture (default: Qwen2-VL,
``bench`` preset: hidden 384, 6 + 6 layers, 224 px, and Qwen2-VL's released vocabulary of 151,936
tokens with the output head tied to the embedding, as in Qwen2-VL-2B: 77.8 M parameters). The
check: per-sample relative error ``|f_midtrain - f_naive| / |f_naive|`` (L2), max over samples,
< 1e-4 in float32.

Where the speed-up comes from: the backbone alone does fewer FLOPs than the full model (no LM head
over every position; printed as ``flop_ratio``), batches keep matmuls large (which matters on GPUs
and on CPUs shared with other jobs, where batch-1's many small parallel ops stall), and
preparation overlaps the model. On an idle CPU both loops run matmuls near the same FLOP/s, so
the speed-up there follows ``flop_ratio``. The LM head's share depends on the vocabulary: a
scaled-down model keeps the architecture's real one (``--vocab``, default the released size), since
that head is what a researcher's ``model(**inputs)`` pays for on every token whatever the width.
``--vocab 32000`` rebuilds the earlier 31.8 M-parameter model (``flop_ratio`` about 1.5).

``--compile``: midtrain's extractor as with ``compile: true`` (decoder layers and vision MLPs
through inductor, on a copy of the model so the naive loop stays eager). The compile runs in the
warm-up, in a fresh inductor cache, and is reported as ``compile_s`` (once per process), not in
the timed loops; recompiles inside them would be timed. The JSON line also gives each loop's
matmul rate (``*_gflops``) and ``other_cpu_cores``: how many cores other processes kept busy
while the loops ran (this machine is shared; runs with more than ~0.05 are noise).

GPU path (``--device cuda --arch-size 1b``): a ~1 B-parameter model built from config directly on
the GPU in bfloat16; reports tokens/s and MFU = 2 x params x tokens / time / (measured bf16 matmul
FLOP/s). Without a CUDA device this path prints that it was not run and reports ``"mfu": null``.

    python benchmarks/featurize.py            # CPU, default sizes (< 3 min on 2 cores)
    python benchmarks/featurize.py --quick    # fewer samples
    python benchmarks/featurize.py --vocab 32000   # the earlier 32k-vocabulary bench model
    python benchmarks/featurize.py --compile       # featurize with compile: true
    python benchmarks/featurize.py --device cuda --arch-size 1b

Ends with one JSON line: {"bench": "featurize", "ratio": ..., "max_rel_err": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = ["What is on the table?", "Describe the image in detail.", "How many objects are in the scene?",
             "Where is the red block relative to the bowl? Answer with a short phrase.", "What color is the cup?"]  # fmt: skip
ANSWERS = ["A red block, a blue cup and a white bowl on a wooden table.", "The cup is blue.",
           "The image shows a kitchen counter with a sink on the left, a cutting board in the middle and "
           "a bowl of apples next to a window.", "There are three objects.", "To the left of the bowl."]  # fmt: skip
INSTRUCTIONS = ["pick up the red block and place it in the bowl", "open the top drawer", "push the green button"]


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Catalog rows: 2/3 VLM conversations (160-400 px JPEGs), 1/3 VLA frames (224 px JPEGs)."""
    from midtrain.data.images import encode_image, ref_from_bytes

    rng = np.random.default_rng(seed)

    def jpeg(h: int, w: int) -> dict:
        # smooth random images (like photos, unlike white noise) so JPEG sizes are realistic
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = np.kron(small, np.ones((16, 16, 1), dtype=np.uint8))[:h, :w]
        return ref_from_bytes(encode_image(img, "JPEG", quality=90))

    rows = []
    for i in range(n):
        if i % 3 == 2:
            rows.append({"id": f"robot/{i}", "source": "robot", "kind": "vla", "image_refs": [jpeg(224, 224)],
                         "instruction": INSTRUCTIONS[i % len(INSTRUCTIONS)], "origin": f"frame {i}"})  # fmt: skip
            continue
        turns = [{"role": "user", "content": "<image>\n" + QUESTIONS[i % len(QUESTIONS)]},
                 {"role": "assistant", "content": ANSWERS[(i * 7) % len(ANSWERS)]}]  # fmt: skip
        if i % 4 == 1:
            turns += [{"role": "user", "content": QUESTIONS[(i + 2) % len(QUESTIONS)]},
                      {"role": "assistant", "content": ANSWERS[(i + 3) % len(ANSWERS)]}]  # fmt: skip
        h, w = int(rng.integers(160, 400)), int(rng.integers(160, 400))
        rows.append({"id": f"vqa/{i}", "source": "vqa", "kind": "vlm", "image_refs": [jpeg(h, w)],
                     "messages": turns, "origin": f"vqa.json:{i}"})  # fmt: skip
    return rows


def naive_features(model, processor, rows: list[dict], counts: dict | None = None) -> tuple[np.ndarray, int, float]:
    """The researcher's loop: batch 1, full model with output_hidden_states=True, mean of the last layer."""
    import torch

    from midtrain.data.images import load_image
    from midtrain.models.inputs import conversation_of

    feats, tokens = [], 0
    device = next(model.parameters()).device
    t0 = time.perf_counter()
    with torch.inference_mode():
        for row in rows:
            images = [load_image(ref) for ref in row["image_refs"]]
            messages, _ = conversation_of(row)
            text = processor.apply_chat_template(messages, tokenize=False)
            inputs = processor(text=[text], images=[images], return_tensors="pt").to(device)
            out = model(**inputs, output_hidden_states=True)
            feats.append(out.hidden_states[-1][0].float().mean(0).cpu().numpy())
            tokens += int(inputs["input_ids"].shape[1])
            if counts is not None and "image_grid_thw" in inputs:
                counts["patches"] = counts.get("patches", 0) + int(inputs["image_grid_thw"].prod(-1).sum())
    if device.type == "cuda":
        torch.cuda.synchronize()
    return np.stack(feats), tokens, time.perf_counter() - t0


def midtrain_features(extractor, processor, rows: list[dict], args) -> tuple[np.ndarray, int, float]:
    """midtrain's pipeline (DataLoader worker + bucketed batches + backbone-only ``extractor``)."""
    import pyarrow as pa
    import torch

    from midtrain.data.catalog import rows_to_table
    from midtrain.featurize.featurizer import BatchPreparer, PreparedBatch
    from midtrain.featurize.local import iter_features

    class InMemoryShards(torch.utils.data.IterableDataset):
        """The stage's ShardStream, over rows already in memory instead of catalog row groups."""

        def __init__(self, table: pa.Table, shard_size: int, preparer: BatchPreparer):
            self.table, self.shard_size, self.preparer = table, shard_size, preparer

        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            worker, workers = (info.id, info.num_workers) if info else (0, 1)
            for k, start in enumerate(range(0, self.table.num_rows, self.shard_size)):
                if k % workers == worker:
                    yield from self.preparer.prepare_shard(k, self.table.slice(start, self.shard_size))

    table = rows_to_table(rows)
    preparer = BatchPreparer(processor, batch_size=args.batch_size, max_tokens_per_batch=args.max_tokens_per_batch)
    out = np.zeros((len(rows), extractor.dim), dtype=np.float32)
    tokens = 0
    args.vision_patches = 0
    t0 = time.perf_counter()
    stream = InMemoryShards(table, args.shard_size, preparer)
    for item, feats, _ in iter_features(stream, extractor, args.num_workers, prefetch_factor=4):
        if isinstance(item, PreparedBatch) and feats is not None:
            out[item.shard * args.shard_size + item.positions] = feats
            tokens += int(item.lengths.sum())
            if "image_grid_thw" in item.inputs:  # Qwen-VL: the vision tower runs once per patch
                args.vision_patches += int(item.inputs["image_grid_thw"].prod(-1).sum())
    if extractor.device.type == "cuda":
        torch.cuda.synchronize()
    return out, tokens, time.perf_counter() - t0


class OtherCpu:
    """Cores kept busy by *other* processes over an interval (Linux): all CPU time the kernel counts
    as busy (``/proc/stat``) minus this process's and its reaped children's (the DataLoader
    workers), divided by the wall time. The 1-minute load average lags and counts this benchmark
    itself; this says how much of the 2 cores someone else took while the loops ran."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float, float] | None:
        import resource

        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
        ours = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                   for f in ("ru_utime", "ru_stime"))  # fmt: skip
        return busy, ours, time.perf_counter()

    def cores(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        (busy0, ours0, t0), (busy1, ours1, t1) = self.start, end
        return max(0.0, (busy1 - busy0) - (ours1 - ours0)) / max(t1 - t0, 1e-9)


def bf16_matmul_flops(device: str, n: int = 8192, iters: int = 20) -> float:
    """Measured dense bf16 matmul FLOP/s on ``device`` (the MFU denominator)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def build_model(args):
    """``(model, processor, parameters)``: CPU float32 models are saved and reloaded through
    ``load_vlm`` (the real loading path); the GPU 1b model is built in place in bfloat16."""
    import torch

    from midtrain.models import load_vlm
    from midtrain.models.tiny import build_tiny_vlm, tiny_vlm_parts

    if args.device == "cuda":
        model_cls, config, processor = tiny_vlm_parts(args.arch, args.arch_size, args.vocab)
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = model_cls(config).to(torch.bfloat16).eval().requires_grad_(False)
    else:
        out = Path(tempfile.mkdtemp(prefix="midtrain-bench-")) / args.arch
        path = build_tiny_vlm(args.arch, out, size=args.arch_size, vocab_size=args.vocab)
        model, processor = load_vlm(path, dtype="float32", device="cpu")
    return model, processor, sum(p.numel() for p in model.parameters())


def make_extractor(model, args):
    """midtrain's extractor; with ``--compile`` over a copy of the model, so that the naive loop
    keeps running the eager model it was given."""
    import copy

    from midtrain.featurize.featurizer import FeatureExtractor

    if not args.compile:
        return FeatureExtractor(model, "mean")
    return FeatureExtractor(copy.deepcopy(model), "mean", compile=True)


def forward_flops(model, lm_tokens: int, vision_patches: int) -> float:
    """2 x parameters x tokens each part of the backbone runs on: the language model (all parameters
    but the vision tower and the embedding table, a lookup) per LM token, the vision tower per patch
    (Qwen-VL; other architectures: per LM token, an underestimate). Attention scores are left out."""
    from midtrain.featurize.featurizer import vision_tower

    vision = vision_tower(model)
    vision_params = sum(p.numel() for p in vision.parameters()) if vision is not None else 0
    total = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    lm_params = total - vision_params
    return 2.0 * (lm_params * lm_tokens + vision_params * (vision_patches or lm_tokens))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples (smoke run)")
    parser.add_argument("--samples", type=int, default=None)
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--arch-size", default="bench", choices=["test", "bench", "1b"])
    parser.add_argument("--vocab", type=int, default=None,
                        help="vocabulary size (embedding and tied output head); default: the preset's, which for "
                             "'bench' is the architecture's released vocabulary (Qwen2-VL: 151936)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="featurize with compile: true (torch.compile of the decoder layers and vision MLPs; "
                             "compiled in the warm-up, in a fresh inductor cache, time reported as compile_s)")  # fmt: skip
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=None, help="default: 16 on CPU, 64 on GPU")
    parser.add_argument("--max-tokens-per-batch", type=int, default=None, help="default: 8192 on CPU, 32768 on GPU")
    parser.add_argument("--shard-size", type=int, default=None, help="default: a round's samples on CPU, 512 on GPU")
    parser.add_argument("--num-workers", type=int, default=None, help="default: the featurize stage's default")
    parser.add_argument("--rounds", type=int, default=2, help="naive and midtrain alternate over this many chunks")
    args = parser.parse_args(argv)
    if args.compile:  # a cold compile, as a new machine or a new torch would see it
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="midtrain-bench-inductor-"))

    import torch

    from midtrain.featurize.stage import default_num_workers

    gpu = args.device == "cuda"
    args.batch_size = args.batch_size or (64 if gpu else 16)
    args.max_tokens_per_batch = args.max_tokens_per_batch or (32768 if gpu else 8192)
    args.num_workers = default_num_workers(args.device) if args.num_workers is None else args.num_workers

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: the GPU / MFU path (--device cuda) was NOT run.")
        print(json.dumps({"bench": "featurize", "device": "cuda", "ran": False, "ratio": None, "max_rel_err": None,
                          "mfu": None, "note": "no CUDA device; nothing measured"}))  # fmt: skip
        return 0
    n = args.samples or (32 if args.quick else 96)
    if args.device == "cuda":
        n = args.samples or (64 if args.quick else 512)
    rows = make_rows(n)
    args.shard_size = args.shard_size or (512 if gpu else -(-n // args.rounds))
    model, processor, params = build_model(args)
    vocab = int(model.config.get_text_config().vocab_size)
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    print(f"model: {type(model).__name__} ({args.arch}, {args.arch_size}), {params / 1e6:.1f} M parameters, "
          f"vocabulary {vocab} ({'tied' if tied else 'untied'} output head), "
          f"{next(model.parameters()).dtype}, {args.device}, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"inputs: {n} samples ({sum(r['kind'] == 'vlm' for r in rows)} VLM conversations, "
          f"{sum(r['kind'] == 'vla' for r in rows)} VLA frames)")  # fmt: skip

    # Interleave the two in rounds so that both see the same machine load (shared CI machines).
    extractor = make_extractor(model, args)
    t0 = time.perf_counter()
    # warm-up (allocator, kernels; with --compile, the compile): a padded batch, and a batch without
    # padding (one sample twice: the decoder layers then get no attention mask, which torch.compile
    # compiles separately; not one sample alone, which it would specialise to batch size 1)
    for warm in (rows[: min(8, n)], rows[:1] * 2):
        midtrain_features(extractor, processor, warm, args)
    warmup_s, warmup_compile_s = time.perf_counter() - t0, extractor.compile_s
    other_cpu = OtherCpu()
    naive_parts, ours_parts = [], []
    naive_tokens = ours_tokens = patches = 0
    naive_counts: dict = {}
    naive_s = ours_s = 0.0
    chunks = np.array_split(np.arange(n), args.rounds)
    for chunk in chunks:
        part = [rows[i] for i in chunk]
        naive_part = part if not gpu else part[: max(4, len(part) // 8)]  # batch 1 on a GPU is slow; a sample suffices
        feats, tokens, secs = naive_features(model, processor, naive_part, naive_counts)
        naive_parts.append(feats)
        naive_tokens, naive_s = naive_tokens + tokens, naive_s + secs
        feats, tokens, secs = midtrain_features(extractor, processor, part, args)
        ours_parts.append(feats[: len(naive_part)])
        ours_tokens, ours_s = ours_tokens + tokens, ours_s + secs
        patches += args.vision_patches
    naive, ours = np.concatenate(naive_parts), np.concatenate(ours_parts)
    naive_n = len(naive)
    ref, got = naive, ours
    rel = np.linalg.norm(got - ref, axis=1) / np.maximum(np.linalg.norm(ref, axis=1), 1e-12)
    max_rel_err = float(rel.max())
    naive_sps, ours_sps = naive_n / naive_s, n / ours_s
    naive_tps, ours_tps = naive_tokens / naive_s, ours_tokens / ours_s
    ratio = ours_sps / naive_sps
    print(f"naive loop : {naive_sps:8.2f} samples/s  {naive_tps:10.0f} tokens/s  ({naive_n} samples in {naive_s:.1f} s)")
    print(f"midtrain   : {ours_sps:8.2f} samples/s  {ours_tps:10.0f} tokens/s  ({n} samples in {ours_s:.1f} s)")
    print(f"ratio      : {ratio:.2f}x samples/s (midtrain / naive)")
    compile_s = extractor.compile_s if args.compile else None
    if args.compile:
        print(f"compile    : {compile_s:.1f} s once per process: {warmup_compile_s:.1f} s in the warm-up (not timed), "
              f"{compile_s - warmup_compile_s:.1f} s of recompiles for new shapes within the midtrain time above; "
              f"with all of it, midtrain would be {n / (ours_s + warmup_compile_s):.2f} samples/s on these {n} samples")  # fmt: skip
    # The work each does per sample: the naive loop also runs the LM head over every position.
    lm_head = model.get_output_embeddings().weight.numel()
    naive_flops = forward_flops(model, naive_tokens, naive_counts.get("patches", 0)) + 2.0 * lm_head * naive_tokens
    ours_flops = forward_flops(model, ours_tokens, patches)
    flop_ratio = (naive_flops / naive_n) / (ours_flops / n)
    naive_gflops, ours_gflops = naive_flops / naive_s / 1e9, ours_flops / ours_s / 1e9
    print(f"work ratio : {flop_ratio:.2f}x matmul FLOPs per sample (naive / midtrain): the ceiling of the speed-up "
          "where both run at the same FLOP/s (a compute-bound CPU); batching wins beyond it where batch 1 "
          "underuses the hardware (GPUs, CPUs shared with other jobs)")  # fmt: skip
    print(f"matmul rate: naive {naive_gflops:.1f} GFLOP/s, midtrain {ours_gflops:.1f} GFLOP/s (the FLOPs above / time)")
    tol = 1e-4 if next(model.parameters()).dtype == torch.float32 else 2e-2
    print(f"max relative error (per-sample L2): {max_rel_err:.2e} ({'ok' if max_rel_err < tol else 'FAIL'}, tolerance {tol:g})")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    others = other_cpu.cores()
    if others is not None:
        print(f"other processes kept {others:.2f} of {os.cpu_count()} cores busy during the timed loops")
    print(f"machine load (1-min average) at the end: {load:.1f} on {os.cpu_count()} cores" if load is not None else "")
    figures = {"bench": "featurize", "device": args.device, "loadavg_1m": load and round(load, 1),
               "other_cpu_cores": None if others is None else round(others, 2), "arch": args.arch, "arch_size": args.arch_size,
               "vocab_size": vocab, "tied_lm_head": tied, "params_m": round(params / 1e6, 1), "samples": n, "rounds": args.rounds, "naive_samples_per_s": round(naive_sps, 2),
               "midtrain_samples_per_s": round(ours_sps, 2), "naive_tokens_per_s": round(naive_tps, 1),
               "midtrain_tokens_per_s": round(ours_tps, 1), "ratio": round(ratio, 2), "flop_ratio": round(flop_ratio, 2),
               "naive_gflops": round(naive_gflops, 1), "midtrain_gflops": round(ours_gflops, 1), "max_rel_err": max_rel_err,
               "compile": args.compile, "compile_s": None if compile_s is None else round(compile_s, 1)}  # fmt: skip
    if args.device == "cuda":
        peak = bf16_matmul_flops("cuda")
        flops = forward_flops(model, ours_tokens, patches)
        mfu = flops / ours_s / peak
        print(f"MFU        : {100 * mfu:.1f}% of measured bf16 matmul {peak / 1e12:.0f} TFLOP/s "
              f"({flops / ours_s / 1e12:.1f} TFLOP/s: 2 x params x tokens, vision tower per patch)")  # fmt: skip
        figures.update({"mfu": round(mfu, 4), "bf16_matmul_tflops": round(peak / 1e12, 1)})
    else:
        print("GPU / MFU path not run here (CPU benchmark; run with --device cuda --arch-size 1b on a GPU)")
        figures["mfu"] = None
    ok = max_rel_err < tol
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
