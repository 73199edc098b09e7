"""Run directories: one subfolder per stage, a manifest each, atomic writes, resume.

Layout::

    <run_dir>/
      <stage>/manifest.json   resolved config, inputs (path + content hash), versions,
                              counts (read / written / skipped by reason), timings, status
      <stage>/errors.jsonl    one JSON object per skipped sample (id, reason, where, detail)
      <stage>/log.txt         the stage's log
      <stage>/...             the stage's artefacts

A stage is *complete* when its manifest says ``status: complete`` and its
``fingerprint`` (hash of the config's output settings + input hashes) matches; such a stage
is not re-run unless forced. Throughput settings (device, batch size, workers, ...; see
:func:`midtrain.config.option`) are not in the fingerprint, so a retry with a smaller batch
resumes the same work.

Validate, compute, then swap. A run writes into ``<run_dir>/.partial/<stage>/`` and only a
complete run replaces ``<run_dir>/<stage>/`` (two renames, recovered on the next start if a
crash falls between them). A failed, interrupted or invalid run leaves the previous complete
output and manifest exactly as they were; its log, manifest (``status: failed``) and finished
shards stay in ``.partial/<stage>/``, and a rerun with the same fingerprint resumes there.
Within a stage, work is split into shards whose files are written under a temporary name and
renamed into place, so a shard that exists is whole; an interrupted stage recomputes only the
missing shards. Files in a stage folder that midtrain did not write (not listed in its
manifest's ``files``) are never deleted silently: the swap refuses, naming them, unless forced.

One writer per stage: a run holds ``<run_dir>/.locks/<stage>.lock`` (an ``flock``, released by
the kernel when the process dies, so a killed run's lock is taken over safely); a second
process fails at once naming the holder (pid, host, start time). On NFS (v4, or v3 with NLM)
Linux implements ``flock`` as a POSIX lock that other clients see; Lustre needs the ``flock``
mount option. Where the filesystem has no locks, midtrain falls back to an exclusive lock
file that is taken over only when its holder is a dead process on the same host.

Files are created with the permissions the user's umask gives (as ``open`` would), not the
0600 of ``mkstemp`` or of safetensors' own save, so a shared run directory stays readable by the
group: :func:`save_safetensors_atomic` writes weights, and a complete stage's files written by
other libraries (``save_pretrained``) are set to the umask's mode before the swap.

A stage owns its folder: the manifest records the stage ``kind`` that wrote it (the registered
stage, e.g. ``sft``, whatever its ``name=``); a ``name=`` that is another registered stage's folder
or a folder another kind wrote is refused, and so is a symbolic link as a stage folder (the swap
renames folders; link the run directory instead). Disk full, read-only and permission errors
are one line naming the path; the previous output stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import socket
import sys
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
    (``on_error: skip``); either way the user sees ``reason`` and ``where``. ``samples`` is how
    many samples the skip counts (one, or e.g. the frames of an unreadable episode).
    """

    def __init__(self, reason: str, where: str, detail: str = "", sample_id: str | None = None):
        self.reason = reason
        self.where = where
        self.detail = detail
        self.sample_id = sample_id
        self.samples = 1  # how many samples the error stands for (a skipped episode: its frames)
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
    tmp_path = _new_temp_file(path)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _new_temp_file(path: Path) -> Path:
    """An empty file beside ``path`` with a unique name, created with mode 0666 & ~umask."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise OSError(f"{path.parent}: cannot create a temporary file")


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


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def umask_mode(path: Path | str) -> None:
    """Give ``path`` the mode ``open`` would have (0666 & ~umask, execute bits kept under the umask)."""
    mask = current_umask()
    mode = os.stat(path).st_mode
    want = (0o666 | (mode & 0o111)) & ~mask
    if mode & 0o7777 != want:
        with contextlib.suppress(PermissionError):  # a file hard-linked from another user's output stays theirs
            os.chmod(path, want)


def follow_umask(root: Path) -> None:
    """:func:`umask_mode` on every file under ``root`` (what other libraries wrote 0600, e.g. safetensors)."""
    for path in Path(root).rglob("*"):
        if path.is_file() and not path.is_symlink():
            umask_mode(path)


def save_safetensors_atomic(path: Path | str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file atomically with the umask's mode (safetensors' own save writes 0600)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        umask_mode(tmp)


def load_safetensors(path: Path | str) -> dict:
    """The tensors of a safetensors file; a damaged or truncated file is a one-line error naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise StageError(f"{path}: damaged weights file ({exc}); restore it or rerun the stage that wrote it") from None


