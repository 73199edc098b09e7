"""The evaluation's HTML: a report section (success table and episode videos playing in the
page) and a headless-Chromium check that every video decodes.

The section marks itself ``data-videos-ok=N data-videos-total=M`` once each ``<video>`` has
decoded its first frame (``loadeddata``) or failed (``error``); Chromium's ``--dump-dom``
prints the DOM after that, as ``midtrain.browser`` does for the report's figures.
"""

from __future__ import annotations

import base64
import html
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Optional

from .results import EPISODES_FILE, RESULTS_FILE

_SCRIPT = """<script>(function () {
  var section = document.currentScript.parentElement, videos = section.querySelectorAll('video'), ok = 0;
  section.setAttribute('data-videos-total', videos.length);
  videos.forEach(function (v) {
    var done = function (good) { return function () { if (v.dataset.state) return; v.dataset.state = good ? 'ok' : 'error';
      if (good) { ok += 1; } section.setAttribute('data-videos-ok', ok); }; };
    v.addEventListener('loadeddata', done(true)); v.addEventListener('error', done(false));
    if (v.readyState >= 2) { done(true)(); }
  });
})();</script>"""

STYLE = """
.midtrain-eval table { border-collapse: collapse; margin: 0.5em 0 1em; }
.midtrain-eval th, .midtrain-eval td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
.midtrain-eval td.text, .midtrain-eval th.text { text-align: left; }
.midtrain-eval tr.mean td { font-weight: bold; }
.midtrain-eval .videos { display: flex; flex-wrap: wrap; gap: 10px; }
.midtrain-eval figure { margin: 0; width: 256px; font-size: 12px; }
.midtrain-eval video { width: 256px; height: auto; image-rendering: pixelated; background: #000; }
"""


