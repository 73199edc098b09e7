"""Run directories: atomic writes, skip-if-complete, force, input change, shard resume, recorded skips."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from midtrain.config import StageConfig, option
from midtrain.runs import (
    RunDir,
    SampleError,
    StageError,
    atomic_path,
    save_npy_atomic,
    stage_run,
    write_json_atomic,
    write_parquet_atomic,
    write_text_atomic,
)


@dataclass
class ToyConfig(StageConfig):
    shards: int = 3
    bad_every: int = 0


def toy_stage(run_dir: Path, cfg: ToyConfig, src: Path, force: bool = False, crash_at: int | None = None,
              log: list | None = None) -> Path:
    """Sums numbers of ``src`` per shard; ``bad_every`` makes every k-th number a bad sample."""
    numbers = [int(x) for x in src.read_text().split()]
    with stage_run(run_dir, "toy", cfg, inputs=[src], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        for s in range(cfg.shards):
            name = f"shard-{s}"
            if st.shard_done(name):
                st.counts["written"] += st.shard_info(name)["rows"]
                continue
            if crash_at == s:
                raise KeyboardInterrupt
            st.current_shard = name
            rows = 0
            for i, x in enumerate(numbers[s::cfg.shards]):
                st.counts["read"] += 1
                if cfg.bad_every and x % cfg.bad_every == 0:
                    st.skip("bad number", f"{src}:{x}", "divisible", sample_id=str(x))
                    continue
                rows += 1
            write_text_atomic(st.dir / f"{name}.txt", str(rows))
            st.mark_shard_done(name, {"rows": rows})
            st.counts["written"] += rows
            if log is not None:
                log.append(name)
        st.extra["total"] = st.counts["written"]
    return st.dir


@pytest.fixture
def src(tmp_path) -> Path:
    path = tmp_path / "numbers.txt"
    path.write_text(" ".join(str(i) for i in range(1, 13)))
    return path


def manifest(run: Path) -> dict:
    return json.loads((run / "toy" / "manifest.json").read_text())


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.json"
    write_json_atomic(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed mid-write")
    assert json.loads(target.read_text()) == {"v": 1}  # the old version, whole
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "new.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]  # no new file, no temporaries


def test_atomic_writers_round_trip(tmp_path):
    import pyarrow.parquet as pq

    save_npy_atomic(tmp_path / "a.npy", np.arange(6, dtype=np.float16).reshape(2, 3))
    assert np.load(tmp_path / "a.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    write_parquet_atomic(tmp_path / "t.parquet", pa.table({"x": [1, 2]}))
    assert pq.read_table(tmp_path / "t.parquet").column("x").to_pylist() == [1, 2]


def test_complete_stage_is_skipped_and_says_so(tmp_path, src):
    run = tmp_path / "run"
    log: list = []
    toy_stage(run, ToyConfig(), src, log=log)
    first = manifest(run)
    assert first["status"] == "complete" and first["counts"]["written"] == 12 and first["total"] == 12
    assert first["inputs"][0]["path"] == str(src) and first["config"]["shards"] == 3
    assert "numpy" in first["versions"] and "wall_s" in first["timings"]
    toy_stage(run, ToyConfig(), src, log=log)
    assert log == ["shard-0", "shard-1", "shard-2"]  # nothing recomputed
    assert "nothing to do (use --force to recompute)" in (run / "toy/log.txt").read_text()
    assert manifest(run)["fingerprint"] == first["fingerprint"]


def test_force_recomputes(tmp_path, src):
    run = tmp_path / "run"
    log: list = []
    toy_stage(run, ToyConfig(), src, log=log)
    toy_stage(run, ToyConfig(), src, force=True, log=log)
    assert log == ["shard-0", "shard-1", "shard-2"] * 2


def test_changed_input_or_config_reruns(tmp_path, src):
    run = tmp_path / "run"
    log: list = []
    toy_stage(run, ToyConfig(), src, log=log)
    src.write_text("1 2 3")
    toy_stage(run, ToyConfig(), src, log=log)
    assert len(log) == 6 and manifest(run)["counts"]["written"] == 3
    toy_stage(run, ToyConfig(shards=1), src, log=log)
    assert len(log) == 7 and not (run / "toy/shard-2.txt").exists()  # stale artefacts cleared


def test_shard_resume_keeps_done_shards(tmp_path, src):
    run = tmp_path / "run"
    log: list = []
    with pytest.raises(KeyboardInterrupt):
        toy_stage(run, ToyConfig(), src, crash_at=2, log=log)
    attempt = json.loads((run / ".partial/toy/manifest.json").read_text())
    assert attempt["status"] == "failed" and "KeyboardInterrupt" in attempt["error"]
    assert not (run / "toy").exists()  # nothing is published before the stage completes
    stamp = (run / ".partial/toy/shard-0.txt").stat().st_mtime_ns
    toy_stage(run, ToyConfig(), src, log=log)
    assert log == ["shard-0", "shard-1", "shard-2"]  # shards 0 and 1 were not redone
    assert (run / "toy/shard-0.txt").stat().st_mtime_ns == stamp
    assert manifest(run)["status"] == "complete" and manifest(run)["counts"]["written"] == 12
    assert "resuming stage 'toy': 2 shard(s) already complete" in (run / "toy/log.txt").read_text()


def test_skips_go_to_errors_jsonl_and_counts(tmp_path, src):
    run = tmp_path / "run"
    cfg = ToyConfig(bad_every=4, on_error="skip")
    toy_stage(run, cfg, src)
    errors = [json.loads(line) for line in (run / "toy/errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["12", "4", "8"]
    assert errors[0] == {"id": errors[0]["id"], "reason": "bad number", "where": f"{src}:{errors[0]['id']}",
                         "detail": "divisible", "shard": errors[0]["shard"]}
    m = manifest(run)
    assert m["counts"]["skipped"] == {"bad number": 3} and m["counts"]["skipped_total"] == 3
    assert m["counts"]["written"] == 9


def test_resume_keeps_skips_of_done_shards_only(tmp_path, src):
    run = tmp_path / "run"
    cfg = ToyConfig(bad_every=4, on_error="skip")
    with pytest.raises(KeyboardInterrupt):
        toy_stage(run, cfg, src, crash_at=2)
    toy_stage(run, cfg, src)
    errors = [json.loads(line) for line in (run / "toy/errors.jsonl").read_text().splitlines()]
    assert sorted(e["id"] for e in errors) == ["12", "4", "8"]  # no duplicates from the first attempt
    assert manifest(run)["counts"]["skipped"] == {"bad number": 3}


def test_on_error_raise_stops_at_the_first_bad_sample(tmp_path, src):
    with pytest.raises(SampleError, match=r"numbers.txt:4: bad number \(divisible\)"):
        toy_stage(tmp_path / "run", ToyConfig(bad_every=4), src)


def test_require_names_the_missing_stage(tmp_path, src):
    run = RunDir(tmp_path / "run")
    with pytest.raises(StageError, match="stage 'toy' has not completed .* run `midtrain toy --run-dir"):
        run.require("toy")
    toy_stage(tmp_path / "run", ToyConfig(), src)
    assert run.require("toy") == tmp_path / "run" / "toy"
    with pytest.raises(StageError, match="input not found"):
        with stage_run(run, "toy", ToyConfig(), inputs=[tmp_path / "absent.txt"]):
            pass


# --------------------------------------------------------------------------- validate, compute, then swap


def test_a_failed_rerun_leaves_the_previous_output_exactly_as_it_was(tmp_path, src):
    run = tmp_path / "run"
    toy_stage(run, ToyConfig(), src)
    before = {p.relative_to(run / "toy").as_posix(): p.read_bytes() for p in (run / "toy").rglob("*") if p.is_file()}
    with pytest.raises(KeyboardInterrupt):  # a new config, interrupted before it completes
        toy_stage(run, ToyConfig(shards=4), src, crash_at=1)
    after = {p.relative_to(run / "toy").as_posix(): p.read_bytes() for p in (run / "toy").rglob("*") if p.is_file()}
    log_name = "log.txt"
    assert {k: v for k, v in after.items() if k != log_name} == {k: v for k, v in before.items() if k != log_name}
    assert manifest(run)["status"] == "complete" and manifest(run)["config"]["shards"] == 3
    # the rerun resumes the failed attempt's finished shard and then replaces the old output
    log: list = []
    toy_stage(run, ToyConfig(shards=4), src, log=log)
    assert log == ["shard-1", "shard-2", "shard-3"]
    assert manifest(run)["config"]["shards"] == 4 and not (run / ".partial/toy").exists()
    assert "stage 'toy' started" in (run / "toy/log.txt").read_text().split("resuming")[0]  # history kept


def test_files_midtrain_did_not_write_are_never_deleted_silently(tmp_path, src):
    run = tmp_path / "run"
    toy_stage(run, ToyConfig(), src)
    assert set(manifest(run)["output_files"]) == {"shard-0.txt", "shard-1.txt", "shard-2.txt", "shards/shard-0.done",
                                                  "shards/shard-1.done", "shards/shard-2.done"}
    (run / "toy/my_notes.txt").write_text("mine")
    toy_stage(run, ToyConfig(), src)  # complete: nothing to do, nothing touched
    log: list = []
    with pytest.raises(StageError, match=r"toy: holds files midtrain did not write \(my_notes.txt\); move them out"):
        toy_stage(run, ToyConfig(shards=2), src, log=log)
    assert (run / "toy/my_notes.txt").read_text() == "mine" and manifest(run)["config"]["shards"] == 3
    (run / "toy/my_notes.txt").rename(tmp_path / "my_notes.txt")
    toy_stage(run, ToyConfig(shards=2), src, log=log)  # the waiting output is put in place, not recomputed
    assert log == ["shard-0", "shard-1"] and manifest(run)["config"]["shards"] == 2
    (run / "toy/other.txt").write_text("x")
    toy_stage(run, ToyConfig(shards=1), src, force=True)
    assert not (run / "toy/other.txt").exists() and "deleting files midtrain did not write" in (run / "toy/log.txt").read_text()


def test_a_swap_cut_between_its_two_renames_is_repaired(tmp_path, src):
    run = tmp_path / "run"
    toy_stage(run, ToyConfig(), src)
    # state after a crash between "old aside" and "new in": no stage folder, the old one aside
    (run / "toy").rename(run / ".partial/toy.old")
    toy_stage(run, ToyConfig(), src)  # the old output is restored and found complete
    assert manifest(run)["status"] == "complete" and not (run / ".partial/toy.old").exists()
    assert "nothing to do" in (run / "toy/log.txt").read_text()


def test_outputs_respect_the_umask(tmp_path, src):
    import os

    old = os.umask(0o002)
    try:
        toy_stage(tmp_path / "run", ToyConfig(), src)
        write_json_atomic(tmp_path / "x.json", {})
    finally:
        os.umask(old)
    for path in [tmp_path / "run/toy/manifest.json", tmp_path / "run/toy/shard-0.txt", tmp_path / "x.json"]:
        assert path.stat().st_mode & 0o777 == 0o664, path


def test_a_run_directory_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(StageError, match="run directory .*file is a file"):
        RunDir(tmp_path / "file")


@dataclass
class ThroughputConfig(ToyConfig):
    batch_size: int = option(8, "rows per step", throughput=True)


def test_throughput_settings_do_not_change_the_fingerprint(tmp_path, src):
    run = tmp_path / "run"
    log: list = []
    with pytest.raises(KeyboardInterrupt):
        toy_stage(run, ThroughputConfig(batch_size=64), src, crash_at=2, log=log)
    toy_stage(run, ThroughputConfig(batch_size=8), src, log=log)  # a retry with a smaller batch resumes
    assert log == ["shard-0", "shard-1", "shard-2"]
    m = manifest(run)
    assert m["throughput_settings"] == {"batch_size": 8} and m["config"]["batch_size"] == 8
    toy_stage(run, ThroughputConfig(batch_size=2), src, log=log)
    assert len(log) == 3  # complete: a throughput change alone is nothing to do
    toy_stage(run, ThroughputConfig(shards=2), src, log=log)
    assert len(log) == 5  # an output setting reruns


# --------------------------------------------------------------------------- one writer per stage

_HOLDER = """
import os, sys, time
from midtrain.runs import RunDir, stage_lock
with stage_lock(RunDir(sys.argv[1]), "toy"):
    started, tell = os.pipe()
    if os.fork() == 0:  # a forked worker (as a DataLoader's) that outlives its killed parent
        os.write(tell, b"x")  # its at-fork hook has run (under load the child may start late)
        time.sleep(30)
        os._exit(0)
    os.read(started, 1)
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_writer_fails_at_once_naming_the_holder_and_a_killed_holder_releases(tmp_path, src):
    import os
    import signal
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(StageError, match=rf"stage 'toy' in .* is already running \(pid {holder.pid} on "
                                             rf"{socket.gethostname()} since \d{{4}}-"):
            toy_stage(run, ToyConfig(), src)
        assert not (run / "toy").exists() and not (run / ".partial/toy").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    toy_stage(run, ToyConfig(), src)  # the kernel released the dead holder's lock (its forked child holds none)
    assert manifest(run)["status"] == "complete"