def damaged_weights_file(directory: Path | str) -> str | None:
    """``"<file>: <why>"`` for the first safetensors file under a local ``directory`` whose header or
    length is wrong (truncated, overwritten), else ``None``: names the file a loader's error hides."""
    from safetensors import SafetensorError, safe_open

    directory = Path(directory)
    if not directory.is_dir():
        return None
    for path in sorted(directory.rglob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except (SafetensorError, OSError) as exc:
            return f"{path}: damaged weights file ({exc})"
    return None


_FS_ERRORS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
              errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
              errno.EPERM: "operation not permitted"}  # fmt: skip


def filesystem_error(exc: BaseException, where: Path | str) -> StageError | None:
    """A one-line :class:`StageError` for a full disk or a path this user may not write (``None`` for
    any other error); ``where`` is named when the error carries no file name."""
    if not isinstance(exc, OSError) or exc.errno not in _FS_ERRORS:
        return None
    path = exc.filename or where
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space (or use a run directory on another disk) and rerun; finished shards resume"
    elif exc.errno == errno.EROFS:
        fix = "use a run directory on a writable filesystem (--run-dir)"
    else:
        fix = "give this user access to it (write access, for anything in the run directory) and rerun"
    return StageError(f"{path}: {_FS_ERRORS[exc.errno]}; {fix}; the previous output is unchanged")


# --------------------------------------------------------------------------- hashing


