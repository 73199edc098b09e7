"""ETC capability domains as training data: references like ``etc:grounding+egocentric`` resolved to
the domain files an ``etc`` stage wrote, with the weights of a fixed-budget composition.

A **reference** names an ``etc`` stage output and some of its domains::

    grounding+egocentric            domains of <run>/etc (the default stage folder)
    etc:grounding+egocentric        the same, the folder named
    etc_target:all                  every domain the stage in <run>/etc_target wrote
    /data/etc_lab:Grounding         an etc stage folder anywhere (a path), display names allowed

Domains are the slugs or display names of :data:`midtrain.etc.config.DOMAINS` (``spatial``,
``grounding``, ``plan_reasoning``, ``camera_prediction``, ``egocentric``, ``temporal``,
``action_ntp``), joined by ``+``; ``all`` is every domain the stage wrote at least one sample of.
Each domain becomes a training source named ``<folder>_<slug>`` (``etc_grounding``, as in the
stage's ``catalog_sources.yaml``), read as LLaVA JSON.

**Weights.** Rethinking-VLA-Initialization (Sec. 4.1.2) fixes the budget and *samples evenly from
the selected domains*: within one reference every domain gets the same weight. Several references
(``{"etc_target:all": 0.94, "etc_ood:grounding": 0.06}``: target-scene ETC with a small share of
out-of-distribution ETC, etc-two-bridges' Retentive Adaptation; or ``{"etc:grounding": 2,
"etc:egocentric": 1}``) split the total by their shares, each share split evenly over its domains;
a domain may appear in one reference only. With a budget of ``N`` samples, ``midtrain sft``'s
``mixture`` draws ``N x weight`` from each source (largest-remainder rounding), so every
composition at the same budget trains on the same number of samples.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Union

from ..config import ConfigError
from ..runs import StageError
from .config import DOMAINS

LLAVA_DIR = "llava"  # the stage's output folder of LLaVA JSON (midtrain.etc.stage.LLAVA_DIR)
ALL = "all"
_SLUG_OF = {**{slug: slug for slug in DOMAINS.values()}, **{name.lower(): slug for name, slug in DOMAINS.items()}}
_FOLDER = re.compile(r"^[A-Za-z0-9_.-]+$")

EtcSpec = Union[str, Mapping[str, float]]


@dataclass(frozen=True)
class EtcReference:
    """A parsed reference: the etc stage folder (a name in the run directory, or a path) and the
    domain slugs (``None`` = every domain the stage wrote)."""

    folder: str
    domains: Optional[tuple[str, ...]]
    text: str

    @property
    def is_path(self) -> bool:
        return "/" in self.folder or self.folder.startswith("~")

    @property
    def prefix(self) -> str:
        """The source-name prefix: the folder's last component (``etc``, ``etc_target``)."""
        return Path(self.folder).expanduser().name if self.is_path else self.folder


def domain_slug(name: str, where: str) -> str:
    """``grounding`` / ``Grounding`` / ``Egocentric Understanding`` -> the file slug; ConfigError otherwise."""
    slug = _SLUG_OF.get(name.strip().lower())
    if slug is None:
        raise ConfigError(f"{where}: unknown domain {name.strip()!r}; domains: {', '.join(DOMAINS.values())} (or all)")
    return slug


def parse_reference(text: str, where: str = "etc") -> EtcReference:
    """Parse ``[folder:]domain+domain`` (see the module docstring)."""
    raw = text.strip()
    if not raw:
        raise ConfigError(f"{where}: empty ETC reference; expected e.g. 'etc:grounding+egocentric' or 'all'")
    folder, sep, domains = raw.rpartition(":")
    if not sep:
        folder, domains = "etc", raw
    folder = folder.strip()
    if not folder or ("/" not in folder and not folder.startswith("~") and not _FOLDER.match(folder)):
        raise ConfigError(f"{where}: {raw!r}: the part before ':' must be an etc stage folder (etc, etc_target) or a path")
    parts = [p for p in domains.split("+")]
    if any(not p.strip() for p in parts):
        raise ConfigError(f"{where}: {raw!r}: expected domains joined by '+', e.g. grounding+egocentric")
    if len(parts) == 1 and parts[0].strip().lower() == ALL:
        return EtcReference(folder, None, raw)
    slugs = tuple(domain_slug(p, f"{where}: {raw!r}") for p in parts)
    if len(set(slugs)) != len(slugs):
        raise ConfigError(f"{where}: {raw!r}: a domain is listed twice")
    return EtcReference(folder, slugs, raw)


