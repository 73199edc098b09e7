"""Tiny pretrained-looking parts for ``midtrain align`` tests: a CLIP vision tower, a Llama causal LM with a
chat template, and parts that must be refused (an encoder LM, a tokenizer without a chat template)."""

from __future__ import annotations

from pathlib import Path

import pytest

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _tokenizer(chat_template: str | None):
    from midtrain.models.tiny import train_tokenizer

    tok = train_tokenizer(["<pad>", "<|im_start|>", "<|im_end|>"], vocab_size=400, pad_token="<pad>",
                          bos_token="<|im_start|>", eos_token="<|im_end|>")  # fmt: skip
    tok.chat_template = chat_template
    return tok


@pytest.fixture(scope="session")
def tiny_parts(tmp_path_factory) -> dict[str, Path]:
    """``{"tower", "lm", "lm_no_template", "encoder_lm", "odd_tower"}``: saved model directories."""
    import torch
    from transformers import (BertConfig, BertModel, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, LlamaConfig,
                              LlamaForCausalLM)  # fmt: skip

    root = tmp_path_factory.mktemp("align_parts")
    torch.manual_seed(0)
    out = {}
    for name, image_size in (("tower", 32), ("odd_tower", 30)):
        tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                                                 image_size=image_size, patch_size=8))  # fmt: skip
        tower.save_pretrained(root / name)
        CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}).save_pretrained(root / name)
        out[name] = root / name
    tok = _tokenizer(CHATML)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True))  # fmt: skip
    lm.save_pretrained(root / "lm")
    tok.save_pretrained(root / "lm")
    out["lm"] = root / "lm"
    lm.save_pretrained(root / "lm_no_template")
    _tokenizer(None).save_pretrained(root / "lm_no_template")
    out["lm_no_template"] = root / "lm_no_template"
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2)).save_pretrained(root / "encoder_lm")  # fmt: skip
    tok.save_pretrained(root / "encoder_lm")
    out["encoder_lm"] = root / "encoder_lm"
    return out
