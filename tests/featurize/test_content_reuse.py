"""Content, not names, decides what featurize recomputes: replace one image the catalog references,
rerun catalog and featurize, and exactly the shard holding its row is recomputed."""

import json

import numpy as np

from catalog_fixtures import write_png
from midtrain.catalog.config import CatalogConfig
from midtrain.catalog.stage import build_catalog
from midtrain.featurize.config import FeaturizeConfig
from midtrain.featurize.stage import featurize
from midtrain.runs import RunDir


def test_a_replaced_image_recomputes_exactly_the_shard_that_holds_it(tmp_path, llava_dir, tiny_vlm):
    model = tiny_vlm("qwen2_vl")
    run = RunDir(tmp_path / "run")
    catalog = CatalogConfig(datasets=[{"name": "pool", "kind": "vlm", "format": "llava_json",
                                       "path": str(llava_dir / "data.json")}])  # fmt: skip
    feats = FeaturizeConfig(model=str(model), shard_size=2, batch_size=2, num_workers=0)
    build_catalog(catalog, run)
    featurize(feats, run)
    shards = run.root / "featurize" / "shards"
    before = {p.name: (p.stat().st_ino, np.load(p)) for p in sorted(shards.glob("shard-*.npy"))}
    assert len(before) == 3  # 6 records, 2 per shard; img3.png is row 3 -> shard 1

    write_png(llava_dir / "images" / "img3.png", 200)  # same name, new content
    build_catalog(catalog, run)
    featurize(feats, run)
    man = json.loads((run.root / "featurize" / "manifest.json").read_text())
    assert man["reused_shards"] == 2 and man["counts"]["written"] == 6
    after = {p.name: (p.stat().st_ino, np.load(p)) for p in sorted(shards.glob("shard-*.npy"))}
    assert after["shard-00000.npy"][0] == before["shard-00000.npy"][0]  # hard-linked, not recomputed
    assert after["shard-00002.npy"][0] == before["shard-00002.npy"][0]
    assert after["shard-00001.npy"][0] != before["shard-00001.npy"][0]
    changed = np.abs(after["shard-00001.npy"][1].astype(np.float32) - before["shard-00001.npy"][1].astype(np.float32)).max(1)
    assert changed[0] == 0 and changed[1] > 0  # row 2 (text only) unchanged, row 3 (the new image) changed
