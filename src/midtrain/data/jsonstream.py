"""A JSON array read one element at a time, each element parsed on its own.

Why not a streaming parser (ijson): it stops at the first syntax error, so one broken
record silently costs every record after it. Here each top-level element is decoded by
the standard library's C decoder (``json.JSONDecoder.raw_decode``) from a sliding text
buffer; an element that does not decode is reported alone and reading goes on.

Resynchronising after a broken element that starts at character ``s``: the next element
is the first ``{`` after ``s`` from which the text decodes as an object that
``is_record`` accepts (for conversations: it has ``conversations``, ``messages`` or
``instruction``) and is followed by ``,`` or ``]``. Everything between is reported as
ONE broken element naming its line range - if the damage erased a record boundary, that
range holds more than one record, and the report says where to look. When no record
follows, the broken element runs to the array's closing ``]``; when the file ends before
the ``]``, the rest is reported as truncated. Nothing is dropped without a report.

An element still incomplete after ``max_chars`` characters is reported as too long
without being decoded (then the reader resynchronises as above), so one enormous
record cannot exhaust memory. Memory: one element, one read block.

Invalid UTF-8 bytes are decoded with ``surrogateescape`` (to lone surrogates), so they
fail as undecodable text in their own record, not as a read error of the whole file.
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Iterator, Optional

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_NEAR_END = 16  # an error this close to the buffer's end may only mean "read more" (a cut literal or number)


@dataclass
class Element:
    """One top-level array element: ``value``, or ``error`` (``reason``, ``detail``) when it does not decode."""

    index: int
    value: Any = None
    error: Optional[tuple[str, str]] = None


class NotAnArray(ValueError):
    """The file is not a JSON array (its first non-blank character is not ``[``)."""


class _Text:
    """A window of the decoded file: ``text`` holds characters from absolute line ``first_line`` on."""

    def __init__(self, fh: BinaryIO, block: int):
        self.fh, self.block = fh, block
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self.text = ""
        self.first_line = 1
        self.dropped = 0  # characters forgotten before text[0]
        self.eof = False

    def more(self, at_least: int = 0) -> bool:
        """Append at least one block (or ``at_least`` bytes); False at the end of the file."""
        if self.eof:
            return False
        data = self.fh.read(max(self.block, at_least))
        self.text += self.decoder.decode(data, final=not data)
        self.eof = not data
        return bool(data)

    def drop(self, pos: int) -> int:
        """Forget the text before ``pos``; returns the new index of ``pos`` (0)."""
        self.first_line += self.text.count("\n", 0, pos)
        self.dropped += pos
        self.text = self.text[pos:]
        return 0

    def line(self, pos: int) -> int:
        return self.first_line + self.text.count("\n", 0, pos)

    def skip_ws(self, pos: int) -> int:
        """Index of the next non-blank character at or after ``pos`` (``len(text)`` at the end of the file)."""
        while True:
            pos = _WS.match(self.text, pos).end()
            if pos < len(self.text) or not self.more():
                return pos

    def decode(self, pos: int, max_chars: int) -> tuple[Any, int]:
        """``raw_decode`` at ``pos``, reading more while the element may just be cut by the buffer's end.

        Raises ``json.JSONDecodeError`` (broken) or ``_TooLong``.
        """
        while True:
            try:
                return _DECODER.raw_decode(self.text, pos)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.text) - _NEAR_END or exc.msg.startswith("Unterminated string")
                if not cut or self.eof:
                    raise
                if len(self.text) - pos > max_chars:
                    raise _TooLong(len(self.text) - pos) from None
                self.more(at_least=len(self.text) - pos)  # doubling: a long element is re-scanned O(log n) times


class _TooLong(Exception):
    def __init__(self, chars: int):
        self.chars = chars


def iter_array(
    fh: BinaryIO, is_record: Callable[[Any], bool], max_chars: int, block: int = 1 << 20
) -> Iterator[Element]:
    """The elements of the JSON array in ``fh`` (a binary file at its start), in order.

    Raises ``NotAnArray`` if the file does not start with ``[`` (after a BOM and blanks).
    Line numbers are counted only for the error reports, so reading stays O(file size).
    """
    buf = _Text(fh, block)
    pos = buf.skip_ws(0)
    if buf.text.startswith("\ufeff", pos):
        pos = buf.skip_ws(pos + 1)
    if not buf.text.startswith("[", pos):
        raise NotAnArray("expected a JSON array of records")
    pos = buf.skip_ws(pos + 1)
    if buf.text.startswith("]", pos):
        return
    index = 0
    while True:
        if pos > block:
            pos = buf.drop(pos)
        if pos >= len(buf.text):
            yield Element(index, error=_truncated(buf, pos))
            return
        start, search_from = pos, pos + 1
        broken: Optional[tuple[str, str]] = None
        try:
            value, end = buf.decode(start, max_chars)
        except _TooLong as exc:
            limit = f"limit {max_chars:,}; see max_text_chars"
            broken = ("record too long", f"over {exc.chars:,} characters of JSON ({limit})")
        except json.JSONDecodeError as exc:
            broken = ("malformed JSON", f"line {buf.line(exc.pos)}: {exc.msg}")
        else:
            after = buf.skip_ws(end)
            separated = after >= len(buf.text) or buf.text[after] in ",]"
            if end - start > max_chars:  # decoded within one buffer, but over the limit all the same
                limit = f"limit {max_chars:,}; see max_text_chars"
                too_long = f"{end - start:,} characters of JSON at line {buf.line(start)} ({limit})"
                yield Element(index, error=("record too long", too_long))
                index += 1
            elif separated or is_record(value):
                yield Element(index, value=value)
                index += 1
            else:  # not a record and no separator after it: this element is broken
                broken = ("malformed JSON", f"line {buf.line(after)}: expected ',' or ']' after an element")
            if broken is None:
                if buf.text.startswith(",", after):
                    pos = buf.skip_ws(after + 1)
                    if buf.text.startswith("]", pos) and buf.skip_ws(pos + 1) >= len(buf.text):
                        return  # a trailing comma: tolerated
                    continue
                if buf.text.startswith("]", after):
                    if buf.skip_ws(after + 1) >= len(buf.text):
                        return
                    # text after a ']': a nested list closed where the damage made it look like the end
                    broken = ("malformed JSON", f"line {buf.line(after)}: text after the array's closing ']'")
                    start = search_from = after
                elif after >= len(buf.text):
                    yield Element(index, error=_truncated(buf, after))
                    return
                else:
                    # a good record with no separator after it: what follows is broken, unless it is
                    # itself a record (a missing comma, tolerated)
                    broken = ("malformed JSON", f"line {buf.line(after)}: expected ',' or ']' after a record")
                    start = search_from = after
        line, at = buf.line(start), buf.dropped + start
        next_pos, closed = _resync(buf, search_from, is_record, max_chars)
        if next_pos is None:
            end_of = "the array's closing ']'" if closed else "the end of the file, with no closing ']' (truncated?)"
            yield Element(index, error=(broken[0], f"{broken[1]}; unreadable from line {line} to {end_of}"))
            return
        if buf.dropped + next_pos != at:
            where = f"skipped from line {line} to the next record, at line {buf.line(next_pos)}"
            yield Element(index, error=(broken[0], f"{broken[1]}; {where}"))
            index += 1
        pos = next_pos


def _truncated(buf: _Text, pos: int) -> tuple[str, str]:
    return "truncated JSON", f"the file ends at line {buf.line(pos)} before the array's closing ']'"


def _resync(buf: _Text, pos: int, is_record: Callable[[Any], bool], max_chars: int) -> tuple[Optional[int], bool]:
    """The start of the next element that decodes as a record followed by ``,`` or ``]``.

    Returns (its position, or None when there is none, and then whether the file ends with
    the array's ``]``). Text before the search cursor is dropped as the search goes: the
    caller has taken the line numbers it reports.
    """
    while True:
        if pos > buf.block:
            pos = buf.drop(pos)
        cand = buf.text.find("{", pos)
        if cand < 0:
            pos = len(buf.text)
            if buf.more():
                continue
            return None, buf.text.rstrip(" \t\n\r").endswith("]")
        try:
            value, end = buf.decode(cand, max_chars)
        except (json.JSONDecodeError, _TooLong):
            pos = cand + 1
            continue
        if is_record(value):
            after = buf.skip_ws(end)
            if after >= len(buf.text) or buf.text[after] in ",]":
                return cand, False
        pos = cand + 1