def test_a_changed_input_recomputes_exactly_the_shards_it_touches(tmp_path, src):
    import hashlib

    def summing_stage(run_dir: Path, force: bool = False, log: list | None = None) -> None:
        numbers = src.read_text().split()
        with stage_run(run_dir, "toy", ToyConfig(), inputs=[src], force=force) as st:
            if st.skipped_as_complete:
                return
            for s in range(3):
                name, part = f"shard-{s}", numbers[s::3]
                key = hashlib.sha1(" ".join(part).encode()).hexdigest()
                if st.reuse_shard(name, key, [f"{name}.txt"]):
                    continue
                write_text_atomic(st.dir / f"{name}.txt", str(sum(map(int, part))))
                st.mark_shard_done(name, {"key": key})
                log.append(name)

    run, log = tmp_path / "run", []
    summing_stage(run, log=log)
    src.write_text(" ".join(["1", "2", "99"] + src.read_text().split()[3:]))  # changes shard 2 only (index 2)
    summing_stage(run, log=log)
    assert log == ["shard-0", "shard-1", "shard-2", "shard-2"]
    assert (run / "toy/shard-2.txt").read_text() == str(99 + 6 + 9 + 12) and (run / "toy/shard-0.txt").read_text() == "22"
    assert json.loads((run / "toy/shards/shard-0.done").read_text())["reused"] is True
    summing_stage(run, force=True, log=log)  # --force recomputes everything
    assert log[4:] == ["shard-0", "shard-1", "shard-2"]


