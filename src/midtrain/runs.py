"""Run directories: one subfolder per stage, a manifest each, atomic writes, resume.

Layout::

    <run_dir>/
      <stage>/manifest.json   resolved config, inputs (path + content hash), versions,
                              counts (read / written / skipped by reason), timings, status
      <stage>/errors.jsonl    one JSON object per skipped sample (id, reason, where, detail)
      <stage>/log.txt         the stage's log
      <stage>/...             the stage's artefacts

A stage is *complete* when its manifest says ``status: complete`` and its
``fingerprint`` (hash of config + input hashes) matches; such a stage is not
re-run unless forced. Within a stage, work is split into shards whose files are
written under a temporary name and renamed into place, so a shard that exists is
whole; an interrupted stage recomputes only the missing shards.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .config import StageConfig, output_settings, throughput_settings, to_plain

MANIFEST = "manifest.json"
ERRORS = "errors.jsonl"
LOG = "log.txt"

TRACKED_PACKAGES = (
    "midtrain", "numpy", "pyarrow", "torch", "torchvision", "transformers", "tokenizers",
    "safetensors", "datasets", "av", "pillow", "scikit-learn", "scipy", "openTSNE",
    "ray", "metaworld", "mujoco", "peft", "accelerate",
)  # fmt: skip


class SampleError(Exception):
    """One input sample is unusable. ``where`` names the file and line/row/episode.

    Stages catch it and either re-raise (``on_error: raise``) or record a skip
    (``on_error: skip``); either way the user sees ``reason`` and ``where``.
    """

    def __init__(self, reason: str, where: str, detail: str = "", sample_id: str | None = None):
        self.reason = reason
        self.where = where
        self.detail = detail
        self.sample_id = sample_id
        msg = f"{where}: {reason}"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)


class StageError(RuntimeError):
    """A stage cannot run (bad inputs, missing artefacts). The message says what to fix."""


# --------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place.

    On failure the temporary file is removed, so ``path`` is either absent, the old
    version, or the complete new version - never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: Path | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path | str, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path | str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(to_plain(obj), indent=2, sort_keys=False, default=str) + "\n")


def write_parquet_atomic(path: Path | str, table: Any, **kwargs: Any) -> None:
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, **kwargs)


def save_npy_atomic(path: Path | str, array: Any) -> None:
    import numpy as np

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)


# --------------------------------------------------------------------------- hashing


def _hash_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class HashCache:
    """Content hashes keyed by (path, size, mtime_ns), so unchanged inputs are not re-read.

    Hashing is by content (blake2b); the cache only avoids re-reading a file whose
    size and modification time are unchanged, as build tools do.
    """

    def __init__(self, cache_file: Path | None):
        self.cache_file = cache_file
        self.entries: dict[str, list] = {}
        if cache_file and cache_file.exists():
            with contextlib.suppress(Exception):
                self.entries = json.loads(cache_file.read_text())
        self.dirty = False

    def file_hash(self, path: Path) -> str:
        st = path.stat()
        key = str(path.resolve())
        hit = self.entries.get(key)
        if hit and hit[0] == st.st_size and hit[1] == st.st_mtime_ns:
            return hit[2]
        digest = _hash_file(path)
        self.entries[key] = [st.st_size, st.st_mtime_ns, digest]
        self.dirty = True
        return digest

    def path_hash(self, path: Path) -> str:
        """Hash of a file, or of a directory's files (relative names and contents).

        A directory that is a complete stage output is identified by its manifest's
        fingerprint plus its outputs, which is what changes when the stage re-runs.
        """
        path = Path(path)
        if not path.exists():
            raise StageError(f"input not found: {path}")
        if path.is_file():
            return self.file_hash(path)
        h = hashlib.blake2b(digest_size=16)
        for sub in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = sub.relative_to(path).as_posix()
            if any(part.startswith(".") for part in sub.relative_to(path).parts):
                continue  # temporaries and hidden files are not content
            if rel in (LOG, ERRORS):
                continue
            h.update(rel.encode())
            h.update(self.file_hash(sub).encode())
        return h.hexdigest()

    def save(self) -> None:
        if self.cache_file and self.dirty:
            write_json_atomic(self.cache_file, self.entries)
            self.dirty = False


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


# --------------------------------------------------------------------------- run directory


class RunDir:
    """A run directory: ``<root>/<stage>/`` per stage."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.hashes = HashCache(self.root / ".hash_cache.json")

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def manifest(self, stage: str) -> dict | None:
        path = self.stage_dir(stage) / MANIFEST
        if not path.exists():
            return None
        return json.loads(path.read_text())

    def require(self, stage: str) -> Path:
        """The output directory of a completed upstream stage, or a clear error."""
        man = self.manifest(stage)
        if man is None or man.get("status") != "complete":
            raise StageError(
                f"{self.stage_dir(stage)}: stage '{stage}' has not completed in this run directory; "
                f"run `midtrain {stage} --run-dir {self.root}` first"
            )
        return self.stage_dir(stage)