def _fmt(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _video_src(path: Path, embed: bool, relative_to: Optional[Path]) -> str:
    if embed:
        return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
    return Path(os.path.relpath(path, relative_to)).as_posix() if relative_to else path.resolve().as_uri()


def eval_section_html(eval_dir: Path | str, embed_videos: bool = True, relative_to: Optional[Path] = None,
                      title: str = "Closed-loop evaluation") -> str:  # fmt: skip
    """The ``<section>`` (with its own ``<style>`` and load check) for ``eval_dir`` (a ``midtrain
    eval`` output or an ``evaluate_policy`` out_dir): protocol line, per-task success table with Wilson 95% intervals and the mean over
    tasks, and each task's videos. Videos are embedded as data URIs (a self-contained page) or
    linked relative to ``relative_to`` (the folder the page will be written to)."""
    import pyarrow.parquet as pq

    eval_dir = Path(eval_dir)
    results: dict[str, Any] = json.loads((eval_dir / RESULTS_FILE).read_text())
    episodes = pq.read_table(eval_dir / EPISODES_FILE).to_pylist()
    obs, protocol = results.get("observation", {}), results.get("protocol", {})
    codec = obs.get("codec")
    frames = (f"codec round trip ({codec['encoder']} crf {codec['crf']} {codec['pix_fmt']} gop {codec['gop']}, "
              f"{codec['mode']}; from the {codec['source']}" + (f"; {codec['round_trip']}" if codec.get("round_trip") else "")
              + ")" if codec else "raw renders")  # fmt: skip
    bench = results.get("benchmark", "") + (f" / {results['suite']}" if results.get("suite") else "")
    esc = html.escape
    out = [f'<section class="midtrain-eval" data-videos-ok="0" data-videos-total="0"><style>{STYLE}</style>'
           f"<h2>{esc(title)}</h2>"]
    out.append(
        f"<p>Policy <code>{esc(str(results.get('policy', '')))}</code> on <b>{esc(bench)}</b>: "
        f"{protocol.get('episodes_per_task')} episodes per task, at most {protocol.get('max_steps')} steps, "
        f"seed {protocol.get('seed')} ({esc(str(protocol.get('initial_states', '')))}). Success: "
        f"{esc(str(protocol.get('success', '')))}. Observations: {obs.get('height')}×{obs.get('width')} "
        f"{esc(', '.join(obs.get('cameras', {})))}, {esc(frames)}.</p>"
    )
    out.extend(f'<p class="warning">Warning: {esc(w)}</p>' for w in obs.get("warnings") or ())
    out.append('<table><tr><th class="text">task</th><th class="text">instruction</th><th>successes</th>'
               "<th>rate</th><th>95% CI (Wilson)</th><th>mean length</th><th>errors</th></tr>")  # fmt: skip
    for task, t in results.get("tasks", {}).items():
        out.append(
            f'<tr><td class="text">{esc(task)}</td><td class="text">{esc(t["instruction"])}</td>'
            f'<td>{t["successes"]}/{t["episodes"]}</td><td>{_fmt(t["success_rate"])}</td>'
            f'<td>{_fmt(t["ci95"][0])}–{_fmt(t["ci95"][1])}</td><td>{_fmt(t["mean_length"], 1)}</td><td>{t["errors"]}</td></tr>'
        )
    lo, hi = results.get("mean_success_ci95", [None, None])
    out.append(
        f'<tr class="mean"><td class="text">mean over tasks</td><td class="text"></td>'
        f'<td>{results.get("successes")}/{results.get("episodes")}</td><td>{_fmt(results.get("mean_success"))}</td>'
        f'<td>{_fmt(lo)}–{_fmt(hi)}</td><td></td><td>{results.get("errors", 0)}</td></tr></table>'
    )
    with_video = [e for e in episodes if e.get("video") and (eval_dir / e["video"]).is_file()]
    if with_video:
        out.append('<div class="videos">')
        for e in with_video:
            src = _video_src(eval_dir / e["video"], embed_videos, relative_to)
            verdict = f"success in {e['length']} steps" if e["success"] else esc(e["failure"] or e["outcome"])
            out.append(
                f'<figure><video src="{src}" muted loop autoplay playsinline controls preload="auto"></video>'
                f'<figcaption>{esc(e["task"])} · episode {e["episode"]} · seed {e["seed"]} · {verdict}</figcaption></figure>'
            )
        out.append("</div>")
    out.append(_SCRIPT + "</section>")
    return "\n".join(out)


def eval_page_html(eval_dir: Path | str, embed_videos: bool = True, relative_to: Optional[Path] = None) -> str:
    """A whole HTML page around :func:`eval_section_html`."""
    section = eval_section_html(eval_dir, embed_videos, relative_to)
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>midtrain eval</title>"
            f"<style>body {{ font-family: sans-serif; margin: 1.5em; }}</style></head><body>{section}</body></html>")  # fmt: skip


def check_videos_in_browser(html_path: Path | str, timeout_s: float = 90) -> dict[str, int]:
    """Load a page with eval sections headless; ``{"videos_ok", "videos_total"}`` summed over sections."""
    from ..browser import CHROMIUM_FLAGS, find_chromium

    url = Path(html_path).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="midtrain-chromium-") as profile:
        cmd = [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--autoplay-policy=no-user-gesture-required",
               "--virtual-time-budget=15000", "--dump-dom", url]  # fmt: skip
        dom = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if dom.returncode != 0:
        raise RuntimeError(f"chromium failed on {html_path}: {dom.stderr.strip()[-500:]}")
    sections = re.findall(r'<section class="midtrain-eval"[^>]*>', dom.stdout)
    if not sections:
        raise RuntimeError(f"{html_path}: no evaluation section in the page")
    ok = sum(int(m) for s in sections for m in re.findall(r'data-videos-ok="(\d+)"', s))
    total = sum(int(m) for s in sections for m in re.findall(r'data-videos-total="(\d+)"', s))
    return {"videos_ok": ok, "videos_total": total}
