"""``midtrain etc``: embodied trajectory-coupled (ETC) VQA from a LeRobot dataset, as LLaVA JSON.

For every episode and every ``frame_stride``-th frame, each generator (:mod:`midtrain.etc.generators`)
asks about the frame and answers from the episode's recorded ground truth. Output::

    <run>/etc/llava/domain_<slug>.json      one LLaVA JSON array per Rethinking domain (``name``: the folder)
    <run>/etc/llava/category_<name>.json    the same samples, one array per ETC category
    <run>/etc/llava/images/<episode>/<frame>.png   each used frame once, shared by its questions
    <run>/etc/catalog_sources.yaml          ``midtrain catalog`` sources, one per domain (etc_<slug>)

A record: ``{"id", "image" (or "images" for two frames), "conversations": [human, gpt],
"etc_category", "domain", "generator", "episode", "frame", "instruction"}`` - readable by
``midtrain catalog`` (format ``llava_json``; image paths relative to the JSON file), LLaMA-Factory
and LLaVA training scripts; a mixture composes domains by catalog source name.

A generator whose quantities the dataset lacks is skipped and the missing field is named in the
manifest (``generators.<name>.missing``); the others run. Keypoints outside the image are dropped
and counted, never clipped. Frames are decoded once per episode (one forward pass through the
video) and written once, so the cost per question is projection and formatting.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import numpy as np
import yaml

from ..runs import RunDir, SampleError, StageError, atomic_path, stage_run, write_text_atomic
from .config import CATEGORIES, DOMAINS, EtcConfig
from .episodes import EtcDataset
from .generators import GENERATORS, QA, Context, Generator

LLAVA_DIR = "llava"
IMAGES_DIR = "images"
SOURCES_FILE = "catalog_sources.yaml"


class _JsonArrays:
    """Many JSON array files written record by record, each renamed into place when complete."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack):
        self.folder, self.stack = folder, stack
        self.files: dict[str, Any] = {}
        self.counts: Counter = Counter()

    def add(self, name: str, record: dict) -> None:
        fh = self.files.get(name)
        if fh is None:
            tmp = self.stack.enter_context(atomic_path(self.folder / name))
            fh = self.files[name] = self.stack.enter_context(open(tmp, "w"))
            fh.write("[\n")
        else:
            fh.write(",\n")
        fh.write(json.dumps(record, ensure_ascii=False))
        self.counts[name] += 1

    def finish(self) -> None:
        for fh in self.files.values():
            fh.write("\n]\n")
            fh.flush()


def _record(gen: Generator, domain: str, ep, qa: QA, paths: dict[int, str]) -> dict:
    frames = [int(ep.frame_ids[p]) for p in qa.frames]
    question = qa.question if "<image>" in qa.question else "<image>\n" + qa.question
    images = [paths[p] for p in qa.frames]
    local = "-".join(str(f) for f in frames) + (f"/{qa.key}" if qa.key else "")
    record: dict[str, Any] = {"id": f"{gen.name}/{ep.index}/{local}"}
    record.update({"image": images[0]} if len(images) == 1 else {"images": images})
    record["conversations"] = [{"from": "human", "value": question}, {"from": "gpt", "value": qa.answer}]
    record.update(etc_category=gen.category, domain=domain, generator=gen.name, episode=ep.index, frame=frames[0],
                  instruction=ep.instruction)  # fmt: skip
    return record


