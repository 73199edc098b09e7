"""``midtrain report``: one self-contained HTML file with every stage's figures and tables.

Reads only artefacts (manifests, JSON, Parquet, PNG) from the run directory, so it can be
re-run at any time and shows whatever stages have completed; a stage that has not run is
listed as such rather than silently left out. Images are embedded as data URIs, so the
file can be mailed or attached to a paper review without its run directory.

Output: ``<run>/report/report.html``.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from ..figures import png_data_uri
from ..runs import RunDir, listed_files, stage_run, write_text_atomic
from ..stages import PIPELINE, STAGES
from .config import ReportConfig

# the run-directory folders of the stages a report covers, in pipeline order
REPORTED = tuple(STAGES[name].dir_name for name in PIPELINE if name != "report")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _img_tag(path: Path, alt: str, width: str = "100%") -> str:
    if not path.exists():
        return f'<p class="missing">figure not found: {html.escape(path.name)}</p>'
    return f'<img class="fig" alt="{html.escape(alt)}" style="max-width:{width}" src="{png_data_uri(path)}">'


def _png_data_uri(image: Any, max_px: int) -> str:
    image = image.copy()
    image.thumbnail((max_px, max_px))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _table(rows: list[dict], columns: list[str] | None = None, floatfmt: str = "{:.4g}") -> str:
    if not rows:
        return "<p>(empty)</p>"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return floatfmt.format(v)
        if isinstance(v, (dict, list)):
            return html.escape(json.dumps(v))
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(r.get(c, ''))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def stage_folders(run: RunDir) -> list[str]:
    """The stage folders a report covers: the pipeline's, in order, then any other complete stage
    folder of the run (several sft / vla runs share a run directory by ``name``; eval, etc, study)."""
    extra = sorted(
        p.name for p in run.root.iterdir()
        if p.is_dir() and not p.name.startswith(".") and p.name not in REPORTED and p.name != "report"
        and (run.manifest(p.name) or {}).get("status") == "complete"
    ) if run.root.exists() else []  # fmt: skip
    return list(REPORTED) + extra


def _run_summary(run: RunDir, max_error_lines: int) -> str:
    rows, errors = [], []
    folders = stage_folders(run)
    for stage in folders:
        man = run.manifest(stage)
        if man is None:
            rows.append({"stage": stage, "status": "not run"})
            continue
        counts = man.get("counts", {})
        rows.append(
            {
                "stage": stage,
                "status": man.get("status"),
                "wall_s": man.get("timings", {}).get("wall_s"),
                "read": counts.get("read", ""),
                "written": counts.get("written", ""),
                "skipped": counts.get("skipped_total", 0),
                "skip reasons": counts.get("skipped") or "",
            }
        )
        err_file = run.stage_dir(stage) / "errors.jsonl"
        if err_file.exists():
            lines = err_file.read_text().splitlines()
            for line in lines[:max_error_lines]:
                rec = json.loads(line)
                errors.append({"stage": stage, **{k: rec.get(k) for k in ("id", "reason", "where", "detail")}})
            if len(lines) > max_error_lines:
                errors.append({"stage": stage, "reason": f"... {len(lines) - max_error_lines} more in {err_file}"})
    out = _table(rows, ["stage", "status", "wall_s", "read", "written", "skipped", "skip reasons"])
    out += "<h3>Skipped samples</h3>" + (_table(errors) if errors else "<p>None: no sample was skipped.</p>")
    configs = []
    for stage in folders:
        man = run.manifest(stage)
        if man:
            cfg = html.escape(json.dumps(man.get("config", {}), indent=1))
            configs.append(f"<details><summary>{stage} config</summary><pre>{cfg}</pre></details>")
    versions = next((m.get("versions") for s in folders if (m := run.manifest(s))), None) or {}
    out += "<h3>Configs</h3>" + "".join(configs)
    out += "<h3>Versions</h3>" + _table([versions]) if versions else ""
    return out


def _gap_section(run: RunDir) -> str:
    gap = run.stage_dir("gap")
    summary = _read_json(gap / "summary.json")
    if run.manifest("gap") is None or summary is None:
        return '<p class="missing">The gap stage has not run.</p>'
    parts = ['<div class="row">', _img_tag(gap / "mmd_heatmap.png", "MMD heatmap", "48%")]
    parts.append(_img_tag(gap / "tsne.png", "t-SNE map", "48%"))
    parts.append("</div>")
    means = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))}
    parts.append("<h3>Group means</h3>" + _table([means]))
    ranking = summary.get("vlm_ranking")
    if ranking:
        rows = ranking if isinstance(ranking[0], dict) else [{"source": s, "mmd_to_vla": d} for s, d in ranking]
        parts.append("<h3>VLM sources ranked by distance to the VLA group</h3>" + _table(rows))
    mmd_path = gap / "mmd.parquet"
    if mmd_path.exists():
        import pyarrow.parquet as pq

        parts.append("<details><summary>All pairs (MMD², p-values)</summary>" + _table(pq.read_table(mmd_path).to_pylist()) + "</details>")
    return "".join(parts)


def _loss_curve_png(curve: list[dict], out: Path) -> Path | None:
    keys = [k for k in ("train_loss", "val_loss") if curve and k in curve[0]]
    if not keys:
        return None
    from ..figures import new_figure, save_png

    fig = new_figure(5, 3, dpi=100)
    ax = fig.subplots()
    for k in keys:
        ax.plot([r.get("epoch", i) for i, r in enumerate(curve)], [r[k] for r in curve], label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("BCE loss")
    ax.legend()
    fig.tight_layout()
    save_png(fig, out)
    return out


def _fit_section(run: RunDir, st_dir: Path) -> str:
    man = run.manifest("fit")
    if man is None:
        return '<p class="missing">The fit stage has not run.</p>'
    standard = {"stage", "status", "fingerprint", "config", "inputs", "versions", "counts", "timings"}
    extras = {k: v for k, v in man.items() if k not in standard}
    curve = None
    for key in ("curve", "loss_curve", "history"):
        if isinstance(extras.get(key), list):
            curve = extras.pop(key)
    metrics = {k: v for k, v in extras.items() if not isinstance(v, (list, dict))}
    nested = {k: v for k, v in extras.items() if isinstance(v, dict)}
    out = _table([metrics]) if metrics else ""
    for k, v in nested.items():
        flat = {kk: vv for kk, vv in v.items() if not isinstance(vv, (list, dict))}
        if flat:
            out += f"<h3>{html.escape(k)}</h3>" + _table([flat])
    if curve:
        png = _loss_curve_png(curve, st_dir / "loss_curve.png")
        if png:
            out += _img_tag(png, "estimator loss curve", "50%")
    return out


def _gallery(run: RunDir, gallery: dict, n: int, px: int) -> str:
    """Top and bottom samples with their images, looked up in the catalog by id."""
    from ..data.catalog import catalog_rows_by_id
    from ..data.images import load_image
    from ..runs import SampleError

    wanted = [item["id"] for side in ("top", "bottom") for item in (gallery.get(side) or [])[:n]]
    rows: dict[str, dict] = {}
    if run.manifest("catalog") is not None and wanted:
        rows = catalog_rows_by_id(run.stage_dir("catalog"), wanted, ["id", "image_refs", "messages"])
    out = []
    for side, title in (("top", "Highest-scoring samples"), ("bottom", "Lowest-scoring samples")):
        cards = []
        for item in (gallery.get(side) or [])[:n]:
            row = rows.get(item["id"], {})
            img_html = ""
            for ref in (row.get("image_refs") or [])[:1]:
                try:
                    img_html = f'<img class="thumb" alt="{html.escape(item["id"])}" src="{_png_data_uri(load_image(ref), px)}">'
                except SampleError as exc:
                    img_html = f'<p class="missing">{html.escape(str(exc))}</p>'
            turns = row.get("messages") or item.get("messages") or []
            text = "".join(
                f"<p><b>{html.escape(t['role'][0].upper())}:</b> {html.escape(t['content'].replace('<image>', '').strip()[:300])}</p>"
                for t in turns[:4]
            ) or html.escape(str(item.get("text", "")))
            score = item.get("score")
            head = f"{html.escape(item.get('source', ''))} · score {score:.4f}" if isinstance(score, float) else html.escape(item["id"])
            cards.append(f'<div class="card"><div class="cardhead">{head}</div>{img_html}{text}</div>')
        out.append(f"<h3>{title}</h3><div class='gallery'>{''.join(cards) or '<p>(none)</p>'}</div>")
    return "".join(out)


def _select_section(run: RunDir, cfg: ReportConfig) -> str:
    sel = run.stage_dir("select")
    if run.manifest("select") is None:
        return '<p class="missing">The select stage has not run.</p>'
    parts = []
    metrics = _read_json(sel / "selection_metrics.json") or {}
    flat = {k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}
    if flat:
        parts.append("<h3>Selection objective and diversity</h3>" + _table([flat]))
    for k, v in metrics.items():
        if isinstance(v, dict) and v and all(not isinstance(x, (list, dict)) for x in v.values()):
            parts.append(f"<h4>{html.escape(k)}</h4>" + _table([v]))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            parts.append(f"<h4>{html.escape(k)}</h4>" + _table(v))
    report = sel / "report"
    parts.append('<div class="row">')
    for name, alt in (("score_distributions.png", "per-source score distributions"),
                      ("pool_vs_selection.png", "pool vs selection shares")):  # fmt: skip
        parts.append(_img_tag(report / name, alt, "48%"))
    parts.append("</div>")
    gallery = _read_json(report / "gallery.json")
    if gallery:
        parts.append(_gallery(run, gallery, cfg.gallery_size, cfg.thumbnail_px))
    return "".join(parts)


def _export_section(run: RunDir) -> str:
    man = run.manifest("export")
    if man is None:
        return '<p class="missing">The export stage has not run.</p>'
    files = [p for p in listed_files(run.stage_dir("export"), "*") if p.is_file() and p.suffix in (".json", ".jsonl", ".parquet")]
    rows = [{"file": str(p), "bytes": p.stat().st_size} for p in files]
    return _table([man.get("counts", {})]) + _table(rows)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
h1{border-bottom:2px solid #444} h2{margin-top:2em;border-bottom:1px solid #bbb}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em;display:block;overflow-x:auto;max-width:100%} td,th{border:1px solid #ccc;padding:3px 6px;text-align:left}
th{background:#f0f0f0} .fig{margin:4px;border:1px solid #ddd} .row{display:flex;flex-wrap:wrap;gap:8px}
.missing{color:#a00} .gallery{display:flex;flex-wrap:wrap;gap:10px}
.card{width:220px;border:1px solid #ccc;border-radius:4px;padding:6px;font-size:.8em}
.cardhead{font-weight:bold;margin-bottom:4px} .thumb{width:100%;image-rendering:auto} pre{font-size:.75em;max-height:300px;overflow:auto}
"""

