"""Readers read what the producing stage recorded: a feature shard or catalog part copied into a
stage folder by hand is ignored with a warning naming it (fit, gap, score, select and featurize
read through these), and a catalog source folder holds its rows alone."""

from __future__ import annotations

import logging
import shutil

import pandas as pd
import pytest
from run_fixtures import build_run

from midtrain.data.catalog import catalog_files, catalog_num_rows
from midtrain.data.features import open_features


def test_a_copied_feature_shard_is_ignored_with_a_warning_and_fit_counts_only_the_written_rows(tmp_path, caplog):
    from midtrain.fit.config import FitConfig
    from midtrain.fit.stage import fit_estimator

    run = build_run(tmp_path, n_near=30, n_far=30, n_vla=40, dim=8)
    shards = run.stage_dir("featurize") / "shards"
    before = open_features(run.stage_dir("featurize"))
    for suffix in (".npy", ".ids.parquet", ".done"):
        shutil.copy(shards / f"shard-00000{suffix}", shards / f"shard-00099{suffix}")
    with caplog.at_level(logging.WARNING, logger="midtrain"):
        after = open_features(run.stage_dir("featurize"))
    assert after.names == before.names and "shard-00099" not in after.names
    assert any(f"ignoring {shards / 'shard-00099.done'}: not written by the stage" in r.getMessage() for r in caplog.records)
    out = fit_estimator(FitConfig(max_epochs=1), run)
    counts = run.manifest("fit")["counts"]
    assert (counts["positives"], counts["negatives"]) == (40, 60), out


def test_a_copied_catalog_part_is_ignored_with_a_warning(tmp_path, caplog):
    run = build_run(tmp_path, n_near=5, n_far=5, n_vla=5, dim=4)
    catalog = run.stage_dir("catalog")
    shutil.copy(catalog / "near/part-00000.parquet", catalog / "near/part-00099.parquet")
    with caplog.at_level(logging.WARNING, logger="midtrain"):
        files = catalog_files(catalog)
    assert catalog / "near/part-00099.parquet" not in files and catalog_num_rows(catalog) == 15
    assert any("near/part-00099.parquet: not written by the stage" in r.getMessage() for r in caplog.records)


def test_a_catalog_source_folder_reads_as_exactly_its_rows(tmp_path, llava_dir):
    from midtrain.cli import run_stage

    source = {"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(llava_dir / "data.jsonl")}
    out = run_stage("catalog", tmp_path / "run", None, [], base={"datasets": [source], "rows_per_part": 4})
    frame = pd.read_parquet(out / "pool")
    assert len(frame) == catalog_num_rows(out) == 6 and frame["id"].notna().all()
    assert sorted(p.name for p in (out / "references" / "pool").iterdir()) == ["references-00000.parquet", "references-00001.parquet"]
    # the catalog's source folder is itself a Parquet dataset another catalog can read
    again = run_stage("catalog", tmp_path / "run2", None, [],
                      base={"datasets": [{"name": "copy", "kind": "vlm", "format": "parquet", "path": str(out / "pool"),
                                                     "allow_outside_root": True}]})
    assert catalog_num_rows(again) == 6


def test_references_is_a_reserved_source_name(llava_dir):
    from midtrain.catalog.config import CatalogConfig
    from midtrain.config import ConfigError

    with pytest.raises(ConfigError, match="datasets\\[0\\].name: 'references' is the catalog's folder"):
        CatalogConfig(datasets=[{"name": "references", "kind": "vlm", "format": "llava_jsonl", "path": str(llava_dir / "data.jsonl")}])
