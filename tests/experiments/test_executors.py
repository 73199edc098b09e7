"""Executors: the same stage calls in this process or as Ray tasks on a local 2-CPU cluster; a
worker that dies fails its call only, a stage's own error reaches the driver, and a cluster that
does not answer or cannot fit a sub-stage is refused in one line before any work."""

from __future__ import annotations

import operator
import os

import pytest

from midtrain.config import ConfigError
from midtrain.experiments.executors import Call, LocalExecutor, RayExecutor, RaySettings, Resources, make_executor
from midtrain.experiments.runner import StageCall, StageRunner
from midtrain.runs import RunDir, StageError

ray = pytest.importorskip("ray")


def _catalog(llava_dir) -> dict:
    return {"datasets": [{"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(llava_dir / "data.jsonl")}]}


def test_local_executor_runs_in_order_and_raises():
    out = LocalExecutor().run([Call("a", operator.add, (1, 2)), Call("b", operator.mul, (2, 5))])
    assert [(o.label, o.value, o.ok) for o in out] == [("a", 3, True), ("b", 10, True)]
    with pytest.raises(ZeroDivisionError):
        LocalExecutor().run([Call("x", operator.truediv, (1, 0))])
    with pytest.raises(ConfigError, match="^backend: expected local or ray"):
        make_executor("slurm")


def test_an_address_that_does_not_answer_fails_in_one_line_at_once():
    if ray.is_initialized():
        pytest.skip("a Ray instance is already connected in this process")
    with pytest.raises(StageError, match=r"^ray\.address: no Ray cluster answers at '127\.0\.0\.1:1' \(Connection"):
        RayExecutor(RaySettings(address="127.0.0.1:1"))


@pytest.fixture(scope="module")
def ray_executor():
    executor = RayExecutor(RaySettings(num_cpus=2), threads=1)
    yield executor
    executor.close()


@pytest.mark.slow  # starts a local Ray cluster (about a minute on the shared 2 cores)
def test_ray_wave_writes_the_same_stage_folders_as_local(tmp_path, llava_dir, ray_executor):
    outs = {}
    for name, executor in (("local", None), ("ray", ray_executor)):
        runner = StageRunner(RunDir(tmp_path / name), name="test", executor=executor)
        wave = [StageCall("catalog", _catalog(llava_dir), RunDir(tmp_path / name / n), f"{n}/catalog") for n in "ab"]
        outs[name] = runner.run_wave(wave)
        assert list(outs[name]) == ["a/catalog", "b/catalog"] and not runner.failures
        assert [r["stage"] for r in runner.records] == ["a/catalog", "b/catalog"]
    for n in ("a", "b"):
        folder = outs["ray"][f"{n}/catalog"]
        assert folder == tmp_path / "ray" / n / "catalog"  # written by a worker into the shared run directory
        parts = sorted(p.relative_to(folder) for p in folder.rglob("*.parquet"))
        assert parts and parts == sorted(p.relative_to(outs["local"][f"{n}/catalog"]) for p in outs["local"][f"{n}/catalog"].rglob("*.parquet"))
    before = (tmp_path / "ray" / "a" / "catalog" / "manifest.json").read_text()
    StageRunner(RunDir(tmp_path / "ray" / "a"), executor=ray_executor).run("catalog", _catalog(llava_dir))
    assert (tmp_path / "ray" / "a" / "catalog" / "manifest.json").read_text() == before  # complete: skipped


@pytest.mark.slow  # starts a local Ray cluster (about a minute on the shared 2 cores)
def test_a_dead_worker_fails_its_call_only_and_a_stage_error_reaches_the_driver(ray_executor):
    out = ray_executor.run([Call("ok", operator.add, (2, 3)), Call("killed", os._exit, (1,)), Call("ok2", abs, (-4,))])
    assert [(o.label, o.value) for o in out if o.ok] == [("ok", 5), ("ok2", 4)]
    (dead,) = [o for o in out if not o.ok]
    assert dead.label == "killed" and "Worker" in dead.error and "\n" not in dead.error
    with pytest.raises(ZeroDivisionError):
        ray_executor.run([Call("div", operator.truediv, (1, 0)), Call("fine", abs, (-1,))])


@pytest.mark.slow  # starts a local Ray cluster (about a minute on the shared 2 cores)
def test_resources_no_node_has_are_refused_before_work(ray_executor):
    assert ray_executor.resources(Call("x", abs, (), device="cpu")) == Resources(1.0, 0.0)
    assert ray_executor.resources(Call("x", abs, (), device="cuda")) == Resources(1.0, 1.0)
    assert ray_executor.resources(Call("x", abs, (), device="auto")).num_gpus == 0.0  # the cluster has no GPU
    with pytest.raises(ConfigError, match=r"^ray: a sub-stage asks for 1 CPU and 1 GPU per task, and no node has that"):
        ray_executor.check([Resources(1.0, 1.0)])
    with pytest.raises(ConfigError, match="asks for 1 CPU and 1 GPU"):
        ray_executor.run([Call("a", abs, (-1,)), Call("gpu", abs, (-1,), device="cuda")])
    wide = RayExecutor.__new__(RayExecutor)
    wide.__dict__.update(ray_executor.__dict__, settings=RaySettings(cpus_per_stage=8))
    with pytest.raises(ConfigError, match="asks for 8 CPU and 0 GPU"):
        wide.check([wide.resources(Call("x", abs, (), device="cpu"))])
