"""How many of the pool's sources a selection keeps: source diversity of a mixture.

The paper's selection keeps the VLM pool's diversity (its mixture spans 7 of 8 sources); a
proximity ranking can instead collapse onto the one source nearest the robot data. Three
numbers describe the spread of a selection over the ``S`` sources of the eligible pool, from the
selected samples' source shares ``p_s`` (``sum_s p_s = 1``):

- ``sources_covered``: sources with at least one selected sample (of ``sources_in_pool``);
- ``normalised_entropy``: ``H / ln S`` with ``H = -sum_s p_s ln p_s`` (0 = one source,
  1 = equal shares of all ``S``; defined as 1 when ``S = 1``);
- ``effective_sources``: ``exp(H)``, the number of equally-shared sources with the same entropy
  (between 1 and ``S``).

The pool's own ``normalised_entropy`` is reported beside them (``pool_normalised_entropy``), so a
selection from an unbalanced pool is read against what that pool allows.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable


def _entropy(counts: Iterable[int]) -> float:
    counts = [c for c in counts if c > 0]
    total = sum(counts)
    return 0.0 - sum(c / total * math.log(c / total) for c in counts) if total else 0.0  # 0.0, not -0.0, for one source


def source_diversity(selected_sources: Iterable[str], pool_sources: Iterable[str]) -> dict:
    """Diversity of a selection over the pool's sources (see module doc).

    ``selected_sources``: the source of every selected sample; ``pool_sources``: the source of
    every eligible pool sample (the selection's sources must be among them).
    """
    selected = Counter(selected_sources)
    pool = Counter(pool_sources)
    unknown = set(selected) - set(pool)
    if unknown:
        raise ValueError(f"selected sources {sorted(unknown)} are not in the pool ({sorted(pool)})")
    n_sources = len(pool)
    h = _entropy(selected.values())
    h_pool = _entropy(pool.values())
    norm = math.log(n_sources) if n_sources > 1 else 0.0
    return {
        "selected": sum(selected.values()),
        "sources_in_pool": n_sources,
        "sources_covered": sum(1 for c in selected.values() if c > 0),
        "normalised_entropy": h / norm if norm else 1.0,
        "effective_sources": math.exp(h),
        "pool_normalised_entropy": h_pool / norm if norm else 1.0,
        "shares": {s: selected.get(s, 0) / max(1, sum(selected.values())) for s in sorted(pool)},
    }
