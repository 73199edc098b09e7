"""Calibrating a study's world from the baseline and the controls only, before any row is compared.

A task at 0 or at 1 for every row adds evaluation cost and no information (the study warns:
:mod:`midtrain.experiments.study.caveats`). Whether a task is such a task can be decided without
the rows under comparison: if the baseline and the blind control (and any other control) agree at
0, or agree at 1, the world cannot show a difference there. ``calibrate: true`` runs the world, the
baseline row and the control rows only and writes ``calibration/calibration.json`` (beside
``calibration/study.json`` of those rows; the run directory's ``study/`` is left alone, and a full
study run later in the same directory reuses the world, the baseline's and the controls' VLAs)::

    {"rows": [base, blind, vision_tower], "per_task": {<row>: {<task>: success}},
     "drop": [{"task", "value"}],        # every calibrated row at that value (0 or 1)
     "keep": [<task>, ...],              # the tasks to put in eval.tasks / demo.tasks
     "controls": {"<base> - <control>": {mean, ci95, measures, minimum_detectable_difference}}}

Then set ``eval.tasks`` (and, for the embedded world, ``demo.tasks``) to ``keep`` and rerun the
study without ``calibrate`` in a new run directory (docs/study.md, "Calibration").
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

CALIBRATION_FILE = "calibration.json"
CALIBRATION_STAGE = "calibration"


def calibration_config(config):
    """``config`` reduced to the baseline row and the control rows, without probe, CKA or rounds."""
    rows = [r for r in config.rows if r.name == config.baseline_row or r.control]
    return replace(config, rows=rows, probe=replace(config.probe, enabled=False), cka=replace(config.cka, enabled=False),
                   sequential=replace(config.sequential, rounds=1), report=False)  # fmt: skip


def calibration_record(results: dict[str, Any]) -> dict[str, Any]:
    """``calibration.json`` (module docstring) from a study.json's content."""
    rows = results["rows"]
    names = [results["baseline_row"], *(n for n, r in rows.items() if r.get("control"))]
    per_task = {n: rows[n]["success"]["per_task"] for n in names if rows[n].get("success")}
    tasks = list(next(iter(per_task.values()), {}))
    drop = []
    for task in tasks:
        values = {p.get(task) for p in per_task.values()}
        if len(values) == 1 and values <= {0.0, 1.0}:
            drop.append({"task": task, "value": values.pop()})
    dropped = {d["task"] for d in drop}
    return {
        "rows": names, "per_task": per_task, "drop": drop, "keep": [t for t in tasks if t not in dropped],
        "controls": results.get("controls") or {},
        "rule": "a task is dropped when the baseline and every control row are all at 0 or all at 1 (every seed and episode)",
    }  # fmt: skip
