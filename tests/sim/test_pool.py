"""``sim pool``: five LLaVA-JSON sources, deterministic, resumable, readable by the catalog."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from midtrain.config import ConfigError, load_config
from midtrain.runs import RunDir
from midtrain.sim.pool import SimPoolConfig, generate_vlm_pool
from midtrain.sim.pool_sources import SOURCES, counting_sample

SMALL = dict(samples_per_source=6, image_size=64, samples_per_job=4)


def _tree(root: Path) -> dict[str, bytes]:
    """Every pool file (data.json, images, pool.json) by relative path -> bytes."""
    files = [p for p in root.rglob("*") if p.is_file() and (p.suffix == ".png" or p.name in ("data.json", "pool.json"))]
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    run = RunDir(tmp_path_factory.mktemp("pool"))
    return generate_vlm_pool(SimPoolConfig(workers=1, **SMALL), run)


def test_every_source_is_a_llava_json_dataset_with_images(pool):
    index = json.loads((pool / "pool.json").read_text())
    assert [s["name"] for s in index["sources"]] == list(SOURCES)
    for source in SOURCES:
        records = json.loads((pool / source / "data.json").read_text())
        assert len(records) == 6 and len({r["id"] for r in records}) == 6
        for record in records:
            image = Image.open(pool / source / record["image"])
            assert image.mode == "RGB" and image.height == 64
            turns = record["conversations"]
            assert len(turns) >= 2 and len(turns) % 2 == 0
            assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
            assert turns[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in turns) == 1
            assert all(t["value"].strip() for t in turns)


@pytest.mark.slow
def test_same_seed_same_bytes_at_any_worker_count(pool, tmp_path):
    again = generate_vlm_pool(SimPoolConfig(workers=2, **SMALL), RunDir(tmp_path / "again"))
    assert _tree(again) == _tree(pool)
    other = generate_vlm_pool(SimPoolConfig(workers=1, seed=1, **SMALL), RunDir(tmp_path / "other"))
    differing = [s for s in SOURCES if (other / s / "data.json").read_bytes() != (pool / s / "data.json").read_bytes()]
    assert differing == list(SOURCES)


def test_interrupted_pool_redoes_only_unfinished_sources(pool, tmp_path):
    import shutil

    run_root = tmp_path / "resume"
    shutil.copytree(pool.parent, run_root)
    out, partial = run_root / "sim_pool", run_root / ".partial" / "sim_pool"
    partial.parent.mkdir(exist_ok=True)
    out.rename(partial)  # as if killed while writing captions: the run's partial folder
    manifest = json.loads((partial / "manifest.json").read_text())
    manifest["status"] = "running"
    (partial / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(partial / "captions")
    (partial / "shards" / "captions.done").unlink()
    kept_mtime = (partial / "counting" / "data.json").stat().st_mtime_ns
    generate_vlm_pool(SimPoolConfig(workers=1, **SMALL), RunDir(run_root))
    assert (out / "counting" / "data.json").stat().st_mtime_ns == kept_mtime
    assert _tree(out) == _tree(pool)
    assert json.loads((out / "manifest.json").read_text())["counts"]["written"] == 6 * len(SOURCES)


def test_pool_reads_through_the_catalog(pool, tmp_path):
    from midtrain.catalog.config import CatalogConfig
    from midtrain.catalog.stage import build_catalog
    from midtrain.data.catalog import iter_catalog
    from midtrain.data.sources import DatasetSource

    index = json.loads((pool / "pool.json").read_text())
    sources = [
        DatasetSource(name=s["name"], kind="vlm", format="llava_json", path=pool / s["path"],
                      image_root=pool / s["image_root"])
        for s in index["sources"]
    ]  # fmt: skip
    catalog = build_catalog(CatalogConfig(datasets=sources), RunDir(tmp_path))
    rows = [row for batch in iter_catalog(catalog) for row in batch.to_pylist()]
    assert len(rows) == 6 * len(SOURCES)
    assert {r["source"] for r in rows} == set(SOURCES) and {r["kind"] for r in rows} == {"vlm"}


def test_pointing_answers_are_normalized_points(pool):
    records = json.loads((pool / "spatial_pointing" / "data.json").read_text())
    records += json.loads((pool / "counting" / "data.json").read_text())
    points = [
        (float(x), float(y))
        for r in records
        for t in r["conversations"] if t["from"] == "gpt"
        for x, y in re.findall(r"\(([0-9.]+), ([0-9.]+)\)", t["value"])
    ]  # fmt: skip
    assert points and all(0.0 <= x <= 1.0 and 0.0 <= y <= 1.0 for x, y in points)


def test_counting_answers_match_the_drawn_shapes():
    """'How many shapes' answers equal the number of connected non-background blobs."""
    from scipy import ndimage

    checked = 0
    for i in range(40):
        sample = counting_sample(np.random.default_rng([9, i]), 128)
        question, answer = sample.turns[0]
        if question != "How many shapes are there in the image?":
            continue
        pixels = np.asarray(sample.image).astype(int)
        background = pixels[0, 0]
        foreground = np.abs(pixels - background).sum(axis=2) > 60
        _, blobs = ndimage.label(foreground)
        assert blobs == int(answer)
        checked += 1
    assert checked >= 3


@pytest.mark.parametrize(
    "override, key",
    [("sources=[memes]", "sources"), ("samples_per_source=0", "samples_per_source"),
     ("source_sizes={captions: 0}", "source_sizes.captions"), ("camera=front", "camera"),
     ("image_size=8", "image_size")],
)  # fmt: skip
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config(SimPoolConfig, overrides=[override])
