"""What a study's numbers cannot tell, said next to them (``study.json``'s ``warnings``, the page).

- **A task at 0 or at 1 in every row** (every seed, every episode) separates no row from another:
  it adds evaluation cost and no information, and pulls every row's mean towards the same value.
- **A zero-width interval** (a row's success, or a paired difference): the bootstrap saw no
  variation (e.g. every episode failed), which is not certainty; the detectable difference of
  the comparison (:mod:`midtrain.experiments.study.power`) says what the layout can resolve.
"""

from __future__ import annotations

from typing import Any


def saturated_tasks(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{task: 0.0 | 1.0}`` for the tasks whose success is that value in every row with a success."""
    per_task = [r["success"]["per_task"] for r in rows.values() if r.get("success")]
    if not per_task:
        return {}
    return {t: v for t, v in per_task[0].items() if v in (0.0, 1.0) and all(p.get(t) == v for p in per_task)}


def _zero_width(d: dict[str, Any] | None) -> bool:
    return bool(d and d.get("ci95") and d["ci95"][0] == d["ci95"][1])


def study_warnings(rows: dict[str, dict[str, Any]], pairwise: dict[str, dict[str, Any]], baseline: str) -> list[dict]:
    """The warnings of a study (module docstring): ``[{kind, subject | subjects, message}]``."""
    out = []
    n_rows = sum(1 for r in rows.values() if r.get("success"))
    for task, value in saturated_tasks(rows).items():
        out.append({"kind": "saturated_task", "subject": task, "value": value,
                    "message": f"task {task}: success {value:g} in every row ({n_rows}), seed and episode: it adds "
                               "evaluation cost and no information about the rows (drop it or change its difficulty)"})  # fmt: skip
    intervals = [(f"{name}: success", r.get("success")) for name, r in rows.items()]
    intervals += [(f"{name} - {baseline}", r.get("vs_baseline")) for name, r in rows.items()]
    intervals += list(pairwise.items())
    zero = [subject for subject, d in intervals if _zero_width(d)]
    if zero:  # one warning for all of them: a study where every episode fails has one per row and pair
        out.append({"kind": "zero_width_interval", "subjects": zero,
                    "message": f"zero-width 95% intervals ({'; '.join(zero)}): no seed or episode varied, which is not "
                               "certainty (see each comparison's detectable difference)"})  # fmt: skip
    return out
