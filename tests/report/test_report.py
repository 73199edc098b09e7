"""The report renders whatever stages completed, embeds every figure, and a real browser decodes them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from midtrain.config import StageConfig
from midtrain.data.catalog import rows_to_table
from midtrain.data.images import encode_image, ref_from_bytes
from midtrain.browser import check_report_in_browser
from midtrain.report.config import ReportConfig
from midtrain.report.stage import write_report
from midtrain.runs import RunDir, stage_run, write_parquet_atomic


def _png(path, color):
    Image.fromarray(np.full((40, 60, 3), color, dtype=np.uint8)).save(path)


def _gap_summary() -> dict:
    """``summary.json`` as the gap stage writes it (its own summary function), for VLM sources a, b
    and the VLA source r: b is the VLM source closer to the VLA data."""
    from midtrain.gap.config import GapConfig
    from midtrain.gap.mmd import MMDMatrix
    from midtrain.gap.stage import _summary

    mmd2 = np.array([[0.0, 0.04, 0.25], [0.04, 0.0, 0.09], [0.25, 0.09, 0.0]])
    result = MMDMatrix(["a", "b", "r"], [4, 4, 4], (1.0,), mmd2, mmd2, "unbiased", "exact")
    return _summary(result, ["vlm", "vlm", "vla"], GapConfig(), sigma=1.0)


def _fake_run(tmp_path):
    """A run directory with completed catalog, gap, fit and select stages (synthetic artefacts)."""
    run = RunDir(tmp_path / "run")
    rows = [
        {"id": f"a/{i}", "source": "a", "kind": "vlm",
         "image_refs": [ref_from_bytes(encode_image(np.full((16, 16, 3), 40 * i, dtype=np.uint8)))],
         "messages": [{"role": "user", "content": "<image>\nWhat is the title?"}, {"role": "assistant", "content": f"Book {i}"}]}
        for i in range(4)
    ]  # fmt: skip
    with stage_run(run, "catalog", StageConfig(), kind="catalog") as st:
        write_parquet_atomic(st.dir / "a" / "part-00000.parquet", rows_to_table(rows))
    with stage_run(run, "gap", StageConfig(), kind="gap") as st:
        _png(st.dir / "mmd_heatmap.png", (200, 0, 0))
        _png(st.dir / "tsne.png", (0, 200, 0))
        (st.dir / "summary.json").write_text(json.dumps(_gap_summary()))
    with stage_run(run, "fit", StageConfig(), kind="fit") as st:
        st.extra.update({"val_auc": 0.93, "curve": [{"epoch": 0, "train_loss": 0.7, "val_loss": 0.69},
                                                    {"epoch": 1, "train_loss": 0.5, "val_loss": 0.52}]})  # fmt: skip
    with stage_run(run, "select", StageConfig(), kind="select") as st:
        (st.dir / "report").mkdir()
        _png(st.dir / "report" / "score_distributions.png", (0, 0, 200))
        _png(st.dir / "report" / "pool_vs_selection.png", (200, 200, 0))
        (st.dir / "selection_metrics.json").write_text(json.dumps({"mmd_selection_vla": 0.1, "mmd_random_vla": 0.2}))
        (st.dir / "report" / "gallery.json").write_text(json.dumps(
            {"top": [{"id": "a/3", "source": "a", "score": 0.9}], "bottom": [{"id": "a/0", "source": "a", "score": 0.1}]}))
    return run


def test_report_embeds_figures_and_gallery(tmp_path):
    run = _fake_run(tmp_path)
    out = write_report(ReportConfig(), run)
    page = (out / "report.html").read_text()
    assert "src=\"file:" not in page and "src=\"/" not in page  # self-contained
    assert page.count("data:image/png;base64,") == 7  # 4 stage figures + loss curve + 2 gallery thumbnails
    assert "Book 3" in page and "What is the title?" in page
    # the gap's group means and its ranking of VLM sources, from the keys the gap stage writes
    summary = _gap_summary()
    assert summary["mean_mmd_cross"] == pytest.approx((0.5 + 0.3) / 2)
    means = page.split("<h3>Group means</h3>", 1)[1].split("</table>", 1)[0]
    assert "<th>mean_mmd_cross</th>" in means and "<td>0.4</td>" in means and "<td>0.2</td>" in means  # cross, within-VLM
    ranking = page.split("ranked by distance to the VLA group</h3>", 1)[1].split("</table>", 1)[0]
    assert "<th>mean_mmd_to_vla</th>" in ranking and ranking.index("<td>b</td>") < ranking.index("<td>a</td>")
    assert "<td>0.3</td>" in ranking and "<td>0.5</td>" in ranking
    assert "The export stage has not run." in page  # missing stages are named, not silently dropped
    assert json.loads((out / "manifest.json").read_text())["status"] == "complete"


def test_report_is_rerendered_when_an_upstream_stage_changes(tmp_path):
    run = _fake_run(tmp_path)
    write_report(ReportConfig(), run)
    first = run.manifest("report")["fingerprint"]
    write_report(ReportConfig(), run)
    assert run.manifest("report")["fingerprint"] == first
    with stage_run(run, "gap", StageConfig(seed=1), kind="gap") as st:
        _png(st.dir / "mmd_heatmap.png", (1, 2, 3))
        (st.dir / "summary.json").write_text("{}")
    write_report(ReportConfig(), run)
    assert run.manifest("report")["fingerprint"] != first


@pytest.mark.slow
def test_figures_load_in_headless_chromium(tmp_path):
    run = _fake_run(tmp_path)
    out = write_report(ReportConfig(), run)
    shot = tmp_path / "report.png"
    result = check_report_in_browser(out / "report.html", screenshot=shot)
    assert result["images_total"] == 7
    assert result["images_ok"] == result["images_total"]
    assert shot.exists() and Image.open(shot).size[0] == 1280


@pytest.mark.slow
def test_browser_check_detects_a_broken_figure(tmp_path):
    page = tmp_path / "broken.html"
    from midtrain.report.stage import CHECK_SCRIPT

    page.write_text(f"<html><head><script>{CHECK_SCRIPT}</script></head><body>"
                    "<img src='data:image/png;base64,bm90IGEgcG5n'><img src='missing.png'></body></html>")  # fmt: skip
    result = check_report_in_browser(page)
    assert result == {"images_ok": 0, "images_total": 2, "title": ""}


def test_browser_check_names_missing_chromium(monkeypatch, tmp_path):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        check_report_in_browser(tmp_path / "x.html")


def _training_stages(run):
    """A mid-training and a policy-training stage folder as their stages leave them (synthetic numbers)."""
    from midtrain.train.plots import plot_closed_loop, plot_loss_curves

    rows = [{"step": s, "loss": 2.0 / s} for s in range(1, 11)] + [{"step": 10, "eval_loss": 0.3}]
    with stage_run(run, "sft_learned", StageConfig()) as st:
        plot_loss_curves(rows, st.dir / "loss_curves.png", "sft")
        _png(st.dir / "composition.png", (9, 9, 9))
        st.extra.update({"final_model": str(st.final_dir / "model"), "train": {"steps": 10, "train_loss": 0.2},
                         "composition": {"sources": {"spatial": {"train_samples": 30}, "captions": {"train_samples": 10}}},
                         "parameters": {"language_model": {"trainable": 5, "total": 50}}})  # fmt: skip
    cl = rows + [{"step": s, "callback": "closed_loop", "success": s / 20, "success_reach-v3": s / 10} for s in (5, 10)]
    with stage_run(run, "vla_learned", StageConfig()) as st:
        plot_loss_curves(cl, st.dir / "loss_curves.png", "vla")
        plot_closed_loop(cl, st.dir / "closed_loop.png", "vla")
        st.extra.update({"final_policy": str(st.final_dir / "policy"), "train": {"steps": 10, "eval_l1": 0.1},
                         "policy_config": {"settings": {"head": "mlp", "chunk_size": 4}}})  # fmt: skip


@pytest.mark.slow
def test_training_and_evaluation_stages_get_sections_whose_figures_and_videos_play(tmp_path):
    from midtrain.eval.config import EvalConfig
    from midtrain.eval.html import check_videos_in_browser
    from midtrain.eval.policies import save_scripted_policy
    from midtrain.eval.stage import run_eval

    run = _fake_run(tmp_path)
    _training_stages(run)
    expert = save_scripted_policy(tmp_path / "expert", "metaworld_expert")
    run_eval(EvalConfig(policy=expert, tasks=["reach-v3"], episodes_per_task=1, max_steps=40, workers=1,
                        videos_per_task=1), run)  # fmt: skip
    out = write_report(ReportConfig(), run)
    page = (out / "report.html").read_text()
    for title in ("Mid-training (sft_learned)", "VLA policy (vla_learned)", "Closed-loop evaluation (eval)"):
        assert title in page
    assert "spatial" in page and "reach-v3" in page
    result = check_report_in_browser(out / "report.html")
    assert result["images_ok"] == result["images_total"] == 7 + 4  # + sft (2) and vla (2) figures
    assert check_videos_in_browser(out / "report.html") == {"videos_ok": 1, "videos_total": 1}
    summary_rows = page.split("Run summary")[1]
    assert "sft_learned" in summary_rows and "vla_learned" in summary_rows  # the run summary lists them too
