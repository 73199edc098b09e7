"""The study's figures (PNG, Agg canvas) and its HTML section: one table and the curves.

:func:`study_section_html` returns a self-contained ``<section class="midtrain-study">`` (its own
style; figures embedded as data URIs) for the run report; :func:`study_page_html` wraps it in a
page (``<run>/study/study.html``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Optional

from ...figures import new_figure, png_data_uri, save_png

STUDY_FILE = "study.json"
FIGURES = {"success": "success.png", "curves": "success_curves.png", "cka": "cka.png"}
STYLE = """
.midtrain-study table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.85em; }
.midtrain-study th, .midtrain-study td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; }
.midtrain-study td.text, .midtrain-study th.text { text-align: left; }
.midtrain-study tr.baseline td { background: #f4f4f4; }
.midtrain-study .figs { display: flex; flex-wrap: wrap; gap: 10px; }
.midtrain-study img { max-width: 48%; border: 1px solid #ddd; }
.midtrain-study .note { color: #555; font-size: 0.85em; }
.midtrain-study .warn { color: #8a4b00; font-size: 0.9em; }
"""


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def write_figures(results: dict[str, Any], out_dir: Path) -> dict[str, str]:
    """Write the figures a study has numbers for; returns ``{figure: file name}``."""
    rows = results["rows"]
    names = list(rows)
    colors = dict(zip(names, _colors(len(names))))
    written: dict[str, str] = {}
    with_success = [n for n in names if rows[n].get("success")]
    if with_success:
        fig = new_figure(max(4.0, 1.1 * len(with_success) + 1.5), 3.6)
        ax = fig.add_subplot(1, 1, 1)
        for i, n in enumerate(with_success):
            s = rows[n]["success"]
            lo, hi = s["ci95"]
            ax.errorbar([i], [s["mean"]], yerr=[[s["mean"] - lo], [hi - s["mean"]]], fmt="o", color=colors[n], capsize=4, ms=7)
            ax.scatter([i + 0.15] * len(s["per_seed"]), s["per_seed"], s=12, color=colors[n], alpha=0.5)
        ax.set_xticks(range(len(with_success)), with_success, rotation=20, fontsize=8)
        ax.set_ylabel("closed-loop success (mean over tasks)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("success per row: mean, 95% interval, seeds (dots)", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        save_png(fig, out_dir / FIGURES["success"], bbox_inches="tight")
        written["success"] = FIGURES["success"]
    with_curve = [n for n in names if rows[n].get("curve")]
    if with_curve and any(len(rows[n]["curve"]) > 1 for n in with_curve):
        fig = new_figure(6.4, 3.8)
        ax = fig.add_subplot(1, 1, 1)
        for n in with_curve:
            pts = rows[n]["curve"]
            steps = [p["step"] for p in pts]
            ax.plot(steps, [p["mean"] for p in pts], "o-", color=colors[n], lw=1.5, ms=4, label=n)
            ax.fill_between(steps, [p["ci95"][0] for p in pts], [p["ci95"][1] for p in pts], color=colors[n], alpha=0.12)
        ax.set_xlabel("VLA training step")
        ax.set_ylabel("closed-loop success")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("training dynamics: success vs VLA steps (mean over seeds, 95% band)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save_png(fig, out_dir / FIGURES["curves"], bbox_inches="tight")
        written["curves"] = FIGURES["curves"]
    with_cka = [n for n in names if rows[n].get("cka", {}).get("vlm") or rows[n].get("cka", {}).get("vla")]
    if with_cka:
        fig = new_figure(6.4, 3.8)
        ax = fig.add_subplot(1, 1, 1)
        for n in with_cka:
            c = rows[n]["cka"]
            if c.get("vlm"):
                ax.plot(range(len(c["vlm"])), c["vlm"], "o-", color=colors[n], lw=1.5, ms=3, label=f"{n}: VLM")
            for seed, values in sorted(c.get("vla", {}).items()):
                ax.plot(range(len(values)), values, "--", color=colors[n], lw=1, label=f"{n}: VLA s{seed}")
        ax.set_xlabel("layer (0 = input embeddings)")
        ax.set_ylabel("linear CKA to the base VLM")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("representation drift on robot frames", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
        save_png(fig, out_dir / FIGURES["cka"], bbox_inches="tight")
        written["cka"] = FIGURES["cka"]
    return written


def _f(x: Optional[float], digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(s: Optional[dict], digits: int = 2) -> str:
    if not s or s.get("mean") is None:
        return "–"
    ci = s.get("ci95")
    return _f(s["mean"], digits) + (f" [{_f(ci[0], digits)}, {_f(ci[1], digits)}]" if ci else "")


def _offline(s: Optional[dict], digits: int = 2) -> str:
    """An offline number over seeds: with fewer than 3 seeds the seeds themselves (a t-interval on
    1 or 2 degrees of freedom says nothing), else the mean and its interval."""
    if s and s.get("values") and len(s["values"]) < 3:
        return _f(s["mean"], digits) + " (seeds " + ", ".join(_f(v, digits) for v in s["values"]) + ")"
    return _ci(s, digits)


HEADLINE = "learned - random"  # the seed's headline comparison: selected vs a random selection of the same size


def comparisons(res: dict[str, Any]) -> list[tuple[str, dict]]:
    """Every paired comparison of a study, ``"a - b" -> {mean, ci95, ...}``: the headline first, then
    the other pairs, then each row minus the baseline."""
    pairs = list(res.get("pairwise", {}).items())
    pairs.sort(key=lambda kv: kv[0] != HEADLINE)
    base = res["baseline_row"]
    return pairs + [(f"{n} - {base}", r["vs_baseline"]) for n, r in res["rows"].items() if r.get("vs_baseline")]


def power_sentence(key: str, d: dict) -> str:
    """One sentence: what this comparison can detect, and what the target difference would take."""
    m = d.get("minimum_detectable_difference")
    if not m:
        return ""
    a, b = key.split(" - ")
    eps = m["episodes_per_task"]
    eps_text = str(eps[0]) if len(set(eps)) == 1 else "/".join(map(str, eps))
    layout = f"With {m['seeds']} seed{'s' if m['seeds'] != 1 else ''} x {eps_text} episodes per task"
    level = f"({100 * m['power']:.0f}% power, two-sided {100 * m['alpha']:g}%)"
    if m["value"] >= 1:
        out = f"{layout}, this study cannot detect any difference between {a} and {b} {level}"
    else:
        out = f"{layout}, this study can detect differences of {100 * m['value']:.0f} points or more between {a} and {b} {level}"
    best = m.get("cheapest_for_target")
    if best:
        out += (f"; {100 * m['target_difference']:.0f} points would take {best['seeds']} seeds x "
                f"{best['episodes_per_task']} episodes per task ({best['episodes_per_row']} per row)")
    elif m.get("target_difference") is not None:
        out += f"; {100 * m['target_difference']:.0f} points is out of reach of the seed counts tried"
    return out + "."


def control_sentence(key: str, d: dict) -> str:
    """One sentence per control: how much success comes from vision (baseline - blind), what the
    language model adds (baseline - vision_tower), with the paired interval and whether it resolves it."""
    base, control = key.split(" - ")
    lo, hi = d.get("ci95") or (None, None)
    numbers = f"{base} - {control} = {d['mean']:+.2f}" + (f" [{lo:+.2f}, {hi:+.2f}]" if lo is not None else "")
    if d["measures"] == "vision":
        head = f"How much success comes from vision: {numbers} ({control}: {d['what']})"
        verdict = ("the camera image adds success" if lo is not None and lo > 0 else
                   "the blind policy does better, so the VLA's image features hurt" if hi is not None and hi < 0 else
                   "not resolved (the interval includes 0): these VLAs are not shown to use the image")  # fmt: skip
    else:
        head = f"What the language model adds: {numbers} ({control}: {d['what']})"
        verdict = ("the language model adds success over the VLM's own pooled vision features" if lo is not None and lo > 0 else
                   "the language model removes success: the pooled vision features alone do better" if hi is not None and hi < 0 else
                   "not resolved (the interval includes 0)")  # fmt: skip
    return f"{head}; {verdict}."


def _img(path: Path, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="{png_data_uri(path)}">'


def _steps_text(row: dict) -> str:
    parts = [f"{s['kind']}({json.dumps(s['data']) if s['data'] is not None else ''})" for s in row["steps"]]
    if row.get("control"):
        return f"study VLM, control: {row['control']}"
    start = "random weights" if row["init"] == "random_weights" else "study VLM"
    return " → ".join([start, *parts])


def study_section_html(study_dir: Path | str, title: str = "Does mid-training make a better VLA? (midtrain study)",
                       json_path: Optional[Path] = None) -> str:  # fmt: skip
    """The report section of a study folder: protocol, warnings, the table, the paired comparisons
    with what each can detect, the figures. ``json_path``: the study.json the footer names (default
    the folder's; the study writes its page before the folder takes its final name)."""
    study_dir = Path(study_dir)
    res = json.loads((study_dir / STUDY_FILE).read_text())
    esc = html.escape
    p = res["protocol"]
    ev = p.get("eval", {})
    out = [f'<section class="midtrain-study"><style>{STYLE}</style>' + (f"<h2>{esc(title)}</h2>" if title else "")]
    tasks = ", ".join(ev.get("tasks") or []) or "the benchmark's default tasks"
    out.append(
        f"<p>Every row trains the same VLA recipe on the same robot data over seeds {esc(str(p['seeds']))}; "
        f"closed loop on {esc(p['benchmark'])} ({esc(tasks)}), {ev.get('episodes_per_task')} episodes per task "
        f"from the same initial states for every row and seed (eval seed {ev.get('seed')}). Intervals: "
        f"{esc(p['success_interval'])}. Offline numbers: {esc(p['offline_interval'])}.</p>"
    )
    b = res.get("budgets", {})
    if not b.get("midtrain_equal", True) or not b.get("vla_equal", True):
        out.append(f'<p class="note"><b>Unequal budgets</b>: mid-training samples {esc(json.dumps(b.get("midtrain_samples")))}, '
                   f'VLA samples {esc(json.dumps(b.get("vla_samples")))}.</p>')  # fmt: skip
    warnings = res.get("warnings") or []
    if warnings:
        out.append('<p class="warn"><b>Warnings</b></p><ul class="warn">'
                   + "".join(f"<li>{esc(w['message'])}</li>" for w in warnings) + "</ul>")  # fmt: skip
    tasks_shown = next((list(r["success"]["per_task"]) for r in res["rows"].values() if r.get("success")), [])
    out.append(
        '<table><tr><th class="text">row</th><th class="text">initialisation</th><th>mid-training samples</th>'
        "<th>success [95%]</th><th>vs " + esc(res["baseline_row"]) + " [95%]</th><th>per seed</th>"
        + "".join(f"<th>{esc(t)}</th>" for t in tasks_shown) +
        "<th>held-out L1 [95%]</th><th>gripper acc.</th><th>probe L1</th><th>MMD(mixture, VLA)</th>"
        "<th>diversity</th><th>CKA last layer</th></tr>"
    )
    for name, r in res["rows"].items():
        mix = r.get("mixture") or {}
        cka = (r.get("cka") or {}).get("vlm")
        samples = sum(s["samples_seen"] or 0 for s in r["steps"] if s["kind"] == "sft")
        per_seed = ", ".join(_f(v["success"]) for _, v in sorted(r["seeds"].items(), key=lambda kv: int(kv[0])))
        cls = ' class="baseline"' if name == res["baseline_row"] else ""
        out.append(
            f'<tr{cls}><td class="text">{esc(name)}</td><td class="text">{esc(_steps_text(r))}</td><td>{samples or "–"}</td>'
            f"<td>{_ci(r.get('success'))}</td><td>{_ci(r.get('vs_baseline'))}</td><td>{per_seed}</td>"
            + "".join(f"<td>{_f(((r.get('success') or {}).get('per_task') or {}).get(t))}</td>" for t in tasks_shown)
            + f"<td>{_offline(r.get('offline_l1'), 3)}</td><td>{_offline(r.get('offline_gripper_accuracy'))}</td>"
            f"<td>{_offline((r.get('probe') or {}).get('l1'), 3)}</td><td>{_f(mix.get('mmd_to_vla'), 3)}</td>"
            f"<td>{_f(mix.get('diversity'), 2)}</td><td>{_f(cka[-1] if cka else None, 3)}</td></tr>"
        )
    out.append("</table>")
    pairs = comparisons(res)
    if pairs:
        out.append('<table class="pairs"><tr><th class="text">paired difference</th><th>mean [95%]</th>'
                   "<th>replicates above 0</th><th>detectable at 80% power</th></tr>")  # fmt: skip
        for key, d in pairs:
            mdd = (d.get("minimum_detectable_difference") or {}).get("value")
            cls = ' class="baseline"' if key == HEADLINE else ""
            out.append(f'<tr{cls}><td class="text">{esc(key)}</td><td>{_ci(d)}</td>'
                       f"<td>{_f(d.get('share_of_replicates_above_0'))}</td><td>{_f(mdd)}</td></tr>")  # fmt: skip
        out.append("</table><ul class=\"note\">" + "".join(f"<li>{esc(power_sentence(k, d))}</li>" for k, d in pairs
                                                          if d.get("minimum_detectable_difference")) + "</ul>")  # fmt: skip
    controls = res.get("controls") or {}
    if controls:
        out.append('<ul class="note">' + "".join(f"<li>{esc(control_sentence(k, d))}</li>" for k, d in controls.items()) + "</ul>")
    seq = res.get("sequential")
    if seq:
        decided = ", ".join(f"{k} {'decided at round ' + str(v['look']) if v['decided'] else 'not decided'} (z {v['z']})"
                            for k, v in seq["comparisons"].items())  # fmt: skip
        out.append(f'<p class="note">Sequential evaluation: {seq["rounds_run"]} of at most {seq["rounds"]} rounds of '
                   f"{seq['episodes_per_task_per_round']} episodes per task ({esc(seq['stopped'])}); {esc(decided)}; "
                   f"boundaries {seq['boundaries']} ({esc(seq['spending'])} alpha spending, {seq['alpha']:g} two-sided).</p>")  # fmt: skip
    figs = [study_dir / f for f in (res.get("figures") or {}).values() if (study_dir / f).is_file()]
    if figs:
        out.append('<div class="figs">' + "".join(_img(f, f.stem) for f in figs) + "</div>")
    cost = res.get("cost", {})
    out.append(f'<p class="note">Compute: {_f(cost.get("total_wall_s"), 0)} s summed over the sub-stages; every number '
               f"with its seed and source file is in <code>{esc(str(json_path or study_dir / STUDY_FILE))}</code>.</p></section>")  # fmt: skip
    return "\n".join(out)


def study_page_html(study_dir: Path | str, json_path: Optional[Path] = None) -> str:
    section = study_section_html(study_dir, json_path=json_path)
    return ("<!doctype html><html><head><meta charset=\"utf-8\"><title>midtrain study</title>"
            f"<style>body {{ font-family: sans-serif; margin: 1.5em; }}</style></head><body>{section}</body></html>")  # fmt: skip
