"""SFT throughput: ``midtrain sft`` vs ``transformers.Trainer`` on the same model, data and samples.

(a) baseline: ``transformers.Trainer`` as a user would set it up for a VLM - the model's own
    forward with ``labels`` (logits over the whole vocabulary at every position), random batches
    (no length grouping), a collator that runs the processor and pads to the longest sample;
(b) midtrain: the ``sft`` stage (``mode: full``, vision tower and projector training, so the same
    parameters train), its training loop with length-grouped batches and the loss computed from
    the hidden states of answer tokens only.

Both train a fresh copy of the same randomly initialised real architecture (default: Qwen2-VL at
``bench`` size, the released 151,936-token vocabulary with a tied head, 77.8 M parameters) for the
same number of optimizer steps on the same samples (LLaVA-like conversations of 1-3 turns, answers
of 2-60 words, one 224 px image each), with the same labels (answer tokens of every assistant
turn), AdamW, learning rate, warmup + cosine, clipping and batch size, in one process, and they
alternate in rounds so both see the same machine load. Reported: non-padding tokens per second
of training (model load, data preparation and checkpoints excluded; midtrain's one-off length
measurement is reported separately and in ``ratio_with_prepare``), the ratio, and the final
training loss of each (mean over the last quarter of steps, averaged over rounds) with its
standard error. The equality check: on one batch of the initial model, midtrain's loss equals
the model's own ``labels`` loss (relative error < 1e-5 in fp32).

Where the speed-up comes from: the vocabulary projection and cross-entropy run on answer tokens
only (on every position in the baseline; with a 150k vocabulary that head dominates a small
model), and length grouping removes most padding. ``--ablation`` adds a midtrain run without
length grouping to separate the two.

``--device cuda --arch-size 1b`` (bf16 autocast) also reports MFU: model FLOPs ``6 x parameters x
tokens`` (language model per token, vision tower per patch, LM head per answer token) over a bf16
matmul rate measured in the same run. That path is coded but was not run here (no GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from featurize import OtherCpu, bf16_matmul_flops  # noqa: E402  (a sibling benchmark's measuring tools)

WORDS = ("the robot arm moves the red block to the left of the bowl while the gripper stays open and the camera "
         "shows a kitchen table with a blue cup a drawer a sponge and two plates near the sink").split()  # fmt: skip
QUESTIONS = ["Where is the red block?", "What is on the table?", "Describe the scene.", "What should the robot do next?",
             "How many objects are there?", "Is the drawer open?"]  # fmt: skip


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """LLaVA-like conversations of varied length with one 224 px image each."""
    from midtrain.data.images import encode_image, ref_from_bytes

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = rng.integers(0, 255, (224, 224, 3), dtype=np.uint8)
        messages = []
        for t in range(int(rng.integers(1, 4))):
            q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
            messages.append({"role": "user", "content": ("<image>\n" if t == 0 else "") + q})
            answer = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 61))))
            messages.append({"role": "assistant", "content": answer.capitalize() + "."})
        rows.append({"id": f"bench/{i}", "source": "bench", "kind": "vlm",
                     "image_refs": [ref_from_bytes(encode_image(image, "JPEG"))], "messages": messages,
                     "origin": f"bench.json:{i + 1}"})  # fmt: skip
    return rows


def build_model(args) -> Path:
    from midtrain.models.tiny import build_tiny_vlm

    out = Path(tempfile.mkdtemp(prefix="midtrain-bench-sft-")) / args.arch
    return build_tiny_vlm(args.arch, out, size=args.arch_size, vocab_size=args.vocab)


def train_settings(args) -> dict:
    return {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": max(1, args.steps // 10),
            "schedule": "cosine", "max_grad_norm": 1.0, "weight_decay": 0.0, "eval_every": 0, "save_every": 0,
            "log_every": 1, "num_workers": 0, "seed": 0}  # fmt: skip


def run_midtrain(model_dir: Path, mixture: Path, args, round_: int, group_by_length: bool = True) -> dict:
    """The sft stage in a fresh run directory; timings from its metrics (the loop only)."""
    from midtrain.runs import RunDir
    from midtrain.sft.config import SFTConfig
    from midtrain.sft.stage import run_sft
    from midtrain.train import read_metrics

    run = RunDir(Path(tempfile.mkdtemp(prefix="midtrain-bench-run-")))
    config = SFTConfig(model=str(model_dir), mixture_file=mixture, mode="full", vision="full", train_projector=True,
                       val_fraction=0.0, max_length=4096, device=args.device, num_threads=args.threads,
                       save_dtype="float32", train={**train_settings(args), "group_by_length": group_by_length,
                                                    "precision": "bf16" if args.device == "cuda" else "fp32"})  # fmt: skip
    out = run_sft(config, run)
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    manifest = json.loads((out / "manifest.json").read_text())
    import pyarrow.parquet as pq

    answer = int(pq.read_table(out / "data" / "samples.parquet", columns=["answer_tokens"]).column(0).to_numpy().sum())
    return {"seconds": rows[-1]["elapsed_s"], "tokens": rows[-1]["tokens"], "losses": [r["loss"] for r in rows],
            "prepare_s": manifest["timings"].get("prepare_data", 0.0), "answer_tokens": answer}


class CountingCollator:
    """The baseline's collator: the processor on the batch (pad to longest, right), the same answer
    labels as midtrain's, and a count of non-padding tokens."""

    def __init__(self, processor):
        self.processor, self.tokens = processor, 0

    def __call__(self, rows: list[dict]) -> dict:
        from midtrain.sft.data import collate_sft

        batch = collate_sft(rows, self.processor, 4096, "truncate")
        self.tokens += batch["num_tokens"]
        return {k: v for k, v in batch.items() if hasattr(v, "shape")}