# --------------------------------------------------------------------------- a stage owns its folder


def _open_stage(run: Path, name: str, config, inputs=(), force: bool = False) -> Path:
    """Run a stage that writes one file under ``name`` with ``config`` (its kind comes from the config class)."""
    with stage_run(run, name, config, inputs=inputs, force=force) as st:
        if not st.skipped_as_complete:
            write_text_atomic(st.dir / "out.txt", type(config).__name__)
    return st.final_dir


def test_a_name_that_is_another_stages_folder_is_refused_and_nothing_is_replaced(tmp_path, src):
    from midtrain.catalog.config import CatalogConfig
    from midtrain.data.sources import DatasetSource
    from midtrain.sft.config import SFTConfig
    from midtrain.vla.config import VLAConfig

    run = tmp_path / "run"
    toy_stage(run, ToyConfig(), src)
    catalog = _open_stage(run, "catalog", CatalogConfig(datasets=[DatasetSource(name="s", kind="vlm", format="llava_json", path=src)]))
    assert json.loads((catalog / "manifest.json").read_text())["kind"] == "catalog"
    with pytest.raises(StageError, match=r"run/catalog: name=catalog is the folder of the 'catalog' stage; a 'sft' stage"):
        _open_stage(run, "catalog", SFTConfig(model="m"))
    with pytest.raises(StageError, match=r"name=featurize is the folder of the 'featurize' stage; a 'vla' stage"):
        _open_stage(run, "featurize", VLAConfig(model="m"))
    assert (catalog / "out.txt").read_text() == "CatalogConfig"
    # a folder another kind wrote under a free name: refused too, with --force as well
    _open_stage(run, "sft_vla", SFTConfig(model="m"))
    for force in (False, True):
        with pytest.raises(StageError, match=r"run/sft_vla: written by a 'sft' stage; a 'vla' stage may not replace it"):
            _open_stage(run, "sft_vla", VLAConfig(model="m"), force=force)
    with pytest.raises(StageError, match=r"run/toy: written by a 'test_runs.ToyConfig' stage; a 'sft' stage"):
        _open_stage(run, "toy", SFTConfig(model="m"))
    assert (run / "sft_vla/out.txt").read_text() == "SFTConfig" and manifest(run)["status"] == "complete"
    _open_stage(run, "sft_vla", SFTConfig(model="m", seed=1))  # the same kind replaces its own folder
    # a folder from before kinds were recorded: known by its config keys (an option added since is fine)
    legacy = json.loads((run / "sft_vla/manifest.json").read_text())
    del legacy["kind"], legacy["config"]["lora"]
    (run / "sft_vla/manifest.json").write_text(json.dumps(legacy))
    with pytest.raises(StageError, match=r"run/sft_vla: written by another kind of stage; a 'vla' stage"):
        _open_stage(run, "sft_vla", VLAConfig(model="m"))
    _open_stage(run, "sft_vla", SFTConfig(model="m", seed=2))


