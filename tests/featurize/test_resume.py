"""Kill featurize with SIGKILL mid-run, run the same command again: only missing shards are
computed and the result equals an uninterrupted run, bit for bit."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from catalog_rows import vla_rows, vlm_rows, write_catalog
from midtrain.featurize.config import FeaturizeConfig
from midtrain.featurize.stage import featurize
from midtrain.runs import RunDir

SHARDS = 12


def cli(run_dir, model):
    return [sys.executable, "-m", "midtrain.cli", "featurize", "--run-dir", str(run_dir), f"model={model}",
            "shard_size=4", "batch_size=2", "num_workers=1"]  # fmt: skip


def shard_files(run_dir):
    shards = run_dir / "featurize" / "shards"
    return sorted(p.name for p in shards.iterdir() if not p.name.startswith(".")) if shards.exists() else []


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted_run(tmp_path, tiny_vlm):
    model = tiny_vlm("qwen2_vl")
    rows = {"llava": vlm_rows(30, seed=20), "robot": vla_rows(18, seed=21)}  # 48 rows -> 12 shards of 4
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    write_catalog(killed, rows)
    write_catalog(reference, rows)
    env = {**os.environ, "MIDTRAIN_PROGRESS": "off"}

    proc = subprocess.Popen(cli(killed, model), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    done_dir = killed / ".partial" / "featurize" / "shards"  # where a run works until it completes
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if done_dir.exists() and any(done_dir.glob("*.done")):
            break
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done_before = sorted(p.name for p in done_dir.glob("*.done"))
    assert 1 <= len(done_before) < SHARDS
    assert '"status": "running"' in (killed / ".partial" / "featurize" / "manifest.json").read_text()
    assert not (killed / "featurize").exists()
    mtimes = {n: (done_dir / n).stat().st_mtime_ns for n in done_before}

    rerun = subprocess.run(cli(killed, model), env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} already done" in rerun.stderr
    final_dir = killed / "featurize" / "shards"
    assert all((final_dir / n).stat().st_mtime_ns == t for n, t in mtimes.items())  # finished shards kept

    featurize(FeaturizeConfig(model=str(model), shard_size=4, batch_size=2, num_workers=1), RunDir(reference))
    assert shard_files(killed) == shard_files(reference) and len(shard_files(reference)) == 3 * SHARDS
    for name in shard_files(reference):
        a, b = killed / "featurize" / "shards" / name, reference / "featurize" / "shards" / name
        if name.endswith(".npy"):
            np.testing.assert_array_equal(np.load(a), np.load(b))
        elif name.endswith(".ids.parquet"):
            assert a.read_bytes() == b.read_bytes()
    import json

    man = json.loads((killed / "featurize" / "manifest.json").read_text())
    assert man["status"] == "complete" and man["counts"]["read"] == man["counts"]["written"] == 48
