"""Where an experiment's sub-stages run: in this process, one after the other (``backend: local``),
or as Ray tasks on a cluster (``backend: ray``), the cluster only making it faster.

An experiment hands the executor **waves** of independent :class:`Call`\\ s (every row's
mid-training; then every row x seed VLA training with its closed-loop evaluation) and gets one
:class:`Outcome` per call, in the order given::

    executor = make_executor(RaySettings(address="auto"), threads=1)   # or LocalExecutor(threads=1)
    executor.check([Resources(num_cpus=1, num_gpus=1)])      # before any work: some node can run it
    outcomes = executor.run([Call("vla_base_s0", call_stage, ("vla", config, run)), ...])

A call is a module-level function of picklable arguments (:func:`~.runner.call_stage` for every
registered stage): the Ray task runs that same function on a worker, which reads and writes the
run directory (a filesystem every node sees), so a sub-stage is an ordinary resumable stage folder
and a rerun of a killed driver skips every complete one. The driver only schedules and collects.

Failures: an exception the stage raises (a bad input, a :class:`~midtrain.runs.StageError`) is
raised on the driver as in a local run, once the rest of the wave has finished. A Ray worker or
node that dies (killed, out of memory) fails only its call: the outcome's ``error`` says why, the
experiment goes on with the rest and reports what is missing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

from ..config import ConfigError
from ..ray_cluster import Backend, RaySettings, check_fits, connect, live_nodes

__all__ = ["Backend", "Call", "LocalExecutor", "Outcome", "RayExecutor", "RaySettings", "Resources", "make_executor"]
log = logging.getLogger("midtrain.executors")


@dataclass(frozen=True)
class Resources:
    """What one call asks of a node."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0


@dataclass
class Call:
    """One sub-stage: ``fn(*args)`` (a module-level function of picklable arguments), named ``label``."""

    label: str
    fn: Callable[..., Any]
    args: tuple = ()
    device: Optional[str] = None  # the config's device (cpu, cuda, auto, ...): decides the GPUs asked for


@dataclass
class Outcome:
    """What became of one call: its return ``value``, or ``error`` (why it did not finish)."""

    label: str
    value: Any = None
    error: Optional[str] = None
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LocalExecutor:
    """Runs calls in this process, in order (today's behaviour): an exception stops the experiment."""

    threads: Optional[int] = None
    name: str = field(default="local", init=False)

    def check(self, requests: Sequence[Resources]) -> None:
        """Nothing to check: every call runs here, with this machine's devices."""

    def resources(self, call: Call) -> Resources:
        return Resources(float(self.threads or 1), 0.0)

    def run(self, calls: Sequence[Call]) -> list[Outcome]:
        out = []
        for call in calls:
            t0 = time.perf_counter()
            value = call.fn(*call.args)
            out.append(Outcome(call.label, value, wall_s=round(time.perf_counter() - t0, 2)))
        return out

    def close(self) -> None:
        pass


def _run_call(fn: Callable[..., Any], args: tuple, threads: Optional[int]) -> tuple[Any, float]:
    """The Ray task: ``fn(*args)`` with the experiment's torch threads; returns (value, wall seconds)."""
    from ..devices import torch_threads

    t0 = time.perf_counter()
    with torch_threads(threads):
        value = fn(*args)
    return value, round(time.perf_counter() - t0, 2)


class RayExecutor:
    """Runs each wave's calls as Ray tasks (``ray.remote(num_cpus=..., num_gpus=...)``) and waits for all."""

    name = "ray"

    def __init__(self, settings: RaySettings, threads: Optional[int] = None):
        self.ray, self._started = connect(settings)
        self.settings, self.threads = settings, threads
        self._task = self.ray.remote(_run_call)

    # -- resources -------------------------------------------------------------------------------
    def _nodes(self) -> list[dict[str, float]]:
        return live_nodes(self.ray)

    def resources(self, call: Call) -> Resources:
        s = self.settings
        cpus = s.cpus_per_stage if s.cpus_per_stage is not None else float(self.threads or 1)
        if s.gpus_per_stage is not None:
            gpus = s.gpus_per_stage
        elif call.device and call.device.startswith("cuda"):
            gpus = 1.0
        elif call.device == "auto":
            gpus = 1.0 if any(n.get("GPU", 0) > 0 for n in self._nodes()) else 0.0
        else:
            gpus = 0.0
        return Resources(cpus, gpus)

    def check(self, requests: Sequence[Resources]) -> None:
        """Refuse, before any work, a request no live node of the cluster can ever satisfy."""
        for r in dict.fromkeys(requests):
            check_fits(self.ray, r.num_cpus, r.num_gpus, "a sub-stage",
                       "lower ray.cpus_per_stage / ray.gpus_per_stage or set the stage's device: cpu")

    # -- running ---------------------------------------------------------------------------------
    def run(self, calls: Sequence[Call]) -> list[Outcome]:
        ray = self.ray
        if not calls:
            return []
        wanted = [self.resources(c) for c in calls]
        self.check(wanted)
        refs = [self._task.options(num_cpus=r.num_cpus, num_gpus=r.num_gpus, max_retries=0, name=c.label)
                .remote(c.fn, c.args, self.threads) for c, r in zip(calls, wanted)]  # fmt: skip
        log.info("ray: %d sub-stage(s) submitted: %s", len(refs), ", ".join(c.label for c in calls))
        outcomes: dict[int, Outcome] = {}
        raised: Optional[BaseException] = None
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            i = index[done[0]]
            label = calls[i].label
            try:
                value, wall = ray.get(done[0])
                outcomes[i] = Outcome(label, value, wall_s=wall)
                log.info("ray: %s done (%.1fs)", label, wall)
            except ray.exceptions.RayTaskError as exc:  # the stage raised: as in a local run
                cause = exc.as_instanceof_cause() if not isinstance(exc.cause, BaseException) else exc.cause
                outcomes[i] = Outcome(label, error=f"{type(cause).__name__}: {cause}")
                raised = raised or cause
            except ray.exceptions.RayError as exc:  # the worker or its node died: this call only
                reason = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
                outcomes[i] = Outcome(label, error=reason)
                log.warning("ray: %s failed, its worker died (%s); the others go on", label, reason)
        if raised is not None:
            raise raised
        return [outcomes[i] for i in range(len(calls))]

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_executor(backend: Backend, settings: Optional[RaySettings] = None, threads: Optional[int] = None):
    """The executor ``backend`` names (``ray`` connects now: an address that does not answer fails here)."""
    if backend == "local":
        return LocalExecutor(threads=threads)
    if backend == "ray":
        return RayExecutor(settings or RaySettings(), threads=threads)
    raise ConfigError(f"backend: expected local or ray, got {backend!r}")
