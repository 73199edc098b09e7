"""A featurize run that ran out of memory, retried with a smaller batch, computes only the missing
shards, and its result equals an uninterrupted run: batch size is a throughput setting."""

import json

import numpy as np
import pytest

from catalog_rows import vla_rows, vlm_rows, write_catalog
from midtrain.featurize import featurizer as featurizer_module
from midtrain.featurize.config import FeaturizeConfig
from midtrain.featurize.stage import featurize
from midtrain.runs import RunDir


def features(run_dir):
    shards = sorted((run_dir / "featurize" / "shards").glob("shard-*.npy"))
    return {p.name: np.load(p) for p in shards}


def test_out_of_memory_retry_with_a_smaller_batch_keeps_finished_shards(tmp_path, tiny_vlm, monkeypatch):
    model = tiny_vlm("qwen2_vl")
    rows = {"llava": vlm_rows(14, seed=30), "robot": vla_rows(10, seed=31)}  # 24 rows -> 6 shards of 4
    oom, reference = tmp_path / "oom", tmp_path / "reference"
    write_catalog(oom, rows)
    write_catalog(reference, rows)
    base = dict(model=str(model), shard_size=4, num_workers=0)

    real_add = featurizer_module.ShardSink.add

    def add_then_run_out_of_memory(self, item, feats, counts):
        if len(self.written) >= 5:  # shards 0-4 are written, then a batch of the last one "runs out of memory"
            raise MemoryError("CPU out of memory (simulated)")
        return real_add(self, item, feats, counts)

    monkeypatch.setattr(featurizer_module.ShardSink, "add", add_then_run_out_of_memory)
    with pytest.raises(MemoryError):
        featurize(FeaturizeConfig(**base, batch_size=4), RunDir(oom))
    partial = oom / ".partial" / "featurize" / "shards"
    done = sorted(p.name for p in partial.glob("*.done"))
    assert len(done) == 5 and not (oom / "featurize").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in partial.glob("shard-*.npy")}

    monkeypatch.setattr(featurizer_module.ShardSink, "add", real_add)
    featurize(FeaturizeConfig(**base, batch_size=1), RunDir(oom))  # the retry, with a smaller batch
    log = (oom / "featurize" / "log.txt").read_text()
    assert "5 already done (0 reused from the previous output, same content), 1 to featurize" in log
    final = oom / "featurize" / "shards"
    assert all((final / name).stat().st_mtime_ns == t for name, t in mtimes.items())  # not recomputed
    man = json.loads((oom / "featurize" / "manifest.json").read_text())
    assert man["throughput_settings"]["batch_size"] == 1 and man["counts"]["written"] == 24

    featurize(FeaturizeConfig(**base, batch_size=4), RunDir(reference))
    got, want = features(oom), features(reference)
    assert got.keys() == want.keys() and len(want) == 6
    for name in want:  # float16 features; the shard computed at batch 1 vs 4 may differ in the last bit
        np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), rtol=2e-3, atol=1e-3)
    # an output setting still invalidates: a different pooling recomputes every shard
    featurize(FeaturizeConfig(**base, batch_size=4, pooling="last"), RunDir(oom))
    assert "0 already done (0 reused from the previous output, same content), 6 to featurize" in (
        oom / "featurize" / "log.txt").read_text()
