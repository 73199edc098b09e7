"""LLaVA / ShareGPT conversation data: readers (JSON array, JSON Lines) and the exporter.

Accepted records (the conventions of LLaVA, LLaMA-Factory ``sharegpt`` and Qwen-VL
fine-tuning scripts)::

    {"id": "000123", "image": "coco/000123.jpg",            # or "images": [...], or absent
     "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                       {"from": "gpt", "value": "A red block."}]}
    {"messages": [{"role": "user", "content": "..."}, ...], "images": [...], "system": "..."}
    {"instruction": "...", "input": "...", "output": "...", "images": [...]}   # LLaMA-Factory alpaca

- Roles ``human``/``user`` -> ``user``, ``gpt``/``assistant``/``bot``/``model`` ->
  ``assistant``, ``system`` -> ``system`` (LLaMA-Factory's ``observation``/``tool`` ->
  ``user`` and ``function_call`` -> ``assistant``); any other role is a bad sample.
- ``content`` may be a string or a list of parts (``{"type": "text", "text": ...}``,
  ``{"type": "image"[, "image": path]}``); image parts become ``<image>`` placeholders.
- ``<image>`` placeholders are kept. If a sample has images but no placeholder at all,
  one ``<image>\\n`` per image is prepended to the first user turn (the LLaVA convention,
  which LLaMA-Factory also applies); any other count mismatch is a bad sample.
- Relative image paths resolve against ``image_root`` (default: the JSON file's folder).

Large JSON arrays are streamed element by element (never ``json.load``; see
``midtrain.data.jsonstream``): memory is per record, and a broken record is skipped alone.
Each record is bounded before anything downstream tokenises it: ``max_text_chars`` over the
conversation, ``8 * max_text_chars`` bytes over the raw line or element; text that is not
valid Unicode (a lone UTF-16 surrogate such as ``"\\ud800"``, or invalid UTF-8 bytes) is an
``undecodable text`` sample error, not a crash of the whole stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

from ..runs import SampleError, atomic_path, write_json_atomic
from .sources import DatasetSource, Item, SampleReader, Selection, checked_image_ref, max_record_bytes

IMAGE_TOKEN = "<image>"

ROLE_MAP = {
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "bot": "assistant", "model": "assistant",
    "system": "system",
    "observation": "user", "tool": "user", "function_call": "assistant",
}  # fmt: skip
SHAREGPT_ROLE = {"user": "human", "assistant": "gpt", "system": "system"}


# --------------------------------------------------------------------------- normalisation


def _content_text(content: Any, images_in_parts: list, where: str, field: str, sample_id: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                parts.append(IMAGE_TOKEN)
                ref = part.get("image") or part.get("path") or (part.get("image_url") or {}).get("url")
                if ref is not None:
                    images_in_parts.append(ref)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise SampleError("malformed record", where, f"{field}: unsupported content part {part!r:.80}", sample_id)
        return "\n".join(parts)
    if content is None:
        raise SampleError("missing required field", where, field, sample_id)
    raise SampleError("malformed record", where, f"{field}: expected text, got {content!r:.80}", sample_id)


def _alpaca_turns(record: dict) -> list[dict]:
    """LLaMA-Factory's alpaca format: ``history`` pairs, then ``instruction`` (+ ``input``) -> ``output``."""
    turns = []
    for pair in record.get("history") or []:
        if isinstance(pair, (list, tuple)) and len(pair) == 2:
            turns += [{"from": "human", "value": pair[0]}, {"from": "gpt", "value": pair[1]}]
    prompt = record["instruction"]
    if isinstance(prompt, str) and record.get("input"):
        prompt = f"{prompt}\n{record['input']}"
    return turns + [{"from": "human", "value": prompt}, {"from": "gpt", "value": record["output"]}]


