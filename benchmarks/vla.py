"""VLA heads on one backbone: parallel decoding (``mlp``) vs autoregressive action tokens (``tokens``).

The ``mlp`` head reads a whole chunk of H actions out of one backbone pass (OpenVLA-OFT's
parallel decoding); the ``tokens`` head decodes the same chunk as H x A tokens, greedily, one
backbone step each (``generate`` with its KV cache, the baseline every action-token VLA uses).
Both policies share the backbone checkpoint, the observation and the chunk size, so the ratio of
their actions per second isolates the decoding scheme; OpenVLA-OFT reports 26-43x on GPU.

Also measured: training samples/s of each head (``mlp``, ``flow``, ``tokens``; LoRA backbone,
the ``vla`` stage's default) and the latency of ``select_action`` of the demo policy (the demo
VLM with an ``mlp`` head, executing whole chunks as the evaluator does): median and p95 over the
calls of a short episode, and of the calls that predict a chunk.

Agreement check: the tokens baseline is a correct decoder, i.e. feeding its generated tokens
back as the training target, the training forward's argmax at every action position is the
generated token (so the baseline is the real thing, not a strawman); and the mlp head's chunk is
the same in every timed call.

    python benchmarks/vla.py [--arch qwen2_vl] [--size bench] [--chunk 8] [--calls 10] [--quick]

Ends with one JSON line with ``decode_ratio`` (mlp over tokens, actions/s) and
``select_action_p95_ms``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from midtrain.policy import PolicyConfig, PolicySettings, VLAPolicy, compute_stats

CAMERA = "observation.images.corner"
ACTION_NAMES = ["delta_x", "delta_y", "delta_z", "gripper_effort"]


def scene(t: int, size: int = 128) -> np.ndarray:
    """A Meta-World-sized frame with a moving block."""
    frame = np.full((size, size, 3), 40, dtype=np.uint8)
    x = 10 + (7 * t) % (size - 30)
    frame[60:80, x : x + 20] = (220, 40, 40)
    frame[90:, :] = (120, 90, 60)
    return frame


def rows(n: int, chunk: int, seed: int = 0) -> list[dict]:
    from midtrain.data.images import encode_image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        action = np.concatenate([rng.uniform(-1, 1, (chunk, 3)), np.sign(rng.normal(size=(chunk, 1)))], 1)
        out.append({"id": f"bench/{i}", "origin": f"bench frame {i}", "image_refs": [{"path": None, "bytes": encode_image(scene(i))}],
                    "instruction": "pick up the red block and place it on the shelf", "state": rng.normal(size=4).tolist(),
                    "action": action.tolist(), "action_mask": [True] * chunk})  # fmt: skip
    return out


def config(head: str, data: list[dict], chunk: int, n_action_steps: int | None = None) -> PolicyConfig:
    steps = np.concatenate([np.asarray(r["action"]) for r in data])
    stats = {"action": compute_stats(steps), "state": compute_stats(np.asarray([r["state"] for r in data]))}
    settings = PolicySettings(head=head, chunk_size=chunk, n_action_steps=n_action_steps)
    return PolicyConfig(settings=settings, action_dim=4, action_names=ACTION_NAMES, state_dim=4, camera_keys=[CAMERA],
                        image_size=[128, 128], gripper_dims=[3], normalization_stats=stats)  # fmt: skip


def observation(t: int) -> dict:
    return {CAMERA: scene(t), "observation.state": np.zeros(4, np.float32), "task": "pick up the red block and place it on the shelf"}


def time_calls(fn, calls: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def tokens_agree_with_training_forward(policy: VLAPolicy, data: list[dict]) -> bool:
    """The generated chunk, fed back as the training target, is the forward's argmax at every
    position of a continuous dimension (a binarised gripper's token is re-quantised to an end bin)."""
    batch = policy.io.collate(data)
    generated = policy.predict_normalized(batch["inputs"], batch["state"])
    target = [dict(r, action=policy.io.action_normalizer.unnormalize(generated[i].numpy()).tolist()) for i, r in enumerate(data)]
    tf = policy.io.collate(target)
    with torch.no_grad():
        logits, labels = policy.head.action_token_logits(tf["inputs"], tf["state"])
    argmax = policy.io.bin_ids[logits[..., policy.io.bin_ids].argmax(-1)]
    continuous = ~policy.binary.cpu().repeat(policy.config.chunk_size)
    return bool(torch.equal(argmax[:, continuous], labels[:, continuous]))


def train_rate(backbone: Path, head: str, data: list[dict], chunk: int, batch_size: int, steps: int) -> float:
    """Training samples/s (forward, backward, AdamW step; LoRA backbone), after one warm-up step."""
    torch.manual_seed(0)
    policy = VLAPolicy.build(config(head, data, chunk), backbone, device="cpu")
    policy.configure_trainable("lora")
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    batches = [policy.io.collate(data[i * batch_size : (i + 1) * batch_size]) for i in range(steps + 1)]
    policy.train()
    t0 = 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            t0 = time.perf_counter()
        loss, _ = policy(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def demo_latency(root: Path, chunk: int, calls: int) -> dict:
    """select_action of the demo VLM + mlp head over an episode of ``calls`` steps (whole chunks executed)."""
    from midtrain.models.demo_vlm import build_demo_vlm

    path = build_demo_vlm(root / "demo_vlm")
    data = rows(8, chunk)
    policy = VLAPolicy.build(config("mlp", data, chunk), path, device="cpu").eval()
    policy.reset()
    for t in range(3):  # warm-up
        policy.select_action(observation(t))
    policy.reset()
    lat, predicting = [], []
    for t in range(calls):
        replans = not policy._queue
        t0 = time.perf_counter()
        policy.select_action(observation(t))
        lat.append(time.perf_counter() - t0)
        if replans:
            predicting.append(lat[-1])
    q = lambda xs, p: float(np.percentile(np.asarray(xs) * 1000, p))  # noqa: E731
    return {"median_ms": q(lat, 50), "p95_ms": q(lat, 95), "predict_median_ms": q(predicting, 50),
            "predict_p95_ms": q(predicting, 95), "calls": calls, "predicting_calls": len(predicting)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="qwen2_vl")
    ap.add_argument("--size", default="bench", help="tiny VLM preset (test | bench | 1b)")
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--calls", type=int, default=10, help="timed predict_action_chunk calls per head")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--episode-steps", type=int, default=48, help="select_action calls of the demo policy")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: on a shared machine, OpenMP threads that wait for each other dominate)")
    ap.add_argument("--quick", action="store_true", help="test-size backbone, fewer calls (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.size, args.calls, args.train_steps, args.episode_steps = "test", 3, 1, 10
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from midtrain.models.tiny import build_tiny_vlm

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        backbone = build_tiny_vlm(args.arch, root / "vlm", size=args.size)
        params_m = json.loads((backbone / "midtrain_tiny.json").read_text())["parameters"] / 1e6
        print(f"backbone {args.arch} ({args.size}, {params_m:.1f}M parameters) built in {time.perf_counter() - t0:.1f}s")
        data = rows(max(8, args.batch_size * (args.train_steps + 1)), args.chunk)
        obs = observation(0)

        torch.manual_seed(0)
        mlp = VLAPolicy.build(config("mlp", data, args.chunk), backbone, device="cpu").eval()
        mlp_times, mlp_chunks = [], []
        mlp_times = time_calls(lambda: mlp_chunks.append(mlp.predict_action_chunk(obs)), args.calls)
        mlp_same = all(torch.equal(c, mlp_chunks[0]) for c in mlp_chunks)
        del mlp
        torch.manual_seed(0)
        tok = VLAPolicy.build(config("tokens", data, args.chunk), backbone, device="cpu").eval()
        tok_times = time_calls(lambda: tok.predict_action_chunk(obs), args.calls)
        agree = tokens_agree_with_training_forward(tok, data[:2])
        del tok

        mlp_s, tok_s = statistics.median(mlp_times), statistics.median(tok_times)
        mlp_rate, tok_rate = args.chunk / mlp_s, args.chunk / tok_s
        ratio = mlp_rate / tok_rate
        print(f"decode, chunk {args.chunk} x 4 dims, batch 1 (median of {args.calls} calls):")
        print(f"  mlp    (1 backbone pass)         {mlp_s * 1000:8.1f} ms/chunk  {mlp_rate:8.1f} actions/s")
        print(f"  tokens ({args.chunk * 4} autoregressive steps) {tok_s * 1000:8.1f} ms/chunk  {tok_rate:8.1f} actions/s")
        print(f"  ratio {ratio:.1f}x (goal >= 10x); tokens decoding agrees with its training forward: {agree}; mlp repeatable: {mlp_same}")

        train = {}
        for head in ("mlp", "flow", "tokens"):
            train[head] = train_rate(backbone, head, data, args.chunk, args.batch_size, args.train_steps)
            print(f"train {head:6s} (LoRA, batch {args.batch_size}): {train[head]:.2f} samples/s")
        demo = demo_latency(root, args.chunk, args.episode_steps)
        print(f"demo policy select_action over {demo['calls']} calls: median {demo['median_ms']:.1f} ms, p95 {demo['p95_ms']:.1f} ms; "
              f"calls that predict ({demo['predicting_calls']}): median {demo['predict_median_ms']:.1f} ms, p95 {demo['predict_p95_ms']:.1f} ms")  # fmt: skip
        print(json.dumps({
            "bench": "vla", "arch": args.arch, "size": args.size, "params_m": round(params_m, 1), "chunk": args.chunk,
            "action_dim": 4, "mlp_actions_per_s": round(mlp_rate, 2), "tokens_actions_per_s": round(tok_rate, 2),
            "decode_ratio": round(ratio, 2), "tokens_agree": agree, "mlp_repeatable": mlp_same,
            "train_samples_per_s": {k: round(v, 3) for k, v in train.items()},
            "select_action_median_ms": round(demo["median_ms"], 2), "select_action_p95_ms": round(demo["p95_ms"], 2),
            "select_action_predict_p95_ms": round(demo["predict_p95_ms"], 2), "torch_threads": torch.get_num_threads(),
            "loadavg_1m": round(os.getloadavg()[0], 2),
        }))  # fmt: skip


if __name__ == "__main__":
    main()
