"""Tiny VLMs of every supported architecture load through the path a released checkpoint takes."""

import json

import pytest

from midtrain.models import load_vlm, processor_settings
from midtrain.models.tiny import ARCHS as TINY_ARCHS
from midtrain.models.tiny import tiny_vlm_parts

EXPECTED = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
    "idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
    "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor"),
    "paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor"),
    "internvl": ("InternVLForConditionalGeneration", "InternVLProcessor"),
}


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_vlm_is_a_real_checkpoint(arch, tiny_vlm, loaded_vlm):
    path = tiny_vlm(arch)
    assert (path / "model.safetensors").exists() and (path / "config.json").exists()
    assert (path / "tokenizer.json").exists()
    info = json.loads((path / "midtrain_tiny.json").read_text())
    assert info["arch"] == arch and info["parameters"] < 2_000_000
    model, processor = loaded_vlm(arch)
    assert (type(model).__name__, type(processor).__name__) == EXPECTED[arch]
    assert not model.training and next(model.parameters()).dtype.is_floating_point
    # the locally trained tokenizer round-trips text and knows the architecture's image token
    text = "pick up the red block"
    assert processor.tokenizer.decode(processor.tokenizer(text)["input_ids"]) == text
    assert processor.tokenizer.convert_tokens_to_ids(processor.image_token) != processor.tokenizer.unk_token_id
    assert model.config.get_text_config().vocab_size >= len(processor.tokenizer)
    settings = processor_settings(processor)
    assert settings["processor_class"] == EXPECTED[arch][1]
    assert (settings["chat_template_sha1"] is None) == (arch == "paligemma")  # PaliGemma ships no chat template
    json.dumps(settings)  # manifest-safe


def test_bench_preset_is_in_the_30_to_100m_range():
    model_cls, config, _ = tiny_vlm_parts("qwen2_vl", "bench")
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    n = sum(p.numel() for p in model.parameters())
    assert 30e6 <= n <= 100e6, n


def test_bench_preset_keeps_the_released_vocabulary_with_a_tied_head():
    import torch

    from midtrain.models.tiny import RELEASED_VOCAB, preset

    model_cls, config, processor = tiny_vlm_parts("qwen2_vl", "bench")
    assert config.get_text_config().vocab_size == RELEASED_VOCAB["qwen2_vl"] == 151936  # Qwen2-VL-2B's
    with torch.device("meta"):
        model = model_cls(config)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # one table, as in the 2B
    assert all(preset(arch, "bench").vocab_size == RELEASED_VOCAB[arch] for arch in TINY_ARCHS)
    # the override rebuilds the earlier 32k model; 0 falls back to the trained tokenizer's size
    assert tiny_vlm_parts("qwen2_vl", "bench", 32000)[1].get_text_config().vocab_size == 32000
    assert tiny_vlm_parts("qwen2_vl", "bench", 0)[1].get_text_config().vocab_size == len(processor.tokenizer)
    # the test preset is untouched: the trained tokenizer's vocabulary
    assert preset("qwen2_vl", "test").vocab_size == 0


def test_build_records_the_vocabulary(tmp_path):
    from midtrain.models.tiny import build_tiny_vlm

    path = build_tiny_vlm("qwen2_vl", tmp_path / "m", size="test", vocab_size=1000)
    info = json.loads((path / "midtrain_tiny.json").read_text())
    assert info["vocab_size"] == info["preset"]["vocab_size"] == 1000
    model, _ = load_vlm(path, dtype="float32", device="cpu")
    assert model.config.get_text_config().vocab_size == 1000


def test_unknown_arch_and_size_are_rejected():
    with pytest.raises(ValueError, match="unknown tiny VLM architecture 'llava'"):
        tiny_vlm_parts("llava")
    with pytest.raises(ValueError, match="unknown tiny VLM size 'huge'"):
        tiny_vlm_parts("qwen2_vl", "huge")


def test_dtype_and_device_defaults(tiny_vlm):
    import torch

    model, _ = load_vlm(tiny_vlm("qwen2_vl"), dtype="auto", device="auto")  # no GPU here: float32 on CPU
    if not torch.cuda.is_available():
        assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    model16, _ = load_vlm(tiny_vlm("qwen2_vl"), dtype="bfloat16", device="cpu", attn_implementation="eager")
    assert next(model16.parameters()).dtype == torch.bfloat16
    assert model16.config._attn_implementation == "eager"
