"""One way to run a registered stage from a config mapping: the call ``midtrain <stage>``,
``midtrain run PIPELINE.yaml``, ``midtrain demo``, ``midtrain study`` and ``midtrain recipes`` make.

    runner = StageRunner(run_dir, name="study")
    out = runner.run("sft", {"model": ..., "train": {...}})        # -> the stage's output folder
    out = runner.run("score", mapping, run_dir=sub, label="selections/learned/score")
    runner.timed("cka", lambda: measure_drift(cka_config, run_dir))  # a step that is no registered stage
    runner.call("demo", run_demo, world, run_dir)                     # a module-level step, on the executor
    outs = runner.run_wave([StageCall("vla", mapping, label="vla_base_s0"), ...])  # independent stages
    runner.records    # [{stage, wall_s, self_mb, children_mb}] in running order (memory: this process's)
    runner.seconds    # {label: wall seconds} of this invocation
    runner.failures   # [{stage, reason}]: sub-stages whose Ray worker died (the rest went on)

One call, top to bottom (:meth:`StageRunner.run`):

1. **the config**: the stage's defaults <- the mapping <- ``config_file`` (YAML) <- ``key=value``
   overrides (:func:`midtrain.config.load_config`, the CLI's order); a bad key fails in one line
   naming ``key``;
2. **the stage**: :func:`call_stage`, the stage function itself (a complete stage with the same
   config and inputs is skipped, as always), a plain function of picklable arguments that the
   executor (:mod:`midtrain.experiments.executors`) runs: here, or as a Ray task (``backend: ray``).
   :meth:`StageRunner.run_wave` hands the executor several independent stages at once;
3. **the cost**: wall seconds and peak resident memory after the call, kept in ``records``.

The results experiments read back are written once here too: per-task closed-loop successes
from an evaluation's ``episodes.parquet`` (:func:`episode_successes`), and :func:`deep_merge`,
how an experiment layers a step's keys over a shared recipe.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

from ..config import ConfigError, load_config
from ..runs import RunDir, StageError
from ..stages import STAGES
from .executors import Call, LocalExecutor, Outcome

T = TypeVar("T")


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, nested mappings merged key by key (a recipe's ``train:`` keeps the
    keys a step does not name)."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def peak_rss_mb() -> dict[str, float]:
    """Peak resident memory so far of this process and of its (finished) children, in MiB."""
    return {"self_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}  # fmt: skip


def stage_config(stage: str, mapping: Optional[dict[str, Any]] = None, config_file: Optional[Path] = None,
                 overrides: Sequence[str] = (), key: Optional[str] = None) -> Any:  # fmt: skip
    """The registered stage's config: defaults <- ``mapping`` <- ``config_file`` <- ``overrides``."""
    config_cls = STAGES[stage].load_config_class()
    try:
        return load_config(config_cls, config_file, list(overrides), base=mapping)
    except ConfigError as exc:
        raise ConfigError(f"{key or stage}: {exc}") from None


def call_stage(stage: str, config: Any, run_dir: RunDir, force: bool = False) -> Path:
    """Run the registered stage ``stage`` with its built ``config`` into ``run_dir``."""
    _, fn = STAGES[stage].load()
    return Path(fn(config, run_dir, force=force))


@dataclass
class StageCall:
    """One registered stage of a wave: ``stage`` with ``mapping`` into ``run_dir`` (default: the runner's)."""

    stage: str
    mapping: Optional[dict[str, Any]] = None
    run_dir: Optional[RunDir] = None
    label: Optional[str] = None  # names it in the records (default: the mapping's name, else the stage)
    key: Optional[str] = None  # names it in config errors


