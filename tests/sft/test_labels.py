"""Labels of SFT batches against the rendered chat template, for every tiny architecture: the loss
covers the tokens of every assistant turn (and the template's end-of-turn marker), never prompt,
image or padding tokens."""

from __future__ import annotations

import numpy as np
import pytest
from catalog_rows import png_ref

from midtrain.models.tiny import ARCHS as TINY_ARCHS
from midtrain.models.loading import multimodal_token_ids
from midtrain.sft.data import collate_sft

ANSWERS = ["The red block is left of the bowl.", "Three objects.", "Yes, it is open."]


def rows():
    rng = np.random.default_rng(0)
    three_turns = [
        {"role": "user", "content": "<image>\nWhere is the red block?"}, {"role": "assistant", "content": ANSWERS[0]},
        {"role": "user", "content": "How many objects are there?"}, {"role": "assistant", "content": ANSWERS[1]},
        {"role": "user", "content": "Is the drawer open?"}, {"role": "assistant", "content": ANSWERS[2]},
    ]  # fmt: skip
    one_turn = [{"role": "user", "content": "<image>\nHow many objects are there?"}, {"role": "assistant", "content": ANSWERS[1]}]
    return [
        {"id": "a/0", "image_refs": [png_ref(rng, 60, 80)], "messages": three_turns, "origin": "a.json:1"},
        {"id": "a/1", "image_refs": [png_ref(rng, 50, 50)], "messages": one_turn, "origin": "a.json:2"},
    ]


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` runs of True."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_labels_cover_every_assistant_turn_and_nothing_else(arch, loaded_vlm):
    model, processor = loaded_vlm(arch)
    data = rows()
    batch = collate_sft(data, processor, max_length=4096, overlong="truncate")
    ids, labels, attn = batch["input_ids"], batch["labels"], batch["attention_mask"]
    tok = processor.tokenizer
    image_ids = set(multimodal_token_ids(model.config)["image"])
    end_markers = {"", tok.eos_token or "", "<|im_end|>", "<end_of_utterance>"}
    assert batch["sample_ids"] == ["a/0", "a/1"]
    for i, row in enumerate(data):
        labeled = (labels[i] != -100).numpy()
        assert (labels[i][labeled] == ids[i][labeled]).all()  # labels are the input ids where they count
        assert not labeled[attn[i].numpy() == 0].any()  # no padding
        assert not any(int(t) in image_ids for t in ids[i][labeled])  # no image tokens
        answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
        spans = runs(labeled)
        assert len(spans) == len(answers), f"{arch}: one labeled run per assistant turn"
        rendered_prompt = tok.decode(ids[i][attn[i].bool() & ~labels[i].ne(-100)])
        for (a, b), answer in zip(spans, answers):
            text = tok.decode(ids[i][a:b]).lstrip()  # a leading space may belong to the answer's first token
            assert text.startswith(answer) and text[len(answer):].strip() in end_markers, f"{arch}: {text!r}"
        for m in row["messages"]:
            if m["role"] == "user":  # every question is in the unlabeled part
                assert m["content"].replace("<image>\n", "") in rendered_prompt
    assert batch["loss_weight"] == int((labels[:, 1:] != -100).sum())
    assert batch["num_tokens"] == int(attn.sum())