@dataclass
class StageRun:
    """The live state of one stage execution: counts, skips, shards, logging, manifest."""

    run_dir: RunDir
    stage: str
    config: StageConfig
    inputs: dict[str, str]
    fingerprint: str
    dir: Path
    log: logging.Logger
    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    skipped_as_complete: bool = False
    current_shard: str | None = None

    # -- bad samples -------------------------------------------------------------------------
    def handle(self, error: SampleError) -> None:
        """Apply ``on_error``: re-raise, or record the skip in errors.jsonl and the counts."""
        if self.config.on_error == "raise":
            raise error
        self.skipped[error.reason] += 1
        record = {
            "id": error.sample_id,
            "reason": error.reason,
            "where": error.where,
            "detail": error.detail,
            "shard": self.current_shard,
        }
        with open(self.dir / ERRORS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        self.log.warning("skipped %s: %s", error.where, error.reason + (f" ({error.detail})" if error.detail else ""))

    def skip(self, reason: str, where: str, detail: str = "", sample_id: str | None = None) -> None:
        self.handle(SampleError(reason, where, detail, sample_id))

    # -- shards ------------------------------------------------------------------------------
    def shard_done(self, name: str) -> bool:
        return (self.dir / "shards" / f"{name}.done").exists()

    def mark_shard_done(self, name: str, info: dict | None = None) -> None:
        write_json_atomic(self.dir / "shards" / f"{name}.done", info or {})

    def shard_info(self, name: str) -> dict:
        return json.loads((self.dir / "shards" / f"{name}.done").read_text())

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    def progress(self, iterable: Any = None, total: int | None = None, desc: str = "", unit: str = "it"):
        """A progress bar with rate and ETA on stderr (disabled when not a terminal and under CI)."""
        from tqdm.auto import tqdm

        disable = os.environ.get("MIDTRAIN_PROGRESS", "auto") == "off" or (
            os.environ.get("CI") and not sys.stderr.isatty()
        )
        return tqdm(iterable, total=total, desc=desc or self.stage, unit=unit, disable=bool(disable), dynamic_ncols=True)

    # -- manifest ----------------------------------------------------------------------------
    def manifest(self, status: str) -> dict:
        now = time.time()
        return {
            "stage": self.stage,
            "status": status,
            "fingerprint": self.fingerprint,
            "config": self.config.to_dict(),
            "throughput_settings": throughput_settings(self.config),
            "inputs": [{"path": p, "hash": h} for p, h in self.inputs.items()],
            "versions": package_versions(),
            "counts": {**dict(self.counts), "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values())},
            "timings": {
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(self.started)),
                "wall_s": round(now - self.started, 3),
                **{k: round(v, 3) for k, v in self.timings.items()},
            },
            **self.extra,
        }

    def write_manifest(self, status: str) -> None:
        write_json_atomic(self.dir / MANIFEST, self.manifest(status))


def _fingerprint(stage: str, config: StageConfig, inputs: dict[str, str]) -> str:
    """Hash of what decides the stage's output: its name, the config without throughput settings
    (device, batch size, workers, ...; see :func:`midtrain.config.option`), and its inputs' hashes."""
    payload = json.dumps({"stage": stage, "config": output_settings(config), "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def _stage_logger(stage: str, log_file: Path) -> logging.Logger:
    logger = logging.getLogger(f"midtrain.{stage}")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_midtrain_file", False):
            logger.removeHandler(h)
            h.close()
    fh = logging.FileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh._midtrain_file = True  # type: ignore[attr-defined]
    logger.addHandler(fh)
    return logger


@contextlib.contextmanager
def stage_run(
    run_dir: RunDir | Path | str,
    stage: str,
    config: StageConfig,
    inputs: list[Path | str] | dict[str, Path | str] = (),
    force: bool = False,
) -> Iterator[StageRun]:
    """Open a stage in ``run_dir``: skip if complete with the same fingerprint, else run it.

    Usage::

        with stage_run(run, "gap", cfg, inputs=[features_dir]) as st:
            if st.skipped_as_complete:
                return st.dir
            ... write artefacts into st.dir, count with st.counts[...] ...

    On normal exit the manifest is written with ``status: complete``; on an exception,
    ``status: failed`` (and the exception propagates). Shard markers from an
    interrupted run with the same fingerprint are kept so work resumes; a changed
    fingerprint or ``force`` clears them.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    items = inputs.items() if isinstance(inputs, dict) else ((str(p), p) for p in inputs)
    hashes = {str(name): run.hashes.path_hash(Path(p)) for name, p in items}
    run.hashes.save()
    fp = _fingerprint(stage, config, hashes)
    out = run.stage_dir(stage)
    out.mkdir(parents=True, exist_ok=True)
    log = _stage_logger(stage, out / LOG)
    prev = run.manifest(stage)
    st = StageRun(run, stage, config, hashes, fp, out, log)

    if prev and prev.get("status") == "complete" and prev.get("fingerprint") == fp and not force:
        log.info("stage '%s' is complete with the same config and inputs; nothing to do (use --force to recompute)", stage)
        st.skipped_as_complete = True
        st.extra = {k: v for k, v in prev.items() if k not in st.manifest("complete")}
        yield st
        return

    if force or not prev or prev.get("fingerprint") != fp:
        _clear_stage_dir(out)
    else:
        done = {p.name[: -len(".done")] for p in (out / "shards").glob("*.done")} if (out / "shards").exists() else set()
        log.info("resuming stage '%s': %d shard(s) already complete", stage, len(done))
        _keep_errors_of_done_shards(st, done)
    st.write_manifest("running")
    log.info("stage '%s' started (fingerprint %s)", stage, fp)
    try:
        yield st
    except BaseException as exc:
        st.extra["error"] = f"{type(exc).__name__}: {exc}"
        st.write_manifest("failed")
        log.error("stage '%s' failed: %s", stage, exc)
        raise
    st.write_manifest("complete")
    log.info(
        "stage '%s' complete in %.1fs: %s", stage, time.time() - st.started,
        ", ".join(f"{k}={v}" for k, v in st.counts.items()) or "no counts",
    )  # fmt: skip


def _keep_errors_of_done_shards(st: StageRun, done: set[str]) -> None:
    """On resume, keep skips recorded for finished shards (and restore their counts);
    skips of the interrupted shard are dropped because that shard is redone."""
    path = st.dir / ERRORS
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rec = json.loads(line)
            if rec.get("shard") in done:
                kept.append(line)
                st.skipped[rec["reason"]] += 1
    write_text_atomic(path, "".join(k + "\n" for k in kept))


def _clear_stage_dir(out: Path) -> None:
    """Remove a previous attempt's artefacts (keep the log, which appends)."""
    import shutil

    for child in out.iterdir():
        if child.name == LOG:
            continue
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()
