"""Step cost of aligning the causal demo VLM on cached tower features: forward + backward per sample, 1 thread.

What ``midtrain align`` runs per sample once the tower's features are cached: projector, SmolLM2's
first ``depth`` decoder layers over (system prompt + question + answer: 40 text tokens) and the
image tokens, the head, backward. Variants: depth 30 / 8 / 2, 49 / 16 / 9 image tokens (the 7x7
map pooled), logits at every position or at the answer positions only, projector-only (stage 1)
or projector + LoRA r16 on every linear layer (stage 2). Batch 8; the best of 3 steps.

    OMP_NUM_THREADS=1 python benchmarks/align_step_cost.py

Numbers in docs/align.md (taken on the shared 2-core machine, so contention inflates them unevenly).
"""
import copy
import json
import time

import torch

from midtrain.models.smollm2 import load_smollm2

torch.set_num_threads(1)
BATCH, TEXT_TOKENS = 8, 40  # system turn (~20) + question (~15) + answer (~3) tokens
WIDTH = 1280  # EfficientNet-Lite0 features


def step_seconds(lm, image_tokens: int, answer_only: bool, trains: str) -> float:
    """Best of 3 forward + backward passes of one batch."""
    projector = torch.nn.Sequential(torch.nn.Linear(WIDTH, 576), torch.nn.GELU(), torch.nn.Linear(576, 576))
    features = torch.randn(BATCH, image_tokens, WIDTH)
    ids = torch.randint(0, 49000, (BATCH, TEXT_TOKENS))
    lm.requires_grad_(False)
    model = lm
    if trains == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(lm, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    decoder = lm.model
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        text = lm.get_input_embeddings()(ids)
        x = torch.cat([text[:, :20], projector(features), text[:, 20:]], 1)
        h = decoder(inputs_embeds=x).last_hidden_state
        logits = lm.get_output_embeddings()(h[:, -4:] if answer_only else h)
        logits.float().logsumexp(-1).mean().backward()
        times.append(time.perf_counter() - t0)
    if trains == "lora":
        model.unload()
    return min(times)


def main() -> None:
    lm, _ = load_smollm2()
    ms: dict[str, float] = {}  # "depth/image_tokens/logits/trains" -> ms per sample
    for depth in (30, 8, 2):
        model = copy.deepcopy(lm)
        model.model.layers = model.model.layers[:depth]
        model.config.num_hidden_layers = depth
        for image_tokens in (49, 16, 9):
            for answer_only in (False, True):
                if (depth != 30 or image_tokens != 49) and not answer_only:
                    continue
                for trains in ("projector", "lora"):
                    s = step_seconds(model, image_tokens, answer_only, trains)
                    ms[f"{depth}/{image_tokens}/{'answer' if answer_only else 'all'}/{trains}"] = round(s / BATCH * 1000, 1)
                    print(f"depth {depth:2d} image tokens {image_tokens:2d} answer-only logits {answer_only!s:5} trains "
                          f"{trains:9s}: {s / BATCH * 1000:7.1f} ms/sample ({TEXT_TOKENS + image_tokens} tokens)", flush=True)

    # the baseline in the same run: the full-depth VLM with logits at every position
    base = {t: ms[f"30/49/all/{t}"] for t in ("projector", "lora")}
    print(json.dumps({"bench": "align_step_cost", "batch": BATCH, "text_tokens": TEXT_TOKENS, "ms_per_sample": ms,
                      "answer_logits_speedup": {t: round(base[t] / ms[f"30/49/answer/{t}"], 2) for t in base},
                      "depth8_speedup": {t: round(base[t] / ms[f"8/49/answer/{t}"], 2) for t in base}}))


if __name__ == "__main__":
    main()
