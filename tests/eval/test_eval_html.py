"""The report section: the table, and videos that a real browser decodes."""

from __future__ import annotations

import shutil

import pytest

from midtrain.eval.html import check_videos_in_browser, eval_page_html, eval_section_html


def test_section_has_the_table_and_one_video_per_recorded_episode(expert_eval):
    out, results = expert_eval
    section = eval_section_html(out)
    assert section.startswith('<section class="midtrain-eval"') and section.rstrip().endswith("</section>")
    assert section.count("<video ") == len(results["files"]["videos"]) == 2
    assert section.count('src="data:video/mp4;base64,') == 2  # embedded: the page stands alone
    assert "push the puck to the goal" in section and "mean over tasks" in section
    assert "4/4" in section and "1.00" in section  # successes and rate of the mean row
    linked = eval_section_html(out, embed_videos=False, relative_to=out)
    assert 'src="videos/push-v3/episode_000.mp4"' in linked


@pytest.mark.slow
def test_videos_play_in_headless_chromium_and_a_broken_one_is_caught(expert_eval, tmp_path):
    out, _ = expert_eval
    page = tmp_path / "eval.html"
    page.write_text(eval_page_html(out))
    assert check_videos_in_browser(page) == {"videos_ok": 2, "videos_total": 2}
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    (broken / "videos" / "push-v3" / "episode_000.mp4").write_bytes(b"\x00" * 2000)
    page = broken / "eval.html"
    page.write_text(eval_page_html(broken, embed_videos=False, relative_to=broken))
    assert check_videos_in_browser(page) == {"videos_ok": 1, "videos_total": 2}