def test_a_stage_whose_input_lies_in_its_own_folder_is_refused(tmp_path):
    from midtrain.vla.config import VLAConfig

    run = tmp_path / "run"
    _open_stage(run, "vla_a", VLAConfig(model="m"))
    with pytest.raises(StageError, match=r"run/vla_a: holds this stage's input .*vla_a/out.txt, which the run would replace"):
        _open_stage(run, "vla_a", VLAConfig(model="m", seed=3), inputs=[run / "vla_a/out.txt"])
    assert (run / "vla_a/out.txt").exists()


def test_a_symlinked_stage_folder_is_refused_by_name_and_nothing_sticks(tmp_path, src):
    import os

    run = tmp_path / "run"
    toy_stage(run, ToyConfig(), src)
    elsewhere = tmp_path / "elsewhere"
    (run / "toy").rename(elsewhere)
    os.symlink(elsewhere, run / "toy")
    toy_stage(run, ToyConfig(), src)  # complete: nothing to replace, it reads through the link
    with pytest.raises(StageError, match=r"run/toy: the stage folder is a symbolic link \(to .*elsewhere\); .*link the whole run"):
        toy_stage(run, ToyConfig(shards=2), src)
    assert json.loads((elsewhere / "manifest.json").read_text())["config"]["shards"] == 3
    # a link left aside by an older swap is removed itself (never what it points to), so the next run is not stuck
    (run / "toy").rename(run / ".partial/toy.old")
    toy_stage(run, ToyConfig(), src)  # the old output (the link) is restored
    (run / "toy").unlink()
    (run / "toy").mkdir()
    os.symlink(elsewhere, run / ".partial/toy.old")
    toy_stage(run, ToyConfig(shards=2), src)
    assert manifest(run)["config"]["shards"] == 2 and not os.path.lexists(run / ".partial/toy.old")
    assert (elsewhere / "manifest.json").exists()


