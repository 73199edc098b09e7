"""The synthetic web: deterministic, answers from each kind's closed set, captions that say what is drawn,
and seeds apart from the data engine's pool and between the train and held-out splits."""

from __future__ import annotations

import json

import numpy as np

from midtrain.sim.pool import sample_rng
from midtrain.sim.web import ANSWERS, WEB_KINDS, web_rng, web_sample, write_web_corpus


def test_samples_are_deterministic_and_answer_from_their_kinds_set():
    for kind in WEB_KINDS:
        a, b = web_sample(kind, web_rng(0, "train", kind, 3), 64), web_sample(kind, web_rng(0, "train", kind, 3), 64)
        assert a.answer == b.answer and np.array_equal(np.asarray(a.image), np.asarray(b.image))
        answers = {web_sample(kind, web_rng(0, "train", kind, i), 64).answer for i in range(40)}
        assert answers <= set(ANSWERS[kind]) and len(answers) >= 2  # every kind varies its answer


def test_captions_describe_the_drawn_attributes():
    for i in range(20):
        s = web_sample("colour", web_rng(1, "train", "colour", i), 96)
        for key in ("colour", "shape", "position", "size"):
            assert s.attributes[key] in s.caption
        c = web_sample("count", web_rng(1, "train", "count", i), 96)
        n = int(c.answer)
        assert c.attributes["count"] == c.answer and 1 <= n <= 6


def test_the_shape_is_drawn_on_the_side_the_answer_names():
    for i in range(30):
        s = web_sample("position", web_rng(2, "train", "position", i), 96)
        pixels = np.asarray(s.image).astype(int)
        background = pixels[0, 0] if s.answer != "top" else pixels[-1, -1]
        ys, xs = np.nonzero(np.abs(pixels - background).sum(-1) > 60)
        cy, cx = ys.mean() / 96, xs.mean() / 96
        side = {"top": cy < 0.4, "bottom": cy > 0.6, "left": cx < 0.4, "right": cx > 0.6}
        assert side[s.answer], (i, s.answer, cx, cy)


def test_seeds_are_apart_from_the_pool_and_between_splits():
    for kind in WEB_KINDS:
        for i in range(5):
            web = web_rng(0, "train", kind, i).integers(0, 2**63, size=4)
            assert not np.array_equal(web, web_rng(0, "heldout", kind, i).integers(0, 2**63, size=4))
            for source in ("spatial_pointing", "captions", "book_covers", "chart_qa", "counting"):
                assert not np.array_equal(web, sample_rng(0, source, i).integers(0, 2**63, size=4))


def test_corpus_files_are_llava_json_with_its_composition(tmp_path):
    composition = write_web_corpus(tmp_path, {"colour": 3, "word": 2, "scene": 0}, seed=0, image_size=48)
    captions = json.loads((tmp_path / "captions.json").read_text())
    vqa = json.loads((tmp_path / "vqa.json").read_text())
    assert len(captions) == len(vqa) == 5 == composition["pictures"]
    assert set(composition["kinds"]) == {"colour", "word"}
    for c, q in zip(captions, vqa):
        assert c["image"] == q["image"] and (tmp_path / c["image"]).is_file()
        assert q["conversations"][0]["value"].startswith("<image>\n") and q["conversations"][1]["value"] in ANSWERS[c["id"].split("-")[2]]
    assert json.loads((tmp_path / "corpus.json").read_text()) == composition
