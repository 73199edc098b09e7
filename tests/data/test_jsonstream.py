"""The JSON array reader loses no record it could read: a seeded fuzz of damaged arrays."""

from __future__ import annotations

import io
import json
import random

from midtrain.data.jsonstream import iter_array


def is_record(value) -> bool:
    return isinstance(value, dict) and "conversations" in value


def test_damage_costs_only_the_damaged_records():
    """Random cuts, insertions and truncations in 1-3 records of 12 (text full of JSON
    punctuation, one-line and pretty-printed, buffers down to 8 characters): every record
    whose text is untouched is read, unless the damage ran into its start (a record right
    after a damaged one may merge with it), and it is read at most once."""
    rng = random.Random(0)
    records = [{"id": i, "conversations": [{"from": "human", "value": f"q{i} {{x}} [y] \"z\" , ]"},
                                           {"from": "gpt", "value": f"a{i}"}]} for i in range(12)]  # fmt: skip
    for _ in range(300):
        indent = rng.choice([None, 1])
        parts = [json.dumps(r, indent=indent) for r in records]
        damaged = sorted(rng.sample(range(12), rng.choice([1, 2, 3])))
        for k in damaged:
            text = parts[k]
            for _ in range(rng.randrange(1, 4)):
                if not text:
                    break
                i = rng.randrange(len(text))
                j = min(len(text), i + rng.randrange(1, 30))
                ch = rng.choice(['"', "{", "}", "[", "]", ",", ":", "x", "\\", "\n"])
                text = [text[:i] + text[j:], text[:i] + ch + text[i:], text[:i], text[:i] + ch + text[i + 1 :]][rng.randrange(4)]
            parts[k] = text
        data = ("[" + ",\n".join(parts) + "]").encode()
        elements = list(iter_array(io.BytesIO(data), is_record, 10**6, block=rng.choice([8, 50, 1 << 20])))
        assert [e.index for e in elements] == list(range(len(elements)))
        ids = [e.value.get("id") for e in elements if e.error is None and isinstance(e.value, dict)]
        lost = [i for i in range(12) if i not in damaged and i not in ids]
        assert all(i - 1 in damaged for i in lost), (damaged, lost, [e.error for e in elements if e.error])
        intact = [i for i in ids if i in range(12) and i not in damaged]
        assert len(intact) == len(set(intact))


def test_a_clean_array_reads_whole_at_any_buffer_size():
    records = [{"id": i, "conversations": [{"from": "human", "value": "é " * i}]} for i in range(20)]
    data = json.dumps(records, indent=2, ensure_ascii=False).encode()
    for block in (1, 7, 1 << 20):
        elements = list(iter_array(io.BytesIO(b"\xef\xbb\xbf" + data), is_record, 10**6, block=block))
        assert [e.value for e in elements] == records