def normalize_conversation(record: dict, where: str, sample_id: str) -> tuple[list[dict], list]:
    """A LLaVA/ShareGPT/messages record -> (catalog messages, raw image values).

    Placeholders are fixed up as described in the module docstring; the returned
    messages always contain exactly one ``<image>`` per returned image value.
    """
    if "conversations" in record:
        turns, field = record["conversations"], "conversations"
    elif "messages" in record:
        turns, field = record["messages"], "messages"
    elif "instruction" in record and "output" in record:
        turns, field = _alpaca_turns(record), "instruction"
    else:
        raise SampleError("missing required field", where, "'conversations' (or 'messages')", sample_id)
    if not isinstance(turns, list) or not turns:
        raise SampleError("missing required field", where, f"'{field}' is empty or not a list", sample_id)

    images = record.get("images", record.get("image"))
    if images is None:
        images = []
    elif not isinstance(images, list):
        images = [images]

    messages = []
    system = record.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    images_in_parts: list = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise SampleError("malformed record", where, f"{field}[{i}]: expected an object, got {turn!r:.80}", sample_id)
        role_raw = turn.get("from", turn.get("role"))
        if role_raw is None:
            raise SampleError("missing required field", where, f"{field}[{i}].from (or .role)", sample_id)
        role = ROLE_MAP.get(str(role_raw).lower())
        if role is None:
            raise SampleError("unknown role", where, f"{field}[{i}]: {role_raw!r}; known: {', '.join(ROLE_MAP)}", sample_id)
        content = turn.get("value", turn.get("content"))
        messages.append(
            {"role": role, "content": _content_text(content, images_in_parts, where, f"{field}[{i}].value", sample_id)}
        )
    if images_in_parts and not images:
        images = images_in_parts

    n_tokens = sum(m["content"].count(IMAGE_TOKEN) for m in messages)
    if images and n_tokens == 0:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SampleError("image placeholder mismatch", where, "images but no user turn to attach them to", sample_id)
        first_user["content"] = (IMAGE_TOKEN + "\n") * len(images) + first_user["content"]
    elif n_tokens != len(images):
        raise SampleError(
            "image placeholder mismatch", where, f"{n_tokens} '<image>' placeholder(s) for {len(images)} image(s)", sample_id
        )
    return messages, images


_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(messages: list[dict], where: str, sample_id: str, max_chars: int) -> None:
    """Refuse a conversation that is too long to featurize or is not valid Unicode.

    ``conversation too long``: more than ``max_chars`` characters over all turns (bounded
    here, at read time, so the tokeniser never sees it). ``undecodable text``: a lone UTF-16
    surrogate, which JSON's ``\\uD800`` escapes (and invalid UTF-8 read with
    ``surrogateescape``) produce and which no UTF-8 encoder, Arrow included, accepts.
    """
    total = sum(len(m["content"]) for m in messages)
    if total > max_chars:
        raise SampleError(
            "conversation too long", where, f"{total:,} characters, over max_text_chars {max_chars:,}", sample_id
        )
    for i, m in enumerate(messages):
        bad = _SURROGATE.search(m["content"])
        if bad:
            raise SampleError(
                "undecodable text", where,
                f"turn {i}: lone UTF-16 surrogate U+{ord(bad.group()):04X} at character {bad.start()} "
                "(not valid Unicode; re-export the file as UTF-8)", sample_id,
            )  # fmt: skip


def conversation_row(
    record: Any, index: int, where: str, id_field: Optional[str], image_root: Path, source: DatasetSource
) -> dict:
    """One conversation record -> a catalog row (local id; the stage adds source and kind)."""
    if not isinstance(record, dict):
        raise SampleError("malformed record", where, f"expected a JSON object, got {type(record).__name__}")
    own_id = record.get(id_field) if id_field else None
    local_id = str(own_id) if own_id is not None and str(own_id) != "" else str(index)
    if _SURROGATE.search(local_id):
        raise SampleError("undecodable text", where, f"{id_field}: lone UTF-16 surrogate in the id {local_id!a}")
    messages, images = normalize_conversation(record, where, local_id)
    check_text(messages, where, local_id, source.max_text_chars)
    refs = [checked_image_ref(v, image_root, where, local_id, source) for v in images]
    return {"id": local_id, "image_refs": refs, "messages": messages, "origin": where}


# --------------------------------------------------------------------------- readers