def hash_file(path: Path) -> str:
    """blake2b-128 of a file's bytes, read in 1 MiB blocks (content fingerprints, checkpoint checksums)."""
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
        digest = hash_file(path)
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
        if self.root.exists() and not self.root.is_dir():
            raise StageError(f"run directory {self.root} is a file; choose a directory (--run-dir)")
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except (NotADirectoryError, FileExistsError, PermissionError) as exc:
            raise StageError(f"run directory {self.root}: cannot create it ({exc.strerror or exc})") from None
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
    final_dir: Path | None = None  # <run>/<stage>: where the output lives once complete
    previous_dir: Path | None = None  # the previous complete output (other fingerprint), for reuse_shard
    counts: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    extra: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    skipped_as_complete: bool = False
    current_shard: str | None = None
    kind: str = ""  # the stage kind writing the folder (see stage_kind)

    # -- bad samples -------------------------------------------------------------------------
    def handle(self, error: SampleError) -> None:
        """Apply ``on_error``: re-raise, or record the skip in errors.jsonl and the counts."""
        if self.config.on_error == "raise":
            raise error
        self.skipped[error.reason] += error.samples
        record = {
            "id": error.sample_id,
            "reason": error.reason,
            "where": error.where,
            "detail": error.detail,
            "shard": self.current_shard,
            **({"samples": error.samples} if error.samples != 1 else {}),
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

    def reuse_shard(self, name: str, key: str, files: list[str]) -> bool:
        """Take shard ``name`` from the previous complete output if it was made from the same content.

        ``key`` is the stage's hash of everything the shard's output depends on (its rows' content
        and the output settings); a shard marked done with ``{"key": key}`` in the previous output,
        whose ``files`` (relative to the stage folder) are all there, is hard-linked (or copied)
        into this run and marked done. So a changed input recomputes exactly the shards it touches.
        Never with ``force``.
        """
        prev = self.previous_dir
        if prev is None:
            return False
        info = _read_json(prev / "shards" / f"{name}.done")
        if not info or info.get("key") != key or not all((prev / f).is_file() for f in files):
            return False
        for rel in files:
            dest = self.dir / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                dest.unlink()
            try:
                os.link(prev / rel, dest)
            except OSError:
                shutil.copy2(prev / rel, dest)
        self.mark_shard_done(name, {**info, "reused": True})
        return True

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
            KIND: self.kind or stage_kind(self.config),
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


class _LogFileHandler(logging.FileHandler):
    """The stage's ``log.txt``; a line it cannot write (a full disk) is dropped, not printed as a
    traceback - the error that stops the stage says what happened in one line."""

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def _stage_logger(stage: str, log_file: Path) -> logging.Logger:
    logger = logging.getLogger(f"midtrain.{stage}")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        if getattr(h, "_midtrain_file", False):
            logger.removeHandler(h)
            h.close()
    fh = _LogFileHandler(log_file)
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    fh._midtrain_file = True  # type: ignore[attr-defined]
    logger.addHandler(fh)
    return logger


PARTIAL = ".partial"  # <run>/.partial/<stage>/: the run in progress (or the last failed one)
LOCKS = ".locks"  # <run>/.locks/<stage>.lock: who is running the stage
OUTPUT_FILES = "output_files"  # manifest key: the files the stage wrote (relative paths)
KIND = "kind"  # manifest key: the stage kind that wrote the folder (see stage_kind)


def stage_kind(config: StageConfig) -> str:
    """What kind of stage writes with ``config``: the registered stage's name (``sft`` whatever its
    ``name=``), else the config class."""
    from .stages import STAGES

    cls = type(config)
    for spec in STAGES.values():
        if spec.config_class == cls.__name__ and (spec.config_module or spec.module) == cls.__module__:
            return spec.name
    return f"{cls.__module__}.{cls.__qualname__}"


def _folder_kind(manifest: dict, config: StageConfig) -> str | None:
    """The kind that wrote a folder. A manifest from before kinds were recorded: the registered
    stage whose folder it is, else this config's kind when most of its config keys are this
    config's (a version may add an option; another kind shares few), else ``None`` (unknown)."""
    from .stages import STAGES

    if manifest.get(KIND):
        return manifest[KIND]
    registered = {spec.dir_name: spec.name for spec in STAGES.values()}
    if manifest.get("stage") in registered:
        return registered[manifest["stage"]]
    theirs, mine = set(manifest.get("config") or {}), set(config.to_dict())
    if theirs and len(theirs & mine) >= 0.5 * len(theirs | mine):
        return stage_kind(config)
    return None


def _check_owner(run: RunDir, stage: str, kind: str, config: StageConfig, inputs) -> None:
    """Refuse a folder that belongs to another stage kind, or that holds one of the stage's inputs."""
    from .stages import STAGES

    final = run.stage_dir(stage)
    registered = {spec.dir_name: spec.name for spec in STAGES.values()}
    owner = registered.get(stage)
    if owner is not None and owner != kind:
        raise StageError(f"{final}: name={stage} is the folder of the '{owner}' stage; a '{kind}' stage may not "
                         "write there - choose another name=")  # fmt: skip
    man = _read_json(final / MANIFEST)
    if man is not None:
        owner = _folder_kind(man, config)
        if owner != kind:
            writer = f"a '{owner}' stage" if owner else "another kind of stage"
            raise StageError(f"{final}: written by {writer}; a '{kind}' stage may not replace it "
                             "- choose another name= (or move the folder away)")  # fmt: skip
    paths = inputs.values() if isinstance(inputs, dict) else inputs
    for p in paths:
        resolved = Path(p).resolve()
        if resolved == final.resolve() or final.resolve() in resolved.parents:
            raise StageError(f"{final}: holds this stage's input {p}, which the run would replace - choose another "
                             "name= or copy the input out of the folder")  # fmt: skip


@contextlib.contextmanager
def stage_run(
    run_dir: RunDir | Path | str,
    stage: str,
    config: StageConfig,
    inputs: list[Path | str] | dict[str, Path | str] = (),
    force: bool = False,
    kind: str | None = None,
) -> Iterator[StageRun]:
    """Open a stage in ``run_dir``: skip if complete with the same fingerprint, else run it.

    Usage::

        with stage_run(run, "gap", cfg, inputs=[features_dir]) as st:
            if st.skipped_as_complete:
                return st.dir
            ... write artefacts into st.dir, count with st.counts[...] ...
        return st.final_dir

    ``st.dir`` is where the run writes: ``<run>/.partial/<stage>/`` while it runs (the stage's
    own folder when it is skipped as complete); ``st.final_dir`` is ``<run>/<stage>/``, where
    the output is once complete - use it for any path recorded in an artefact. On normal exit
    the manifest is written with ``status: complete`` and the output replaces the previous one;
    on an exception the manifest says ``status: failed`` (in the partial folder), the previous
    output is untouched and the exception propagates. Shard markers from an interrupted run
    with the same fingerprint are kept so work resumes; a changed fingerprint or ``force``
    starts the partial folder over. See the module docstring for the lock and the swap.
    ``kind``: the stage kind that owns the folder (default: :func:`stage_kind` of the config; a
    test writing a stage's artefacts with a stand-in config names the kind it stands in for).
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    try:
        with _stage_run(run, stage, config, inputs, force, kind or stage_kind(config)) as st:
            yield st
    except OSError as exc:
        error = filesystem_error(exc, run.root / PARTIAL / stage)
        if error is None:
            raise
        raise error from None


@contextlib.contextmanager
def _stage_run(run: RunDir, stage: str, config: StageConfig, inputs, force: bool, kind: str) -> Iterator[StageRun]:
    with stage_lock(run, stage):
        _recover_interrupted_swap(run, stage)
        items = inputs.items() if isinstance(inputs, dict) else ((str(p), p) for p in inputs)
        hashes = {str(name): run.hashes.path_hash(Path(p)) for name, p in items}
        run.hashes.save()
        fp = _fingerprint(stage, config, hashes)
        final = run.stage_dir(stage)
        _check_owner(run, stage, kind, config, inputs)
        prev = run.manifest(stage)

        if prev and prev.get("status") == "complete" and prev.get("fingerprint") == fp and not force:
            log = _stage_logger(stage, final / LOG)
            st = StageRun(run, stage, config, hashes, fp, final, log, final_dir=final, kind=kind)
            log.info("stage '%s' is complete with the same config and inputs; nothing to do (use --force to recompute)", stage)
            st.skipped_as_complete = True
            st.extra = {k: v for k, v in prev.items() if k not in st.manifest("complete")}
            yield st
            return

        if final.is_symlink():
            raise StageError(
                f"{final}: the stage folder is a symbolic link (to {os.readlink(final)}); a run replaces its folder by "
                "renaming, so link the whole run directory instead (--run-dir), or replace the link by the folder"
            )
        work = run.root / PARTIAL / stage
        attempt = _read_json(work / MANIFEST)
        same = bool(attempt) and attempt.get("fingerprint") == fp and not force
        if not same:
            _start_partial(work, final)
        else:
            _remove_stale_temporaries(work)
        log = _stage_logger(stage, work / LOG)
        reusable = final if prev and prev.get("status") == "complete" and not force else None
        st = StageRun(run, stage, config, hashes, fp, work, log, final_dir=final, previous_dir=reusable, kind=kind)
        if same and attempt.get("status") == "complete":
            # computed earlier, not yet in place (the swap refused: files midtrain did not write)
            log.info("stage '%s': the output computed earlier is complete; putting it in place", stage)
            st.extra = {k: v for k, v in attempt.items() if k not in st.manifest("complete")}
            _swap_into_place(run, stage, work, final, force, log)
            st.dir = final
            st.skipped_as_complete = True
            yield st
            return
        if same:
            done = {p.name[: -len(".done")] for p in (work / "shards").glob("*.done")} if (work / "shards").exists() else set()
            log.info("resuming stage '%s': %d shard(s) already complete", stage, len(done))
            _keep_errors_of_done_shards(st, done)
        st.write_manifest("running")
        log.info("stage '%s' started (fingerprint %s) in %s", stage, fp, work)
        try:
            yield st
        except BaseException as exc:
            st.extra["error"] = f"{type(exc).__name__}: {exc}"
            with contextlib.suppress(OSError):  # a full disk must not hide the error that stopped the stage
                st.write_manifest("failed")
            kept = "the previous output is unchanged; " if final.exists() else ""
            log.error("stage '%s' failed: %s (%sthis attempt's log and finished shards are in %s)", stage, exc, kept, work)
            raise
        st.extra[OUTPUT_FILES] = _files_under(work)
        follow_umask(work)
        st.write_manifest("complete")
        _swap_into_place(run, stage, work, final, force, log)
        st.dir = final
        log.info(
            "stage '%s' complete in %.1fs: %s", stage, time.time() - st.started,
            ", ".join(f"{k}={v}" for k, v in st.counts.items()) or "no counts",
        )  # fmt: skip


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, NotADirectoryError):
        return None


def _files_under(root: Path) -> list[str]:
    """Relative paths of the files a stage wrote (hidden temporaries and the bookkeeping left out)."""
    out = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts) and rel.as_posix() not in (MANIFEST, LOG, ERRORS):
            out.append(rel.as_posix())
    return out


def _remove_stale_temporaries(work: Path) -> None:
    """Delete the hidden ``.*.tmp`` files and folders a killed attempt left (atomic writes, a cut
    checkpoint save): under the stage lock no other process writes here, so they never reach the
    stage folder."""
    for path in sorted(work.rglob(".*.tmp"), key=lambda p: len(p.parts)):
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _remove_tree(path: Path) -> None:
    """``rmtree`` that removes a symbolic link itself (never what it points to)."""
    if path.is_symlink():
        path.unlink()
    else:
        shutil.rmtree(path)


def _start_partial(work: Path, final: Path) -> None:
    """An empty partial folder (a previous attempt's is midtrain's own and goes), whose log
    continues the stage's log history."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    if (final / LOG).is_file():
        shutil.copyfile(final / LOG, work / LOG)


def listed_files(stage_dir: Path | str, pattern: str) -> list[Path]:
    """The files matching ``pattern`` (a glob relative to ``stage_dir``) that the stage's manifest
    lists as written by it, sorted. A matching file the stage did not write (a shard copied in by
    hand) is left out with a warning naming it, never read. Without a manifest (a folder written
    outside midtrain) or with one from before ``output_files``, every matching file counts."""
    stage_dir = Path(stage_dir)
    found = sorted(stage_dir.glob(pattern))
    man = _read_json(stage_dir / MANIFEST)
    if man is None or OUTPUT_FILES not in man:
        return found
    known = set(man[OUTPUT_FILES])
    foreign = [p for p in found if p.relative_to(stage_dir).as_posix() not in known]
    if foreign:
        shown = ", ".join(str(p) for p in foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        logging.getLogger("midtrain").warning("ignoring %s: not written by the stage (not in %s)", shown, stage_dir / MANIFEST)
    return [p for p in found if p not in foreign]


def foreign_files(stage_dir: Path) -> list[str]:
    """Files in a stage folder that midtrain did not write (not in its manifest's output files).

    A folder without a manifest is all foreign; a manifest from before ``output_files`` was
    recorded vouches for every file.
    """
    if not stage_dir.exists():
        return []
    man = _read_json(stage_dir / MANIFEST)
    if man is not None and OUTPUT_FILES not in man:
        return []
    known = set((man or {}).get(OUTPUT_FILES, []))
    return [f for f in _files_under(stage_dir) if f not in known]


def _swap_into_place(run: RunDir, stage: str, work: Path, final: Path, force: bool, log: logging.Logger) -> None:
    """Replace ``final`` by the complete ``work`` folder: rename the old one aside, rename the new
    one in, delete the old one. A crash between the renames is repaired by the next start
    (:func:`_recover_interrupted_swap`)."""
    if final.exists() and not final.is_dir():
        raise StageError(f"{final}: is a file, not a stage folder; move it away and rerun")
    if final.exists():
        foreign = foreign_files(final)
        if foreign and not force:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise StageError(
                f"{final}: holds files midtrain did not write ({shown}); move them out and rerun (the new output "
                f"waits, complete, in {work}), or rerun with --force to delete them"
            )
        if foreign:
            log.warning("--force: deleting files midtrain did not write in %s: %s", final, ", ".join(foreign))
        old = run.root / PARTIAL / f"{stage}.old"
        if old.exists() or old.is_symlink():
            _remove_tree(old)
        os.replace(final, old)
        os.replace(work, final)
        _remove_tree(old)
    else:
        os.replace(work, final)


def _recover_interrupted_swap(run: RunDir, stage: str) -> None:
    """Finish or undo a swap that a crash interrupted between its two renames."""
    old = run.root / PARTIAL / f"{stage}.old"
    if not old.exists() and not old.is_symlink():
        return
    final, work = run.stage_dir(stage), run.root / PARTIAL / stage
    if final.exists():
        _remove_tree(old)
        return
    attempt = _read_json(work / MANIFEST)
    if attempt and attempt.get("status") == "complete":
        os.replace(work, final)
        _remove_tree(old)
    else:
        os.replace(old, final)


# --------------------------------------------------------------------------- one writer per stage


def _lock_info(path: Path) -> str:
    info = _read_json(path) or {}
    if not info:
        return "another process (no details recorded)"
    return f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}"


_held_lock_fds: set[int] = set()
_fork_hook_registered = False


def _close_inherited_locks() -> None:
    """In a forked child (e.g. a DataLoader worker), drop the copies of the parent's lock fds: an
    flock belongs to the open file, so a child that kept one would hold the lock after the
    parent was killed."""
    for fd in list(_held_lock_fds):
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_lock_fds.clear()


@contextlib.contextmanager
def stage_lock(run: RunDir, stage: str) -> Iterator[None]:
    """Hold ``<run>/.locks/<stage>.lock`` while the stage runs; fail at once if another process does.

    ``flock`` is released by the kernel when its process dies, so a lock left by ``kill -9``
    is simply taken. The file is never deleted (deleting a lock file races with a process that
    opened it). Filesystems without locks: see :func:`_exclusive_lock_file`.
    """
    import fcntl

    global _fork_hook_registered
    if not _fork_hook_registered:
        os.register_at_fork(after_in_child=_close_inherited_locks)
        _fork_hook_registered = True
    path = run.root / LOCKS / f"{stage}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StageError(
                f"stage '{stage}' in {run.root} is already running ({_lock_info(path)}); wait for it or stop it"
            ) from None
        except OSError:  # no lock support on this filesystem
            with _exclusive_lock_file(path.with_suffix(".lock.excl"), stage, run, me):
                yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        _held_lock_fds.add(fd)
        try:
            yield
        finally:
            _held_lock_fds.discard(fd)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _exclusive_lock_file(path: Path, stage: str, run: RunDir, me: dict) -> Iterator[None]:
    """Fallback lock: a file created with O_EXCL. Taken over only when its holder is a process of
    this host that no longer exists; a holder on another host must be cleared by hand."""
    for attempt in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            break
        except FileExistsError:
            info = _read_json(path) or {}
            if attempt == 0 and info.get("host") == me["host"] and not _pid_alive(int(info.get("pid", -1))):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                continue
            raise StageError(
                f"stage '{stage}' in {run.root} is locked ({_lock_info(path)}); if that process is gone, "
                f"delete {path}"
            ) from None
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(me) + "\n")
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
                st.skipped[rec["reason"]] += int(rec.get("samples", 1))
    write_text_atomic(path, "".join(k + "\n" for k in kept))
