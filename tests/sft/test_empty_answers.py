"""An empty answer (every assistant turn "") is a per-sample error in sft, though its end-of-turn
token would otherwise give it answer tokens to train on."""

from __future__ import annotations

from catalog_rows import vlm_rows

from midtrain.sft.data import encode_rows


def test_a_row_whose_every_answer_is_empty_is_an_error_and_the_others_encode(loaded_vlm):
    _, processor = loaded_vlm("qwen2_vl")
    rows = vlm_rows(4, multi_turn_every=2)
    rows = [{**r, "id": f"llava/{i}", "origin": f"llava.json:{i + 1}"} for i, r in enumerate(rows)]
    for turn in rows[1]["messages"]:  # a two-turn conversation: both answers empty
        if turn["role"] == "assistant":
            turn["content"] = ""
    rows[2]["messages"][1]["content"] = " \n"  # whitespace only
    encoded = {e.rid: e for e in encode_rows(list(enumerate(rows)), processor, 512, "truncate")}
    assert sorted(encoded) == [0, 1, 2, 3]
    for rid in (1, 2):
        err = encoded[rid].error
        assert err["reason"] == "empty answer" and err["where"] == f"llava.json:{rid + 1}" and err["sample_id"] == f"llava/{rid}"
    assert encoded[0].error is None and encoded[0].answer_tokens > 0 and encoded[3].error is None
