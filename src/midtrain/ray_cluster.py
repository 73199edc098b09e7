"""Joining a Ray cluster, for the stages that can spread work over one (``backend: ray``): a
study's sub-stages (:mod:`midtrain.experiments.executors`) and closed-loop evaluation's
episodes (:mod:`midtrain.eval.rollout`). The cluster only makes them faster: what they write is
the same as with ``backend: local``, so every setting here is a throughput setting.

An address that does not accept a connection fails in one line before any work (``ray.init``
would retry for minutes), and so does a request for CPUs or GPUs that no live node has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Optional

from .config import ConfigError, Settings, option
from .runs import StageError

Backend = Literal["local", "ray"]


@dataclass
class RaySettings(Settings):
    """``backend: ray``: the cluster and what each sub-stage (or group of episodes) asks of it
    (all throughput settings)."""

    address: Optional[str] = option(
        None, "Ray cluster to join: null starts a local one on this machine; 'auto' or ray://host:10001 joins a running one",
        throughput=True)  # fmt: skip
    num_cpus: Optional[int] = option(None, "CPUs of the local cluster started when address is null (null: all)", throughput=True)
    cpus_per_stage: Optional[float] = option(
        None, "CPUs each sub-stage (eval: each group of episodes) asks for (null: the experiment's num_threads, "
        "else 1)", throughput=True)  # fmt: skip
    gpus_per_stage: Optional[float] = option(
        None, "GPUs each sub-stage (eval: each group of episodes) asks for (null: 1 when its device is cuda, or auto "
        "on a cluster with GPUs; else 0; eval: 0)", throughput=True)  # fmt: skip

    def validate(self) -> None:
        for key in ("num_cpus", "cpus_per_stage", "gpus_per_stage"):
            value = getattr(self, key)
            if value is not None and value < 0:
                raise ConfigError(f"ray.{key}: must be >= 0, got {value}")


def check_answers(address: Optional[str], timeout_s: float = 5.0) -> None:
    """A ``host:port`` (or ``ray://host:port``) that does not accept a connection fails in one line
    now (``ray.init`` would retry for minutes); ``auto`` and null are Ray's to resolve."""
    import socket

    if not address or address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as exc:
        raise StageError(f"ray.address: no Ray cluster answers at {address!r} ({exc.__class__.__name__}: {exc}); start "
                         "one (`ray start --head`) or set ray.address: null for a local one") from None  # fmt: skip


def import_ray():
    try:
        import ray
    except ImportError:
        raise StageError("backend: ray needs Ray: pip install 'midtrain[ray]'") from None
    return ray


def connect(settings: RaySettings) -> tuple[Any, bool]:
    """``(ray, started)``: join the cluster ``settings.address`` names, or start a local one
    (``num_cpus``), unless this process is connected already; ``started`` says whether this call
    connected (so its caller shuts Ray down when done)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray, False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True, "configure_logging": False}
    if settings.address is None and settings.num_cpus is not None:
        kwargs["num_cpus"] = settings.num_cpus
    check_answers(settings.address)
    try:
        ray.init(address=settings.address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StageError(f"ray.address: no Ray cluster answers at {settings.address!r} ({first}); start one "
                         "(`ray start --head`) or set ray.address: null for a local one") from None  # fmt: skip
    return ray, True


def live_nodes(ray: Any) -> list[dict[str, float]]:
    """The resources (``CPU``, ``GPU``, ...) of each live node of the connected cluster."""
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]


def check_fits(ray: Any, num_cpus: float, num_gpus: float, what: str, hint: str) -> None:
    """Refuse, in one line, a task of ``num_cpus`` CPUs and ``num_gpus`` GPUs that no live node can ever run."""
    nodes = live_nodes(ray)
    if not any(n.get("CPU", 0) >= num_cpus and n.get("GPU", 0) >= num_gpus for n in nodes):
        have = ", ".join(f"{n.get('CPU', 0):g} CPU {n.get('GPU', 0):g} GPU" for n in nodes) or "no live node"
        raise ConfigError(f"ray: {what} asks for {num_cpus:g} CPU and {num_gpus:g} GPU per task, and no node has that "
                          f"(nodes: {have}); {hint}")  # fmt: skip