class _ConversationReader(SampleReader):
    @property
    def path(self) -> Path:
        return Path(self.source.path)

    @property
    def image_root(self) -> Path:
        return Path(self.source.image_root) if self.source.image_root else self.path.parent

    def _row(self, record: Any, index: int, where: str) -> Item:
        try:
            return conversation_row(record, index, where, self.source.id_field, self.image_root, self.source)
        except SampleError as err:
            return err


class LlavaJsonlReader(_ConversationReader):
    """JSON Lines: one record per non-blank line; errors name ``file:line``."""

    def _lines(self) -> Iterator[tuple[int, int, Optional[bytes]]]:
        """(record index, 1-based line number, raw line) for every non-blank line.

        A line over ``max_record_bytes`` is read past in blocks (memory stays bounded) and
        given as ``None``.
        """
        limit = max_record_bytes(self.source)
        index = 0
        with open(self.path, "rb") as fh:
            lineno = 0
            while True:
                line: Optional[bytes] = fh.readline(limit + 1)
                if not line:
                    return
                lineno += 1
                if len(line) > limit and not line.endswith(b"\n"):
                    while True:
                        rest = fh.readline(1 << 20)
                        if not rest or rest.endswith(b"\n"):
                            break
                    line = None
                elif not line.strip():
                    continue
                yield index, lineno, line
                index += 1

    def count_records(self, need: bool) -> Optional[int]:
        return sum(1 for _ in self._lines()) if need else None

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        for index, lineno, line in self._lines():
            if not selection.wants(index):
                continue
            where = f"{self.path}:{lineno}"
            if line is None:
                limit = max_record_bytes(self.source)
                yield index, SampleError("record too long", where, f"line over {limit:,} bytes (see max_text_chars)")
                continue
            try:
                record = json.loads(line)
            except UnicodeDecodeError as exc:
                yield index, SampleError("undecodable text", where, f"not UTF-8: {exc}")
                continue
            except json.JSONDecodeError as exc:
                yield index, SampleError("malformed JSON", where, str(exc))
                continue
            yield index, self._row(record, index, where)


def _is_conversation_record(value: Any) -> bool:
    """What the JSON array reader resynchronises on after a broken record."""
    return isinstance(value, dict) and ("conversations" in value or "messages" in value or "instruction" in value)


class LlavaJsonReader(_ConversationReader):
    """A JSON array of records, read element by element; errors name ``file[index]``.

    A broken element is one bad sample and reading continues at the next record (see
    ``midtrain.data.jsonstream``); its report names the lines it spans.
    """

    def _elements(self):
        from ..runs import StageError
        from .jsonstream import NotAnArray, iter_array

        with open(self.path, "rb") as fh:
            try:
                yield from iter_array(fh, _is_conversation_record, max_record_bytes(self.source))
            except NotAnArray:
                fh.seek(0)
                head = fh.read(4096).lstrip().removeprefix(b"\xef\xbb\xbf").lstrip()
                hint = " (it looks like JSON Lines: use format: llava_jsonl)" if head.startswith(b"{") else ""
                raise StageError(f"{self.path}: expected a JSON array of records{hint}") from None

    def count_records(self, need: bool) -> Optional[int]:
        return sum(1 for _ in self._elements()) if need else None

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        for element in self._elements():
            if not selection.wants(element.index):
                continue
            where = f"{self.path}[{element.index}]"
            if element.error is not None:
                yield element.index, SampleError(element.error[0], where, element.error[1])
            else:
                yield element.index, self._row(element.value, element.index, where)


# --------------------------------------------------------------------------- writer


def _safe_name(text: str) -> str:
    digest = hashlib.blake2b(text.encode(), digest_size=4).hexdigest()
    return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', text)[-80:]}-{digest}"


def _image_suffix(data: bytes) -> str:
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "png").lower()
    except Exception:
        fmt = "bin"
    return {"jpeg": ".jpg"}.get(fmt, f".{fmt}")


def to_sharegpt(messages: list[dict]) -> list[dict]:
    """Catalog messages -> ShareGPT turns (``from``: human/gpt/system, ``value``)."""
    return [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in messages]


