"""``midtrain eval``: a policy checkpoint in closed loop, into ``<run>/eval/``.

Writes ``episodes.parquet`` (one row per episode: task, seed, initial state, success, length,
outcome, failure reason, video, timings), ``results.json`` (per-task success with Wilson 95%
intervals, the mean over tasks, lengths, the observation settings used, time shares),
``videos/<task>/episode_NNN.mp4`` and ``eval.html`` (the report section as a page). The
checkpoint directory (and the corpus's ``info.json``) are inputs: a retrained policy reruns
the evaluation, a finished one with the same settings is not redone (``workers``, ``backend`` and ``ray`` aside).
"""

from __future__ import annotations

from pathlib import Path

from ..runs import RunDir, StageError, stage_run, write_text_atomic
from .config import EvalConfig

STAGE = "eval"
PAGE = "eval.html"


def run_eval(config: EvalConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Evaluate ``config.policy`` under ``config``'s protocol; returns the stage folder."""
    from .api import evaluate_policy
    from .codec import corpus_video_info
    from .html import eval_page_html
    from .policies import checkpoint_type

    checkpoint_type(config.policy)  # a missing or unreadable checkpoint fails before the stage starts
    inputs = {"policy": config.policy}
    if config.corpus is not None:
        inputs["corpus_info"] = corpus_video_info(config.corpus)[0]
    with stage_run(run_dir, STAGE, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        with st.timed("episodes"):
            results = evaluate_policy(config.policy, config, st.dir, log=st.log, progress=st.progress)
        st.counts["episodes"] = results["episodes"]
        st.counts["successes"] = results["successes"]
        st.counts["episode_errors"] = results["errors"]
        st.extra["mean_success"] = results["mean_success"]
        st.extra["mean_success_ci95"] = results["mean_success_ci95"]
        st.extra["success"] = {t: {k: v[k] for k in ("successes", "episodes", "success_rate", "ci95")}
                               for t, v in results["tasks"].items()}  # fmt: skip
        st.extra["observation"] = results["observation"]
        st.extra["timing"] = results["timing"]
        if not results["episodes"]:
            raise StageError("no episode ran")
        write_text_atomic(st.dir / PAGE, eval_page_html(st.dir))
    return st.dir