def run_trainer(model_dir: Path, rows: list[dict], args) -> dict:
    import torch
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    from midtrain.models import load_vlm

    torch.manual_seed(0)
    model, processor = load_vlm(model_dir, dtype="float32", device=args.device)
    model.train().requires_grad_(True)
    collator = CountingCollator(processor)
    s = train_settings(args)
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, _args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="midtrain-bench-trainer-"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="cosine",
        warmup_steps=s["warmup_steps"], weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, save_strategy="no",
        report_to=[], dataloader_num_workers=0, remove_unused_columns=False, use_cpu=args.device == "cpu",
        bf16=args.device == "cuda", disable_tqdm=True, seed=0, train_sampling_strategy="random",
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=collator, callbacks=[Losses()])
    trainer.remove_callback(PrinterCallback)  # the per-step log dicts; the losses are collected above
    out = trainer.train()
    return {"seconds": out.metrics["train_runtime"], "tokens": collator.tokens, "losses": losses}


def loss_check(model_dir: Path, rows: list[dict], device: str) -> float:
    """Relative difference of midtrain's answer-token loss and the model's own labels loss, one batch."""
    import torch

    from midtrain.models import load_vlm
    from midtrain.sft.data import collate_sft
    from midtrain.sft.model import SFTModel

    model, processor = load_vlm(model_dir, dtype="float32", device=device)
    batch = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in collate_sft(rows[:4], processor, 4096, "truncate").items()}
    with torch.no_grad():
        ours, _ = SFTModel(model)(batch)
        ref = model(**{k: v for k, v in batch.items() if hasattr(v, "shape")}, use_cache=False).loss
    return abs(float(ours) - float(ref)) / abs(float(ref))


