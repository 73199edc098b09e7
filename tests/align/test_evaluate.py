"""The held-out measurements of ``benchmarks/align.py``: answers, exact match, depth readouts, probes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from midtrain.align.evaluate import (answer_accuracy, chance, depth_readout, generate_answers, heldout_samples,
                                     normalise_answer, probe_accuracy, uniform_loss)  # fmt: skip
from midtrain.sim.web import ANSWERS, WEB_KINDS, web_rng


def test_heldout_pictures_are_not_training_pictures():
    held = heldout_samples(3, seed=0, image_size=48)
    assert [s.kind for s in held] == [k for k in WEB_KINDS for _ in range(3)]
    from midtrain.sim.web import web_sample

    train = [web_sample(s.kind, web_rng(0, "train", s.kind, i % 3), 48) for i, s in enumerate(held)]
    assert all(not np.array_equal(np.asarray(a.image), np.asarray(b.image)) for a, b in zip(held, train))


def test_exact_match_after_case_and_final_period():
    held = heldout_samples(1, kinds=("colour", "count"), image_size=48)
    assert normalise_answer(" Red.\n") == "red"
    acc = answer_accuracy(held, [held[0].answer.upper() + ".", "The answer is " + held[1].answer])
    assert acc == {"colour": 1.0, "count": 0.0}
    assert chance(["colour", "count", "position"]) == {"colour": 1 / 8, "count": 1 / 6, "position": 1 / 4}
    assert all(len(ANSWERS[k]) >= 3 for k in WEB_KINDS)  # every kind can be twice chance without being perfect


def test_probe_separates_what_is_separable_and_not_noise():
    rng = np.random.default_rng(0)
    labels = np.array(["a", "b", "c"] * 30)
    signal = rng.normal(size=(90, 8)) + 3 * (labels[:, None] == np.array(["a", "b", "c", "a", "b", "c", "a", "b"]))
    assert probe_accuracy(signal, labels) > 0.9
    assert probe_accuracy(rng.normal(size=(90, 8)), labels) < 0.6


def test_depth_readout_and_generation_on_a_tiny_vlm(tiny_parts, tmp_path):
    from midtrain.align.assemble import assemble_vlm
    from midtrain.models import load_vlm

    vlm, processor = load_vlm(assemble_vlm(tmp_path / "vlm", str(tiny_parts["tower"]), str(tiny_parts["lm"]), None, 0),
                              dtype="float32", device="cpu")  # fmt: skip
    held = heldout_samples(2, kinds=("colour", "shape"), image_size=32)
    answers = generate_answers(vlm, processor, held, batch=3, max_new_tokens=2)
    assert len(answers) == 4 and all(isinstance(a, str) for a in answers)
    feats, losses = depth_readout(vlm, processor, held, depths=[1, 3], batch=3)
    assert feats[1].shape == feats[3].shape == (4, 32) and not np.allclose(feats[1], feats[3])
    assert set(losses) == {1, 3} and all(np.isfinite(v) and v > 0 for v in losses.values())
    assert uniform_loss(vlm) == pytest.approx(np.log(vlm.get_output_embeddings().weight.shape[0]))
    # the last depth is the model's own output: its loss is the VLM's loss on the captions
    with torch.no_grad():
        out = vlm.model(**processor(text=["x"], return_tensors="pt"), output_hidden_states=True)
    torch.testing.assert_close(out.hidden_states[-1], out.last_hidden_state)
