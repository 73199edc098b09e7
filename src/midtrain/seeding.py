"""Randomness keyed by names: a draw that depends only on (run seed, names, indices), never on the
order things run in, the number of workers or what else the run holds.

``keyed_rng(seed, "spatial", 7)`` is ``numpy.random.default_rng([seed, h("spatial"), 7])``: strings
become a 32-bit word (``crc32``, the default) or a 64-bit word (``blake2b``, 8 bytes little-endian),
integers pass as they are. The two hashes give different numbers, and each caller keeps the one it
was written with, so every seeded artefact (pool samples, episodes, subsamples, mixtures) is the
same as before this module existed.
"""

from __future__ import annotations

import hashlib
import zlib
from typing import Literal, Union

import numpy as np

Key = Union[str, int]
Hash = Literal["crc32", "blake2b"]


def key_word(key: Key, hash: Hash = "crc32") -> int:
    """``key`` as an unsigned integer: a string hashed, an integer as it is."""
    if not isinstance(key, str):
        return int(key)
    if hash == "crc32":
        return zlib.crc32(key.encode())
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def keyed_rng(seed: int, *keys: Key, hash: Hash = "crc32") -> np.random.Generator:
    """A generator of ``(seed, *keys)`` (see the module docstring)."""
    return np.random.default_rng([seed, *(key_word(k, hash) for k in keys)])


def keyed_seed(seed: int, *keys: Key, hash: Hash = "crc32") -> int:
    """A 32-bit seed of ``(seed, *keys)``, for libraries seeded by an integer (a simulator's reset)."""
    return int(np.random.SeedSequence([seed, *(key_word(k, hash) for k in keys)]).generate_state(1)[0])