def final_loss(losses: list[float]) -> tuple[float, float]:
    tail = np.asarray(losses[-max(2, len(losses) // 4):])
    return float(tail.mean()), float(tail.std(ddof=1) / np.sqrt(len(tail)))


def model_flops(model_dir: Path, tokens: int, answer_tokens: int, patches: int) -> float:
    """Training FLOPs (forward + backward, ``6 x parameters x inputs``): the language model's layers
    per token, the vision tower per patch, the (tied) vocabulary projection per answer token."""
    from safetensors import safe_open

    total = vision = embed = 0
    with safe_open(model_dir / "model.safetensors", "pt") as f:
        for k in f.keys():
            n = int(np.prod(f.get_slice(k).get_shape()))
            total += n
            vision += n if ".visual." in k or "vision" in k else 0
            embed += n if "embed_tokens" in k else 0
    return 6.0 * ((total - vision - embed) * tokens + vision * patches + embed * answer_tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test-size model, few steps (smoke run)")
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--arch-size", default=None, choices=["test", "bench", "1b"], help="default: bench (CPU), 1b (GPU)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the architecture's released one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 16; 8 with --quick)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 4 on CPU, 16 on GPU")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rounds", type=int, default=2, help="baseline and midtrain alternate this many times")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--ablation", action="store_true", help="also run midtrain without length grouping")
    args = parser.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available on this machine: the GPU / MFU path (--device cuda) was NOT run.")
        print(json.dumps({"bench": "sft", "device": "cuda", "ran": False, "ratio": None, "mfu": None}))
        return 0
    gpu = args.device == "cuda"
    args.arch_size = args.arch_size or ("test" if args.quick else ("1b" if gpu else "bench"))
    args.steps = args.steps or (8 if args.quick else 16)
    args.batch_size = args.batch_size or (16 if gpu else 4)
    if args.threads:
        torch.set_num_threads(args.threads)
    samples = args.steps * args.batch_size
    rows = make_rows(samples)
    model_dir = build_model(args)
    info = json.loads((model_dir / "midtrain_tiny.json").read_text())
    print(f"model: {args.arch} ({args.arch_size}), {info['parameters'] / 1e6:.1f} M parameters, vocabulary {info['vocab_size']}, "
          f"{args.device}, torch threads {torch.get_num_threads()}; {samples} samples = {args.steps} steps x {args.batch_size}")  # fmt: skip
    from midtrain.data.catalog import rows_to_table
    from midtrain.runs import write_parquet_atomic

    mixture = Path(tempfile.mkdtemp(prefix="midtrain-bench-data-")) / "mixture.parquet"
    write_parquet_atomic(mixture, rows_to_table(rows))
    rel_err = loss_check(model_dir, rows, args.device)

    other_cpu = OtherCpu()
    base_runs, ours_runs, plain_runs = [], [], []
    for r in range(args.rounds):
        base_runs.append(run_trainer(model_dir, rows, args))
        ours_runs.append(run_midtrain(model_dir, mixture, args, r))
        if args.ablation:
            plain_runs.append(run_midtrain(model_dir, mixture, args, r, group_by_length=False))
        print(f"round {r + 1}: trainer {base_runs[-1]['tokens'] / base_runs[-1]['seconds']:.0f} tokens/s, "
              f"midtrain {ours_runs[-1]['tokens'] / ours_runs[-1]['seconds']:.0f} tokens/s")  # fmt: skip
    others = other_cpu.cores()

    def rate(runs):
        return sum(x["tokens"] for x in runs) / sum(x["seconds"] for x in runs)

    base_tps, ours_tps = rate(base_runs), rate(ours_runs)
    prepare_s = float(np.mean([x["prepare_s"] for x in ours_runs]))
    ours_with_prepare = sum(x["tokens"] for x in ours_runs) / sum(x["seconds"] + x["prepare_s"] for x in ours_runs)
    ratio = ours_tps / base_tps
    bl, bse = np.mean([final_loss(x["losses"])[0] for x in base_runs]), np.mean([final_loss(x["losses"])[1] for x in base_runs])
    ol, ose = np.mean([final_loss(x["losses"])[0] for x in ours_runs]), np.mean([final_loss(x["losses"])[1] for x in ours_runs])
    agree = abs(bl - ol) <= 3 * np.hypot(bse, ose) + 1e-3
    print(f"transformers.Trainer : {base_tps:9.1f} non-padding tokens/s, final train loss {bl:.4f} +- {bse:.4f}")
    print(f"midtrain sft         : {ours_tps:9.1f} non-padding tokens/s, final train loss {ol:.4f} +- {ose:.4f}")
    print(f"ratio                : {ratio:.2f}x (goal >= 1.3x); with midtrain's length measurement ({prepare_s:.1f} s per run) "
          f"{ours_with_prepare / base_tps:.2f}x")  # fmt: skip
    print(f"final losses agree within 3 standard errors: {agree} (difference {ol - bl:+.4f})")
    print(f"loss equality check (one batch, initial model): relative error {rel_err:.1e} ({'ok' if rel_err < 1e-5 else 'FAIL'})")
    figures = {"bench": "sft", "device": args.device, "arch": args.arch, "arch_size": args.arch_size,
               "params_m": round(info["parameters"] / 1e6, 1), "vocab_size": info["vocab_size"], "steps": args.steps,
               "batch_size": args.batch_size, "rounds": args.rounds, "trainer_tokens_per_s": round(base_tps, 1),
               "midtrain_tokens_per_s": round(ours_tps, 1), "ratio": round(ratio, 2),
               "ratio_with_prepare": round(ours_with_prepare / base_tps, 2), "trainer_final_loss": round(bl, 4),
               "midtrain_final_loss": round(ol, 4), "loss_se": round(float(np.hypot(bse, ose)), 4), "losses_agree": bool(agree),
               "loss_rel_err": rel_err, "other_cpu_cores": None if others is None else round(others, 2),
               "loadavg_1m": round(os.getloadavg()[0], 1)}  # fmt: skip
    if args.ablation:
        plain_tps = rate(plain_runs)
        print(f"midtrain without length grouping: {plain_tps:.1f} tokens/s ({plain_tps / base_tps:.2f}x the baseline)")
        figures["midtrain_ungrouped_tokens_per_s"] = round(plain_tps, 1)
    if gpu:
        peak = bf16_matmul_flops("cuda")
        from midtrain.models import load_processor
        from midtrain.sft.data import collate_sft

        processor = load_processor(str(model_dir))
        patches = sum(int(collate_sft(rows[i : i + 16], processor, 4096, "truncate")["pixel_values"].shape[0])
                      for i in range(0, len(rows), 16))  # vision-tower inputs (Qwen-VL: patches)  # fmt: skip
        flops = model_flops(model_dir, sum(x["tokens"] for x in ours_runs) // args.rounds, ours_runs[0]["answer_tokens"], patches)
        mfu = flops / (sum(x["seconds"] for x in ours_runs) / args.rounds) / peak
        print(f"MFU: {100 * mfu:.1f}% of a measured {peak / 1e12:.0f} TFLOP/s bf16 matmul")
        figures.update({"mfu": round(mfu, 4), "bf16_matmul_tflops": round(peak / 1e12, 1)})
    else:
        figures["mfu"] = None
    print(json.dumps(figures))
    return 0 if rel_err < 1e-5 else 1


if __name__ == "__main__":
    sys.exit(main())
