"""The perplexity baselines end to end inside midtrain: ``midtrain sft`` on the catalog's VLA frames
rendered as text gives the VLA model that ``score scorer=vla_perplexity`` / ``delta_perplexity``
need - the command sequence of docs/sft.md, run through the CLI entry point."""

from __future__ import annotations

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from catalog_rows import png_ref, vla_rows, write_catalog

from midtrain.cli import main


def pool(source: str, answer, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"id": f"{source}/{i}", "source": source, "kind": "vlm", "image_refs": [png_ref(rng, 56, 56)],
             "messages": [{"role": "user", "content": "<image>\nWhat should the robot do?"},
                          {"role": "assistant", "content": answer(rng)}], "origin": f"{source}.json:{i + 1}"}
            for i in range(n)]  # fmt: skip


@pytest.mark.slow
def test_sft_on_vla_text_feeds_the_perplexity_scorers(tmp_path, tiny_vlm):
    base = tiny_vlm("qwen2_vl")
    run = tmp_path / "run"
    actiony = pool("actiony", lambda r: "\n".join(" ".join(str(v) for v in r.integers(0, 256, 4)) for _ in range(2)), 6, 1)
    chatty = pool("chatty", lambda r: "the image shows a kitchen with a white counter and a wooden cabinet", 6, 2)
    write_catalog(run, {"robot": vla_rows(16), "actiony": actiony, "chatty": chatty})
    vla_model = run / "sft_vla" / "model"
    steps = ["train.steps=25", "train.batch_size=4", "train.lr=3e-3", "train.warmup_steps=0", "train.eval_every=0",
             "train.save_every=0", "train.num_workers=0", "val_fraction=0"]  # fmt: skip
    assert main(["sft", "--run-dir", str(run), "name=sft_vla", f"model={base}", "sources=[robot]", "vla_as_text=true",
                 "mode=full", *steps]) == 0  # fmt: skip
    assert main(["score", "--run-dir", str(run), "scorer=vla_perplexity", f"vla_model={vla_model}", "device=cpu"]) == 0
    t = pq.read_table(run / "score" / "proximity_scores.parquet")
    mean = {s: pc.mean(t.filter(pc.equal(t.column("source"), s)).column("score")).as_py() for s in ("actiony", "chatty")}
    assert set(t.column("source").to_pylist()) == {"actiony", "chatty"} and mean["actiony"] > mean["chatty"]
    assert main(["score", "--run-dir", str(run), "scorer=delta_perplexity", f"vla_model={vla_model}", f"base_model={base}",
                 "device=cpu"]) == 0  # fmt: skip
    t = pq.read_table(run / "score" / "proximity_scores.parquet")
    np.testing.assert_allclose(t.column("score").to_numpy(), t.column("nll_base").to_numpy() - t.column("nll_vla").to_numpy())
    mean = {s: pc.mean(t.filter(pc.equal(t.column("source"), s)).column("score")).as_py() for s in ("actiony", "chatty")}
    assert mean["actiony"] > mean["chatty"]