def generate_etc(config: EtcConfig, run_dir: RunDir, force: bool = False) -> Path:
    """Generate the ETC VQA of ``config.dataset`` into ``<run>/etc/``; returns the stage folder."""
    root = Path(config.dataset) if config.dataset else run_dir.require("sim_collect") / "lerobot"
    if not root.is_dir():
        raise StageError(f"dataset: {root} is not a folder (a LeRobot dataset with meta/info.json is expected)")
    inputs = [root] + [Path(p) for p in (config.calibration, config.object_names) if p]
    with stage_run(run_dir, config.name, config, inputs=inputs, force=force) as st:
        if st.skipped_as_complete:
            return st.dir
        dataset = EtcDataset(config, root)
        active, report = _plan(config, dataset, st.log)
        out = st.dir / LLAVA_DIR
        samples: Counter = Counter()
        with contextlib.ExitStack() as stack:
            stack.callback(dataset.close)
            arrays = _JsonArrays(out, stack)
            for ref in st.progress(dataset.episodes, total=len(dataset.episodes), desc="etc", unit="episode"):
                st.counts["episodes"] += 1
                try:
                    with st.timed("read"):
                        ep = dataset.episode(ref)
                    keep = np.arange(0, ep.length, config.frame_stride)
                    with st.timed("generate"):
                        asked = [
                            (gen, qa) for gen in active
                            for qa in gen.fn(ep, keep, Context(config, dataset.width, dataset.height,
                                                               gen.rng(config.seed, ep.index), st.counts))
                        ]  # fmt: skip
                    with st.timed("frames"):
                        paths = dataset.write_frames(ref, ep, [p for _, qa in asked for p in qa.frames], out / IMAGES_DIR)
                except SampleError as err:
                    st.handle(err)
                    continue
                st.counts["frames_written"] += len(paths)
                with st.timed("write"):
                    for gen, qa in asked:
                        domain = config.domains.get(gen.name, gen.domain)
                        record = _record(gen, domain, ep, qa, paths)
                        arrays.add(f"domain_{DOMAINS[domain]}.json", record)
                        arrays.add(f"category_{gen.category}.json", record)
                        samples[gen.name] += 1
            arrays.finish()
        st.counts["samples"] = sum(samples.values())
        if not st.counts["samples"]:
            raise StageError(
                f"{root}: no ETC sample was generated ({st.counts['episodes']} episode(s), skipped: "
                f"{dict(st.skipped)}); see {st.dir / 'errors.jsonl'} and the manifest's generators"
            )
        for name in report:
            report[name]["samples"] = samples.get(name, 0)
        files = {name: n for name, n in sorted(arrays.counts.items())}
        _write_sources(st.dir, st.final_dir / LLAVA_DIR, files, config.name)
        st.extra.update({
            "dataset": str(root), "camera": dataset.camera, "image_size": [dataset.width, dataset.height],
            "generators": report, "files": files,
            "domains": {d: files.get(f"domain_{slug}.json", 0) for d, slug in DOMAINS.items()},
            "categories": {c: files.get(f"category_{c}.json", 0) for c in CATEGORIES},
            "missing_fields": dataset.missing,
        })  # fmt: skip
        st.log.info("etc: %d samples from %d episodes; per generator %s", st.counts["samples"], st.counts["episodes"],
                    dict(samples))  # fmt: skip
    return st.final_dir


def _plan(config: EtcConfig, dataset: EtcDataset, log) -> tuple[list[Generator], dict[str, dict]]:
    """The generators that can run on this dataset, and a manifest entry for every selected one."""
    active, report = [], {}
    for name in config.generators or list(GENERATORS):
        gen = GENERATORS[name]
        entry: dict[str, Any] = {"category": gen.category, "domain": config.domains.get(name, gen.domain)}
        missing = gen.missing(dataset.has)
        if missing:
            reasons = [dataset.missing.get(m.split("|")[0], m) for m in missing]
            entry.update(status="skipped", missing=missing, reason="; ".join(reasons))
            log.warning("generator %s skipped: the dataset lacks %s (%s)", name, ", ".join(missing), entry["reason"])
        else:
            entry["status"] = "ran"
            active.append(gen)
        report[name] = entry
    if not active:
        reasons = "; ".join(f"{n}: {e['reason']}" for n, e in report.items())
        raise StageError(f"{dataset.root}: no ETC generator can run on this dataset ({reasons})")
    return active, report


def _write_sources(stage_dir: Path, out: Path, files: dict[str, int], prefix: str) -> None:
    """``catalog_sources.yaml`` in ``stage_dir``: one ``midtrain catalog`` source per domain file written
    (``<prefix>_<slug>``, the names :mod:`midtrain.etc.compositions` gives them), by its path
    ``out / domain_<slug>.json`` once the stage is in place."""
    sources: list[dict[str, Optional[str]]] = []
    for domain, slug in DOMAINS.items():
        name = f"domain_{slug}.json"
        if files.get(name):
            sources.append({"name": f"{prefix}_{slug}", "kind": "vlm", "format": "llava_json", "path": str((out / name).resolve())})
    header = (f"# midtrain catalog sources for the ETC data, one per Rethinking domain ({prefix}_<domain>); paste the\n"
              "# entries under a catalog config's datasets:. category_<name>.json files in the same folder split the\n"
              "# same samples by ETC category instead.\n")  # fmt: skip
    write_text_atomic(stage_dir / SOURCES_FILE, header + yaml.safe_dump({"datasets": sources}, sort_keys=False, width=1000))
