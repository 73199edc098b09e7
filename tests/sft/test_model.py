"""The SFT model on every tiny architecture: its loss is the model's own causal-LM loss on answer
tokens, falls on a repeated batch, and the modes train exactly the parts they name."""

from __future__ import annotations

import math

import pytest
import torch
from catalog_rows import vlm_rows

from midtrain.models import answer_loss, load_vlm
from midtrain.models.tiny import ARCHS as TINY_ARCHS
from midtrain.models.parts import LoraSettings
from midtrain.sft.data import collate_sft
from midtrain.sft.model import SFTModel, apply_training_mode, chunked_answer_loss, find_parts, parameter_counts


def batch_for(processor):
    data = [r for r in vlm_rows(6) if r["image_refs"]][:4]
    return collate_sft(data, processor, max_length=4096, overlong="truncate")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_loss_equals_the_models_own_loss_and_falls_on_a_repeated_batch(arch, tiny_vlm):
    vlm, processor = load_vlm(tiny_vlm(arch), dtype="float32", device="cpu")
    parts = find_parts(vlm)
    trained, _ = apply_training_mode(vlm, parts, "full", "frozen", 0.25, True)
    model = SFTModel(trained, frozen_vision=parts.vision_tower).train()
    batch = batch_for(processor)
    inputs = {k: v for k, v in batch.items() if hasattr(v, "shape") and k != "labels"}
    with torch.no_grad():
        reference = vlm(**inputs, labels=batch["labels"], use_cache=False).loss  # HF's shifted, -100-masked mean
        ours, _ = model(batch)
    assert float(ours) == pytest.approx(float(reference), rel=1e-5)
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss, _ = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses


def test_chunked_loss_equals_the_direct_loss_with_gradients(monkeypatch):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 50, (37,))
    direct = torch.nn.functional.cross_entropy(head(h), y)
    (g_direct,) = torch.autograd.grad(direct, h)
    monkeypatch.setattr(answer_loss, "HEAD_CHUNK_ELEMENTS", 50 * 8)  # 8 positions per chunk
    chunked = chunked_answer_loss(h, head, y)
    (g_chunked,) = torch.autograd.grad(chunked, h)
    assert float(chunked) == pytest.approx(float(direct), rel=1e-6)
    torch.testing.assert_close(g_chunked, g_direct, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen3_vl", "idefics3", "paligemma", "internvl"])
def test_modes_train_the_parts_they_name(arch, tiny_vlm):
    vlm, _ = load_vlm(tiny_vlm(arch), dtype="float32", device="cpu")
    parts = find_parts(vlm)
    assert parts.vision_tower and parts.projector and len(parts.vision_blocks) == 2
    trained, peft_model = apply_training_mode(vlm, parts, "lora", "last_fraction", 0.25, True,
                                              LoraSettings(rank=4, alpha=8, targets=["q_proj", "v_proj"]))  # fmt: skip
    counts = parameter_counts(trained, parts)
    names = [n for n, p in trained.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or ".modules_to_save." in n for n in names)
    lora = [n for n in names if ".lora_" in n]
    assert lora and all(n.startswith(parts.language_model + ".") and (".q_proj." in n or ".v_proj." in n) for n in lora)
    last_block = parts.vision_blocks[-1]
    vision_trained = [n for n in names if parts.part_of(n.replace(".modules_to_save.default", "")) == "vision_tower"]
    assert vision_trained and all(n.startswith(last_block + ".") for n in vision_trained)  # last 25% of 2 blocks = 1
    assert counts["projector"]["trainable"] == counts["projector"]["total"] > 0
    assert 0 < counts["vision_tower"]["trainable"] < counts["vision_tower"]["total"]
    assert counts["lora"]["trainable"] == counts["lora"]["total"] == sum(
        p.numel() for n, p in trained.named_parameters() if ".lora_" in n)
    assert counts["all"]["trainable"] == sum(p.numel() for p in trained.parameters() if p.requires_grad)
    assert math.isclose(counts["language_model"]["trainable"], counts["lora"]["trainable"])
