"""Content fingerprints of catalog rows and of the files they reference.

A stage decides "nothing to do" from the hashes of its inputs, but the catalog's inputs
are data files that *name* images: replacing an image leaves every input byte-identical.
So the catalog records what each row's content is, references included:

- ``content_hash`` per row: blake2b-128 over a canonical JSON of the row's ``kind``,
  ``messages``, ``instruction``, ``state``, ``action`` and ``action_mask``, and per image
  either the blake2b of its embedded bytes (LeRobot frames are embedded as they are
  decoded from the video, so a re-encoded video changes exactly the frames whose pixels
  changed) or the fingerprint of the file it names. ``id``, ``source``, ``episode``,
  ``frame`` and ``origin`` say *which* sample it is, not what it holds, and are left out.
  Replacing one image changes the hash of exactly the rows that use it, so a downstream
  stage can recompute only those.
- ``references/<source>/references-NNNNN.parquet`` per catalog part (beside the source
  folders, which hold rows alone): the distinct files its rows
  name (``path``, ``size``, ``mtime_ns``, ``hash``). A rerun of a complete catalog
  compares them with the files as they are now (:func:`changed_references`) and reads the
  sources again when any differs.

A referenced file's fingerprint has two modes (catalog option ``verify_references``):

- ``stat`` (default): path, size and modification time (ns); one ``stat`` per file per
  run. It misses a rewrite that keeps both size and mtime - an mtime restored by
  ``cp -p``, ``rsync -t`` or ``tar x``, or a same-size rewrite within the filesystem's
  timestamp granularity (1-2 s on FAT and some network filesystems) - and re-featurizes a
  file that was touched but not changed. This is the trade-off make and rsync make.
- ``content`` (``verify_references: true``): blake2b of the file's bytes, exact, at the
  cost of reading every referenced file in full on every catalog run.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Iterable, Optional

import pyarrow as pa
import pyarrow.parquet as pq

REFERENCES_SCHEMA = pa.schema(
    [("path", pa.string()), ("size", pa.int64()), ("mtime_ns", pa.int64()), ("hash", pa.string())]
)
_ROW_FIELDS = ("kind", "messages", "instruction", "state", "action", "action_mask")


def hash_bytes(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def hash_file(path: Path | str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_fingerprint(path: str, verify: bool) -> tuple[int, int, Optional[str]]:
    """``(size, mtime_ns, content hash or None)`` of a file; ``(-1, -1, None)`` if it is gone."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns, hash_file(path) if verify else None
    except OSError:
        return -1, -1, None


class RowHasher:
    """``content_hash`` of catalog rows, remembering the files they reference.

    ``verify`` selects content hashes over size + mtime for referenced files. Files are
    fingerprinted once per hasher (one catalog part): ``references()`` lists them and
    ``clear()`` starts the next part, so memory is bounded by a part's distinct files.
    """

    def __init__(self, verify: bool):
        self.verify = verify
        self.files: dict[str, tuple[int, int, Optional[str]]] = {}

    def file_key(self, path: str) -> str:
        fp = self.files.get(path)
        if fp is None:
            fp = self.files[path] = file_fingerprint(path, self.verify)
        size, mtime_ns, digest = fp
        return digest if self.verify else f"{path}:{size}:{mtime_ns}"

    def __call__(self, row: dict) -> str:
        images = []
        for ref in row.get("image_refs") or []:
            if ref.get("bytes") is not None:
                images.append("bytes:" + hash_bytes(bytes(ref["bytes"])))
            else:
                images.append("file:" + str(self.file_key(ref["path"])))
        content = [row.get(k) for k in _ROW_FIELDS] + [images]
        text = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
        return hash_bytes(text.encode("utf-8"))

    def references(self) -> pa.Table:
        paths = sorted(self.files)
        cols = list(zip(*(self.files[p] for p in paths))) or [(), (), ()]
        return pa.table([paths, *cols], schema=REFERENCES_SCHEMA)

    def clear(self) -> None:
        self.files.clear()


def changed_references(tables: Iterable[Path], verify: bool, examples: int = 3) -> tuple[int, int, list[str]]:
    """Compare recorded references with the files now: ``(files checked, changed, a few changed paths)``.

    A file is changed when it is gone, or its fingerprint differs in the mode ``verify``
    selects (a table recorded in the other mode has no usable hash: every file counts as
    changed, which is right: the row hashes change with the mode). Each distinct path is
    checked once, however many parts name it.
    """
    seen: set[str] = set()
    changed: list[str] = []
    n_changed = 0
    for table_path in tables:
        table = pq.read_table(table_path, schema=REFERENCES_SCHEMA)
        for path, size, mtime_ns, digest in zip(*(table.column(c).to_pylist() for c in REFERENCES_SCHEMA.names)):
            if path in seen:
                continue
            seen.add(path)
            now = file_fingerprint(path, verify)
            same = now[2] == digest if verify else (now[0], now[1]) == (size, mtime_ns)
            if not same or now[0] < 0:
                n_changed += 1
                if len(changed) < examples:
                    changed.append(path)
    return len(seen), n_changed, changed
