"""Keyed randomness: every caller draws exactly what it drew before ``midtrain.seeding`` (the old
formulas are written out here as the oracle), and a draw depends only on its keys."""

from __future__ import annotations

import hashlib
import zlib

import numpy as np

from midtrain.etc.generators import GENERATORS
from midtrain.seeding import key_word, keyed_rng, keyed_seed
from midtrain.sft.data import source_order
from midtrain.sim.metaworld_env import episode_seed
from midtrain.sim.pool import sample_rng


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _blake(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def test_each_caller_draws_what_its_old_formula_drew():
    assert sample_rng(3, "captions", 11).random(4).tolist() == np.random.default_rng([3, _crc("captions"), 11]).random(4).tolist()
    old = int(np.random.SeedSequence([5, _crc("reach-v3"), 2]).generate_state(1)[0])
    assert episode_seed(5, "reach-v3", 2) == old
    assert source_order(7, "pool", 50).tolist() == np.random.default_rng([7, _blake("pool")]).permutation(50).tolist()
    gen = next(iter(GENERATORS.values()))
    assert gen.rng(1, 4).random(3).tolist() == np.random.default_rng([1, _crc(gen.name), 4]).random(3).tolist()
    # gap's subsample: (seed, crc32(source), crc32(purpose))
    assert keyed_rng(0, "robot", "tsne").random(2).tolist() == np.random.default_rng([0, _crc("robot"), _crc("tsne")]).random(2).tolist()
    # the study's random-weights VLM: torch seed from blake2b("random weights <seed>")
    digest = hashlib.blake2b(b"random weights 9", digest_size=8).digest()
    assert key_word("random weights 9", hash="blake2b") % 2**63 == int.from_bytes(digest, "little") % 2**63


def test_a_draw_depends_only_on_its_keys():
    a = keyed_rng(1, "a", 2).random(3)
    assert np.array_equal(a, keyed_rng(1, "a", 2).random(3))
    assert not np.array_equal(a, keyed_rng(1, "b", 2).random(3))
    assert not np.array_equal(a, keyed_rng(1, "a", 2, hash="blake2b").random(3))  # the hash is part of the key
    assert keyed_seed(1, "a") != keyed_seed(2, "a") and 0 <= keyed_seed(1, "a") < 2**32