def _raise(err):
    def fail(*args, **kwargs):
        raise err

    return fail


@pytest.mark.parametrize("err, message", [
    (OSError(28, "No space left on device"), "no space left on the device; free space"),
    (OSError(30, "Read-only file system"), "read-only file system; use a run directory on a writable filesystem"),
    (PermissionError(13, "Permission denied"), "permission denied; give this user access to it"),
])  # fmt: skip
def test_a_full_disk_or_read_only_folder_is_one_line_and_keeps_the_previous_output(tmp_path, src, monkeypatch, err, message):
    import os

    import midtrain.runs as runs

    run = tmp_path / "run"
    toy_stage(run, ToyConfig(), src)
    before = (run / "toy/manifest.json").read_bytes()
    # a write inside the stage fails (no file name on the error: the stage's partial folder is named)
    monkeypatch.setattr(runs, "_new_temp_file", _raise(err))
    with pytest.raises(StageError, match=rf"^{run}/.partial/toy: {message}.*previous output is unchanged$"):
        toy_stage(run, ToyConfig(shards=2), src)
    monkeypatch.undo()
    # the swap's rename of a read-only stage folder fails (the error names it)
    real_replace = os.replace

    def replace(a, b):
        if Path(a) == run / "toy":
            raise type(err)(err.errno, err.strerror, str(a))
        return real_replace(a, b)

    monkeypatch.setattr(runs.os, "replace", replace)
    with pytest.raises(StageError, match=rf"^{run}/toy: {message}"):
        toy_stage(run, ToyConfig(shards=2), src)
    monkeypatch.undo()
    assert (run / "toy/manifest.json").read_bytes() == before
    toy_stage(run, ToyConfig(shards=2), src)  # nothing stuck: the computed output is put in place
    assert manifest(run)["config"]["shards"] == 2