def write_llava_json(
    rows: Iterable[dict],
    out_path: Path | str,
    image_dir: Path | str,
    image_mode: Literal["copy", "link", "reference"] = "copy",
    llamafactory_name: Optional[str] = None,
) -> dict:
    """Write catalog rows as ShareGPT/LLaVA records (``.json`` array or ``.jsonl`` lines).

    Each record is ``{"id", "image": path | [paths] (absent without images),
    "conversations": [{"from", "value"}]}`` - readable by LLaVA (single image), Qwen-VL
    fine-tuning scripts and LLaMA-Factory. Image paths are relative to ``out_path``'s
    folder (set LLaMA-Factory's ``media_dir`` / our ``image_root`` to it). Images given
    as bytes are written to ``image_dir``; images given as files are copied
    (``copy``), symlinked (``link``) or referenced by absolute path (``reference``).
    With ``llamafactory_name`` a ``dataset_info.json`` entry is written/merged beside the
    output. The output file is written atomically (streamed to a temporary file).

    Returns counts ``{"records", "images"}``.
    """
    out_path, image_dir = Path(out_path), Path(image_dir)
    if image_mode not in ("copy", "link", "reference"):
        raise ValueError(f"image_mode: expected 'copy', 'link' or 'reference', got {image_mode!r}")
    jsonl = out_path.suffix == ".jsonl"
    base = out_path.parent.absolute()
    image_dir.mkdir(parents=True, exist_ok=True)
    counts = {"records": 0, "images": 0}

    def place_image(ref: dict, stem: str, sid: str) -> str:
        if ref.get("bytes") is not None:
            data = bytes(ref["bytes"])
            dst = image_dir / f"{stem}{_image_suffix(data)}"
            with atomic_path(dst) as tmp:
                tmp.write_bytes(data)
        else:
            src = Path(ref["path"])
            if not src.is_file():
                raise SampleError("missing image file", sid, str(src), sid)
            if image_mode == "reference":
                return str(src.resolve())
            dst = image_dir / f"{stem}{src.suffix.lower()}"
            if image_mode == "link":
                tmp_link = dst.with_name(f".{dst.name}.link")
                tmp_link.unlink(missing_ok=True)
                os.symlink(src.resolve(), tmp_link)
                os.replace(tmp_link, dst)
            else:
                with atomic_path(dst) as tmp:
                    shutil.copyfile(src, tmp)
        return os.path.relpath(dst.absolute(), base)  # not resolve(): a link must stay a path inside the export

    with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        if not jsonl:
            fh.write("[\n")
        for row in rows:
            sid = str(row["id"])
            if not row.get("messages"):
                raise ValueError(f"{sid}: has no messages (robot frames cannot be written as conversations)")
            record: dict[str, Any] = {"id": sid}
            paths = [place_image(ref, f"{_safe_name(sid)}_{k}", sid) for k, ref in enumerate(row.get("image_refs") or [])]
            if paths:
                record["image"] = paths[0] if len(paths) == 1 else paths
            record["conversations"] = to_sharegpt(row["messages"])
            if counts["records"] and not jsonl:
                fh.write(",\n")
            fh.write(json.dumps(record, ensure_ascii=False))
            if jsonl:
                fh.write("\n")
            counts["records"] += 1
            counts["images"] += len(paths)
        if not jsonl:
            fh.write("\n]\n")
    if llamafactory_name:
        _write_llamafactory_entry(out_path, llamafactory_name)
    return counts


def _write_llamafactory_entry(out_path: Path, name: str) -> None:
    """Add ``name`` to LLaMA-Factory's ``dataset_info.json`` beside ``out_path`` (sharegpt tags)."""
    info_path = out_path.parent / "dataset_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info[name] = {
        "file_name": out_path.name,
        "formatting": "sharegpt",
        "columns": {"messages": "conversations", "images": "image"},
        "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human",
                 "assistant_tag": "gpt", "system_tag": "system"},
    }  # fmt: skip
    write_json_atomic(info_path, info)
