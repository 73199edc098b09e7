"""FSDP vs DDP: step time and per-process weight + optimizer bytes of ``midtrain sft`` in 2 processes.

Both runs train a fresh copy of the same randomly initialised Qwen2-VL (default: ``bench`` size with
a 32,000-token vocabulary, full fine-tuning of the language model, vision tower and projector) on
the same samples (``benchmarks/sft.py``'s LLaVA-like conversations), with the same global batch,
as 2 processes under ``accelerate launch --multi_gpu`` (gloo on CPU, NCCL on GPUs): once as DDP
replicas, once with ``train.fsdp=true``. Reported: seconds per optimizer step of the training loop
(from ``metrics.jsonl``, the first step excluded: it includes lazy initialisation; the mean over
rounds that alternate DDP and FSDP, so both see the same machine load), the ratio FSDP / DDP, and ``train.state_bytes_per_process`` of each manifest (bytes of the local weights and AdamW
states of one process) with their ratios. The equality check: the two loss curves agree (relative
difference < 1e-4: the same steps up to the order of float additions).

On CPU the step time measures the cost of FSDP's all-gathers and reduce-scatters over gloo on one
machine; the memory ratio is what FSDP is for and does not depend on the device.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft import build_model, make_rows  # noqa: E402  (the sft benchmark's model and samples)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two(model_dir: Path, mixture: Path, args, fsdp: bool) -> dict:
    """``midtrain sft`` as 2 processes in a fresh run directory; step times from its metrics."""
    run = Path(tempfile.mkdtemp(prefix="midtrain-bench-fsdp-"))
    train = {"steps": args.steps, "batch_size": args.batch_size, "lr": 1e-4, "warmup_steps": 1, "eval_every": 0,
             "save_every": 0, "log_every": 1, "num_workers": 0, "fsdp": str(fsdp).lower(),
             "precision": "bf16" if args.device == "cuda" else "fp32"}  # fmt: skip
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
           "-m", "midtrain.cli", "sft", "--run-dir", str(run), f"model={model_dir}", f"mixture_file={mixture}",
           "mode=full", "vision=full", "val_fraction=0", "max_length=4096", f"device={args.device}",
           *(f"train.{k}={v}" for k, v in train.items())]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MIDTRAIN_PROGRESS": "off", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    rows = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    manifest = json.loads((run / "sft" / "manifest.json").read_text())["train"]
    step_s = (rows[-1]["elapsed_s"] - rows[0]["elapsed_s"]) / (len(rows) - 1)
    return {"step_s": step_s, "losses": [r["loss"] for r in rows], "bytes": manifest["state_bytes_per_process"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the test-size model (smoke run)")
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--arch-size", default=None, choices=["test", "bench", "1b"], help="default: bench (test with --quick)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    parser.add_argument("--rounds", type=int, default=2, help="DDP and FSDP alternate this many times (same machine load)")
    args = parser.parse_args(argv)
    args.arch_size = args.arch_size or ("test" if args.quick else "bench")
    from midtrain.data.catalog import rows_to_table
    from midtrain.runs import write_parquet_atomic

    rows = make_rows(args.steps * args.batch_size * 2)
    model_dir = build_model(args)
    info = json.loads((model_dir / "midtrain_tiny.json").read_text())
    mixture = Path(tempfile.mkdtemp(prefix="midtrain-bench-data-")) / "mixture.parquet"
    write_parquet_atomic(mixture, rows_to_table(rows))
    print(f"model: {args.arch} ({args.arch_size}), {info['parameters'] / 1e6:.1f} M parameters; 2 processes x "
          f"{args.batch_size} samples, {args.steps} steps, {args.device}, {args.threads} thread(s) per process")  # fmt: skip
    ddp_runs, fsdp_runs = [], []
    for r in range(args.rounds):
        ddp_runs.append(run_two(model_dir, mixture, args, fsdp=False))
        fsdp_runs.append(run_two(model_dir, mixture, args, fsdp=True))
        print(f"round {r + 1}: DDP {ddp_runs[-1]['step_s']:.3f} s/step, FSDP {fsdp_runs[-1]['step_s']:.3f} s/step")
    ddp, fsdp = ddp_runs[0], fsdp_runs[0]
    for runs, out in ((ddp_runs, ddp), (fsdp_runs, fsdp)):
        out["step_s"] = sum(x["step_s"] for x in runs) / len(runs)
    rel = max(abs(a - b) / abs(a) for a, b in zip(ddp["losses"], fsdp["losses"]))
    ratios = {k: fsdp["bytes"][k] / ddp["bytes"][k] for k in ddp["bytes"]}
    print(f"DDP : {ddp['step_s']:.3f} s/step, {ddp['bytes']}")
    print(f"FSDP: {fsdp['step_s']:.3f} s/step, {fsdp['bytes']}")
    print(f"loss curves agree: max relative difference {rel:.1e} ({'ok' if rel < 1e-4 else 'FAIL'})")
    figures = {"bench": "fsdp", "device": args.device, "arch": args.arch, "arch_size": args.arch_size,
               "params_m": round(info["parameters"] / 1e6, 1), "processes": 2, "batch_size": args.batch_size,
               "steps": args.steps, "rounds": args.rounds, "ddp_step_s": round(ddp["step_s"], 3), "fsdp_step_s": round(fsdp["step_s"], 3),
               "fsdp_over_ddp_step_time": round(fsdp["step_s"] / ddp["step_s"], 2),
               "param_bytes_ratio": round(ratios["param_bytes"], 3), "optimizer_bytes_ratio": round(ratios["optimizer_bytes"], 3),
               "ddp_bytes_per_process": ddp["bytes"], "fsdp_bytes_per_process": fsdp["bytes"],
               "loss_max_rel_diff": float(f"{rel:.1e}"), "losses_agree": bool(rel < 1e-4),
               "loadavg_1m": round(os.getloadavg()[0], 1)}  # fmt: skip
    print(json.dumps(figures))
    return 0 if rel < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