def parse_spec(spec: EtcSpec, where: str = "etc") -> dict[EtcReference, float]:
    """A reference string (share 1) or ``{reference: share}`` -> parsed references with shares summing to 1."""
    items = {spec: 1.0} if isinstance(spec, str) else dict(spec)
    if not items:
        return {}
    out: dict[EtcReference, float] = {}
    for text, share in items.items():
        if not share >= 0:
            raise ConfigError(f"{where}.{text}: a share must be >= 0, got {share}")
        ref = parse_reference(text, where)
        for r in out:
            if r.folder == ref.folder and (r.domains is None or ref.domains is None or set(r.domains) & set(ref.domains)):
                raise ConfigError(f"{where}: {r.text!r} and {ref.text!r} both take a domain of {ref.folder!r}; "
                                  "give each domain once")  # fmt: skip
        out[ref] = float(share)
    total = sum(out.values())
    if not total > 0:
        raise ConfigError(f"{where}: at least one share must be > 0")
    return {r: s / total for r, s in out.items() if s > 0}


def stage_folder(ref: EtcReference, run_root: Optional[Path]) -> Path:
    """Where the referenced etc stage's output is."""
    if ref.is_path:
        return Path(ref.folder).expanduser()
    if run_root is None:
        raise StageError(f"etc reference {ref.text!r}: names the stage folder {ref.folder!r} but there is no run directory")
    return Path(run_root) / ref.folder


def written_domains(folder: Path) -> dict[str, int]:
    """``{slug: samples}`` of the domain files an etc stage wrote (from its manifest, else the files)."""
    manifest = folder / "manifest.json"
    if manifest.is_file():
        files = json.loads(manifest.read_text()).get("files") or {}
        counts = {name[len("domain_") : -len(".json")]: int(n) for name, n in files.items() if name.startswith("domain_")}
        if counts:
            return {s: counts[s] for s in DOMAINS.values() if counts.get(s)}
    return {s: -1 for s in DOMAINS.values() if (folder / LLAVA_DIR / f"domain_{s}.json").is_file()}


@dataclass
class EtcSources:
    """What a spec resolves to: one dataset source per domain, and each source's weight (summing to 1)."""

    sources: list  # midtrain.data.sources.DatasetSource, kind vlm, format llava_json
    weights: dict[str, float]
    domains: dict[str, str]  # source name -> domain slug


def resolve_etc(spec: EtcSpec, run_root: Optional[Path], where: str = "etc") -> EtcSources:
    """Resolve ``spec`` against the etc stage outputs (module docstring): a one-line StageError names
    a missing stage or a domain the stage did not write (and the domains it did)."""
    from ..data.sources import DatasetSource

    sources, weights, domains = [], {}, {}
    for ref, share in parse_spec(spec, where).items():
        folder = stage_folder(ref, run_root)
        if not (folder / LLAVA_DIR).is_dir():
            raise StageError(f"{where}: {ref.text!r}: {folder} holds no etc output ({LLAVA_DIR}/ is missing); run "
                             f"`midtrain etc{'' if ref.folder == 'etc' else ' name=' + ref.prefix}` first")  # fmt: skip
        have = written_domains(folder)
        wanted = list(have) if ref.domains is None else list(ref.domains)
        missing = [d for d in wanted if d not in have]
        if missing:
            raise StageError(f"{where}: {ref.text!r}: {folder} has no samples of domain {missing[0]!r} (its generators were "
                             f"skipped or not selected: see {folder / 'manifest.json'}); it has {', '.join(have) or 'none'}")  # fmt: skip
        if not wanted:
            raise StageError(f"{where}: {ref.text!r}: {folder} wrote no domain file")
        for slug in wanted:
            name = f"{ref.prefix}_{slug}"
            if name in weights:
                raise ConfigError(f"{where}: two references give the source name {name!r}; rename an etc stage folder")
            sources.append(DatasetSource(name=name, kind="vlm", format="llava_json",
                                         path=folder / LLAVA_DIR / f"domain_{slug}.json"))  # fmt: skip
            weights[name] = share / len(wanted)
            domains[name] = slug
    return EtcSources(sources, weights, domains)