class StageRunner:
    """Runs registered stages into one run directory (or a nested one per call), timing each, on
    its executor (default: this process)."""

    def __init__(self, run_dir: RunDir, name: str = "midtrain", force: bool = False, executor: Any = None,
                 announce: bool = True):
        self.run_dir, self.name, self.force = run_dir, name, force
        self.executor = executor or LocalExecutor()
        self.log = logging.getLogger(f"midtrain.{name}")
        self.level = logging.INFO if announce else logging.DEBUG  # a lone CLI stage is not announced
        self.records: list[dict[str, Any]] = []
        self.failures: list[dict[str, str]] = []

    @property
    def seconds(self) -> dict[str, float]:
        return {r["stage"]: r["wall_s"] for r in self.records}

    def run(self, stage: str, mapping: Optional[dict[str, Any]] = None, *, run_dir: Optional[RunDir] = None,
            label: Optional[str] = None, key: Optional[str] = None, config_file: Optional[Path] = None,
            overrides: Sequence[str] = ()) -> Path:  # fmt: skip
        """Run ``stage`` with ``mapping`` (see the module docstring); ``label`` names it in the
        records (default: its folder name in the mapping, else the stage), ``key`` in errors."""
        return self._one(self._build(StageCall(stage, mapping, run_dir, label, key), config_file, overrides))

    def run_wave(self, calls: Sequence[StageCall]) -> dict[str, Optional[Path]]:
        """Run independent stages at once on the executor; ``{label: output folder, or None when its
        worker died}`` (the reason is in :attr:`failures`). Every config is built before any runs."""
        return {o.label: o.value for o in self._execute([self._build(c) for c in calls])}

    def _build(self, c: StageCall, config_file: Optional[Path] = None, overrides: Sequence[str] = ()) -> Call:
        config = stage_config(c.stage, c.mapping, config_file, overrides, c.key)
        label = c.label or (c.mapping or {}).get("name") or c.stage
        return Call(label, call_stage, (c.stage, config, c.run_dir or self.run_dir, self.force), getattr(config, "device", None))

    def call(self, label: str, fn: Callable[..., T], *args: Any, device: Optional[str] = None) -> T:
        """``fn(*args)`` (a module-level step that is no registered stage) on the executor."""
        return self._one(Call(label, fn, args, device))

    def check(self, devices: Sequence[Optional[str]]) -> None:
        """Before any work: the executor can run a sub-stage on each of ``devices`` (one-line error if not)."""
        self.executor.check([self.executor.resources(Call("check", call_stage, (), d)) for d in devices])

    def _one(self, call: Call) -> Any:
        (out,) = self._execute([call])
        if not out.ok:
            raise StageError(f"{call.label}: did not finish ({out.error}); rerun to continue")
        return out.value

    def _execute(self, calls: list[Call]) -> list[Outcome]:
        for c in calls:
            self.log.log(self.level, "%s: %s", self.name, c.label)
        outcomes = self.executor.run(calls)
        peak = peak_rss_mb()
        for o in outcomes:
            self.records.append({"stage": o.label, "wall_s": o.wall_s, **peak})
            if o.ok:
                self.log.log(self.level, "%s: %s done (%.1fs)", self.name, o.label, o.wall_s)
            else:
                self.failures.append({"stage": o.label, "reason": o.error})
        return outcomes

    def timed(self, label: str, fn: Callable[[], T]) -> T:
        """Call ``fn`` and record its wall time and the peak memory after it under ``label``."""
        self.log.log(self.level, "%s: %s", self.name, label)
        t0 = time.perf_counter()
        out = fn()
        self.records.append({"stage": label, "wall_s": round(time.perf_counter() - t0, 2), **peak_rss_mb()})
        self.log.log(self.level, "%s: %s done (%.1fs)", self.name, label, self.records[-1]["wall_s"])
        return out


def episode_successes(episodes_parquet: Path) -> dict[str, list[bool]]:
    """``{task: [success of episode 0, 1, ...]}`` from an evaluation's ``episodes.parquet``."""
    import pyarrow.parquet as pq

    rows = pq.read_table(episodes_parquet, columns=["task", "episode", "success"]).to_pylist()
    out: dict[str, list[bool]] = {}
    for r in sorted(rows, key=lambda r: r["episode"]):
        out.setdefault(r["task"], []).append(bool(r["success"]))
    return out