# Marks the document once every image has loaded (or failed), so a headless browser
# can check that the figures really decode: data-images-ok / data-images-total.
CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  document.documentElement.setAttribute('data-images-ok', ok);
  document.documentElement.setAttribute('data-images-total', imgs.length);
});
"""


def _sft_section(folder: Path, man: dict) -> str:
    """Mid-training: loss curves, the drawn composition, trainable parameters per module."""
    train = man.get("train", {})
    cfg = man.get("config", {})
    summary = {"model": cfg.get("model"), "mode": cfg.get("mode"), "vision": cfg.get("vision"),
               **{k: train.get(k) for k in ("steps", "train_loss", "eval_loss", "samples", "samples_per_s") if k in train}}  # fmt: skip
    out = _table([summary])
    out += _img_tag(folder / "loss_curves.png", "loss curves", "48%") + _img_tag(folder / "composition.png", "composition", "48%")
    composition = man.get("composition") or {}
    per = composition.get("sources") or {}
    if per:
        out += "<h4>Drawn composition</h4>" + _table([{"source": k, **v} for k, v in sorted(per.items())])
    params = man.get("parameters") or {}
    if isinstance(params, dict) and params:
        out += "<h4>Parameters</h4>" + _table([{"module": k, **(v if isinstance(v, dict) else {"count": v})} for k, v in params.items()])
    return out


def _vla_section(folder: Path, man: dict) -> str:
    """Policy training: loss curve, closed-loop success against steps, held-out metrics."""
    train = man.get("train", {})
    policy = (man.get("policy_config") or {}).get("settings", {})
    cfg = man.get("config", {})
    summary = {"backbone": cfg.get("model") or cfg.get("init_policy"), "head": policy.get("head"),
               "chunk_size": policy.get("chunk_size"), "trainable": (cfg.get("backbone") or {}).get("trainable"),
               **{k: v for k, v in train.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}  # fmt: skip
    out = _table([summary])
    out += _img_tag(folder / "loss_curves.png", "loss curves", "48%")
    if (folder / "closed_loop.png").exists():
        out += _img_tag(folder / "closed_loop.png", "closed-loop success against training steps", "48%")
    return out


def _eval_section(folder: Path) -> str:
    from ..eval.html import eval_section_html

    return eval_section_html(folder, embed_videos=True)


def _other_sections(run: RunDir) -> list[tuple[str, str]]:
    """Sections for the training and evaluation stages found in the run, by what their folder holds."""
    out = []
    for name in stage_folders(run):
        folder, man = run.stage_dir(name), run.manifest(name)
        if not man or man.get("status") != "complete":
            continue
        if "final_model" in man:
            out.append((f"Mid-training ({name})", _sft_section(folder, man)))
        elif "final_policy" in man:
            out.append((f"VLA policy ({name})", _vla_section(folder, man)))
        elif (folder / "results.json").exists() and (folder / "episodes.parquet").exists():
            out.append((f"Closed-loop evaluation ({name})", _eval_section(folder)))
        elif (folder / "study.json").exists():
            from ..experiments.study.html import study_section_html

            out.append((f"Does mid-training make a better VLA? ({name})", study_section_html(folder, title="")))
    return out


def render_report(run: RunDir, cfg: ReportConfig, out_dir: Path) -> str:
    sections = [
        ("Distribution gap (MMD, t-SNE)", _gap_section(run)),
        ("Proximity estimator", _fit_section(run, out_dir)),
        ("Selection", _select_section(run, cfg)),
        ("Export", _export_section(run)),
        *_other_sections(run),
        ("Run summary", _run_summary(run, cfg.max_error_lines)),
    ]
    body = "".join(f"<h2>{html.escape(t)}</h2>{s}" for t, s in sections)
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(cfg.title)}</title>"
        f"<style>{CSS}</style><script>{CHECK_SCRIPT}</script></head><body>"
        f"<h1>{html.escape(cfg.title)}</h1><p>Run directory: <code>{html.escape(str(run.root.resolve()))}</code></p>"
        f"{body}</body></html>"
    )


def write_report(config: ReportConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Render ``<run>/report/report.html`` from the artefacts of the completed stages."""
    inputs = [run_dir.stage_dir(s) / "manifest.json" for s in stage_folders(run_dir)
              if (run_dir.stage_dir(s) / "manifest.json").exists()]  # fmt: skip
    with stage_run(run_dir, "report", config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        with st.timed("render"):
            page = render_report(run_dir, config, st.dir)
        write_text_atomic(st.dir / "report.html", page)
        st.counts["written"] = 1
        st.extra["report"] = str(st.final_dir / "report.html")
        st.log.info("report written to %s", st.dir / "report.html")
    return st.dir