def test_a_read_only_run_directory_is_one_line(tmp_path, src, monkeypatch):
    import os

    import midtrain.runs as runs

    run = tmp_path / "run"
    RunDir(run)
    real_open = os.open

    def deny(path, *args, **kwargs):
        if str(path).startswith(str(run)):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(runs.os, "open", deny)
    with pytest.raises(StageError, match=rf"^{run}/.locks/toy.lock: permission denied; give this user access"):
        toy_stage(run, ToyConfig(), src)


def test_temporaries_of_a_killed_attempt_are_cleaned_at_the_next_start(tmp_path, src):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        toy_stage(run, ToyConfig(), src, crash_at=2)
    left = [run / ".partial/toy/shards/.shard-0.done.4242.0a1b2c3d.tmp", run / ".partial/toy/.composition.png.4242.deadbeef.tmp",
            run / ".partial/toy/.pool.parquet.tmp", run / ".partial/toy/checkpoints/.step-000008.tmp/weights.pt"]
    for path in left:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("cut by kill -9")
    toy_stage(run, ToyConfig(), src)
    assert not [p for p in (run / "toy").rglob("*") if p.name.endswith(".tmp")]
    assert (run / "toy/checkpoints").is_dir() and manifest(run)["status"] == "complete"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_safetensors_and_other_library_files_follow_the_umask(tmp_path, src, umask, mode):
    import os

    import torch
    from safetensors.torch import save_file

    from midtrain.runs import save_safetensors_atomic

    old = os.umask(umask)
    try:
        save_safetensors_atomic(tmp_path / "w.safetensors", {"x": torch.zeros(2)})
        with stage_run(tmp_path / "run", "toy", ToyConfig()) as st:
            save_file({"x": torch.zeros(2)}, str(st.dir / "lib.safetensors"))  # as save_pretrained does (0600)
    finally:
        os.umask(old)
    for path in [tmp_path / "w.safetensors", tmp_path / "run/toy/lib.safetensors", tmp_path / "run/toy/manifest.json"]:
        assert path.stat().st_mode & 0o777 == mode, path
