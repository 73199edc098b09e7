"""``midtrain sim pool``: a synthetic VLM pool of known character, as LLaVA-JSON datasets.

Writes, for each source in ``config.sources``::

    <run>/sim_pool/<source>/data.json    [{"id", "image": "images/<id>.png",
                                          "conversations": [{"from": "human", "value": "<image>\\nQ"},
                                                            {"from": "gpt", "value": "A"}, ...]}, ...]
    <run>/sim_pool/<source>/images/<id>.png
    <run>/sim_pool/pool.json             the sources with their descriptions, counts and paths

Generation is offline and deterministic: sample ``i`` of a source is drawn from a generator
seeded by (seed, source, i), so the same seed gives identical JSON and identical image bytes
at any number of workers. A source is written into a hidden folder and renamed into place
when complete, and marked done, so an interrupted stage redoes only unfinished sources.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError, StageConfig, option
from ..data.images import encode_image
from ..runs import RunDir, stage_run, write_json_atomic
from ..seeding import keyed_rng
from .metaworld_env import CAMERAS, ensure_gl_backend
from .parallel import map_in_workers
from .pool_sources import GENERATORS, SOURCE_DESCRIPTIONS, SOURCES, PoolSample

STAGE = "sim_pool"


@dataclass
class SimPoolConfig(StageConfig):
    """Which sources to generate and how big. Keep ``camera`` equal to ``sim collect``'s so the
    embodied source looks like the robot frames; every sample is a function of (seed, source,
    index), so the worker and job settings change only the speed."""

    sources: list[str] = option(factory=lambda: list(SOURCES), help="pool sources to generate")
    samples_per_source: int = option(200, "samples of every source not named in `source_sizes`")
    source_sizes: dict[str, int] = option(factory=dict, help="samples of the sources named here")
    image_size: int = option(128, "image side, pixels (book covers and documents: 3:4 portrait of that height)")
    camera: str = option("corner", "the Meta-World camera of the spatial scenes")
    max_objects: int = option(4, "most objects in a spatial scene")
    workers: int = option(2, "generating processes (0 or 1: this process)", throughput=True)
    samples_per_job: int = option(25, "samples a worker generates at a time", throughput=True)

    def validate(self) -> None:
        if not self.sources:
            raise ConfigError("sources: at least one source is needed")
        for key, names in (("sources", self.sources), ("source_sizes", list(self.source_sizes))):
            unknown = [s for s in names if s not in SOURCES]
            if unknown:
                raise ConfigError(f"{key}: unknown source {unknown[0]!r}; sources are {', '.join(SOURCES)}")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError("sources: a source is listed more than once")
        for name, size in [("samples_per_source", self.samples_per_source),
                           *((f"source_sizes.{k}", v) for k, v in self.source_sizes.items())]:  # fmt: skip
            if size < 1:
                raise ConfigError(f"{name}: must be >= 1, got {size}")
        if not 32 <= self.image_size <= 1024:
            raise ConfigError(f"image_size: must be in [32, 1024] pixels, got {self.image_size}")
        if self.camera not in CAMERAS:
            raise ConfigError(f"camera: {self.camera!r} is not a Meta-World camera; choose one of {', '.join(CAMERAS)}")
        if not 2 <= self.max_objects <= 8:
            raise ConfigError(f"max_objects: must be in [2, 8], got {self.max_objects}")
        if self.workers < 0:
            raise ConfigError(f"workers: must be >= 0 (0 or 1 generates in this process), got {self.workers}")
        if self.samples_per_job < 1:
            raise ConfigError(f"samples_per_job: must be >= 1, got {self.samples_per_job}")

    def size_of(self, source: str) -> int:
        return self.source_sizes.get(source, self.samples_per_source)


@dataclass(frozen=True)
class PoolJob:
    source: str
    start: int
    stop: int
    seed: int
    image_size: int
    camera: str
    max_objects: int


def sample_rng(seed: int, source: str, index: int) -> np.random.Generator:
    """The generator of sample ``index`` of ``source``: independent of order and worker."""
    return keyed_rng(seed, source, index)


def sample_id(source: str, index: int) -> str:
    return f"{source}-{index:05d}"


_scene_renderers: dict = {}  # per process: (camera, size, max_objects) -> TabletopSceneRenderer


def generate_sample(source: str, index: int, seed: int, image_size: int, camera: str, max_objects: int) -> PoolSample:
    """Sample ``index`` of ``source`` (a pure function of the arguments)."""
    rng = sample_rng(seed, source, index)
    if source == "spatial_pointing":
        key = (camera, image_size, max_objects)
        if key not in _scene_renderers:
            from .scenes import TabletopSceneRenderer

            _scene_renderers[key] = TabletopSceneRenderer(camera, image_size, image_size, max_objects)
        return GENERATORS[source](rng, _scene_renderers[key])
    return GENERATORS[source](rng, image_size)


def _close_scene_renderers() -> None:
    for renderer in _scene_renderers.values():
        renderer.close()
    _scene_renderers.clear()


def run_pool_job(job: PoolJob) -> list[tuple[str, bytes, list[tuple[str, str]]]]:
    """Generate samples [start, stop) of one source -> (id, PNG bytes, turns) each."""
    out = []
    for i in range(job.start, job.stop):
        sample = generate_sample(job.source, i, job.seed, job.image_size, job.camera, job.max_objects)
        out.append((sample_id(job.source, i), encode_image(sample.image.convert("RGB"), "PNG"), sample.turns))
    return out


def llava_record(sid: str, image: str, turns: list[tuple[str, str]]) -> dict:
    """A LLaVA-format record; the ``<image>`` placeholder opens the first human turn."""
    conversations = []
    for k, (question, answer) in enumerate(turns):
        conversations.append({"from": "human", "value": f"<image>\n{question}" if k == 0 else question})
        conversations.append({"from": "gpt", "value": answer})
    return {"id": sid, "image": image, "conversations": conversations}


def generate_vlm_pool(config: SimPoolConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Generate every configured source under ``<run>/sim_pool/``; returns the stage folder."""
    with stage_run(run_dir, STAGE, config, inputs=[], force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        todo = [s for s in config.sources if not st.shard_done(s)]
        for source in config.sources:
            if source not in todo:
                st.counts["written"] += st.shard_info(source)["samples"]
        if "spatial_pointing" in todo:
            st.extra["gl_backend"] = ensure_gl_backend()  # before any process imports mujoco
        jobs = [
            PoolJob(source, start, min(start + config.samples_per_job, config.size_of(source)), config.seed,
                    config.image_size, config.camera, config.max_objects)
            for source in todo
            for start in range(0, config.size_of(source), config.samples_per_job)
        ]  # fmt: skip
        partial = {s: st.dir / f".{s}.partial" for s in todo}
        records: dict[str, list[dict]] = {s: [] for s in todo}
        pending = {s: sum(1 for j in jobs if j.source == s) for s in todo}
        for path in partial.values():
            shutil.rmtree(path, ignore_errors=True)
            (path / "images").mkdir(parents=True)
        try:
            results = map_in_workers(run_pool_job, jobs, config.workers)
            for job, samples in zip(jobs, st.progress(results, total=len(jobs), desc="sim pool", unit="job")):
                st.current_shard = job.source
                with st.timed("write"):
                    for sid, png, turns in samples:
                        image = f"images/{sid}.png"
                        (partial[job.source] / image).write_bytes(png)
                        records[job.source].append(llava_record(sid, image, turns))
                pending[job.source] -= 1
                if pending[job.source] == 0:
                    _finish_source(st, job.source, partial[job.source], records.pop(job.source))
        finally:
            if config.workers <= 1:
                _close_scene_renderers()
        st.current_shard = None
        index = {
            "format": "llava_json",
            "sources": [
                {"name": s, "kind": "vlm", "description": SOURCE_DESCRIPTIONS[s], "samples": config.size_of(s),
                 "path": f"{s}/data.json", "image_root": s}
                for s in config.sources
            ],
        }  # fmt: skip
        write_json_atomic(st.dir / "pool.json", index)
        st.extra["sources"] = {s: config.size_of(s) for s in config.sources}
    return st.dir


def _finish_source(st, source: str, partial: Path, records: list[dict]) -> None:
    """data.json last, then the folder renamed into place, then the source marked done."""
    (partial / "data.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    _fsync_tree(partial)
    final = st.dir / source
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    st.mark_shard_done(source, {"samples": len(records)})
    st.counts["written"] += len(records)
    st.log.info("%s: %d samples written to %s", source, len(records), final)


def _fsync_tree(root: Path) -> None:
    """Flush a finished source's files to disk before the rename publishes it."""
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
