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

Large JSON arrays are streamed with ``ijson`` (never ``json.load``); memory is per record.
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
from .sources import Item, SampleReader, Selection, checked_image_ref

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


def conversation_row(
    record: Any, index: int, where: str, id_field: Optional[str], image_root: Path, verify_images: bool
) -> dict:
    """One conversation record -> a catalog row (local id; the stage adds source and kind)."""
    if not isinstance(record, dict):
        raise SampleError("malformed record", where, f"expected a JSON object, got {type(record).__name__}")
    own_id = record.get(id_field) if id_field else None
    local_id = str(own_id) if own_id is not None and str(own_id) != "" else str(index)
    messages, images = normalize_conversation(record, where, local_id)
    refs = [checked_image_ref(v, image_root, where, local_id, verify_images) for v in images]
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
            return conversation_row(record, index, where, self.source.id_field, self.image_root, self.source.verify_images)
        except SampleError as err:
            return err


class LlavaJsonlReader(_ConversationReader):
    """JSON Lines: one record per non-blank line; errors name ``file:line``."""

    def _lines(self) -> Iterator[tuple[int, int, bytes]]:
        """(record index, 1-based line number, raw line) for every non-blank line."""
        index = 0
        with open(self.path, "rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    yield index, lineno, line
                    index += 1

    def count_records(self, need: bool) -> Optional[int]:
        return sum(1 for _ in self._lines()) if need else None

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        for index, lineno, line in self._lines():
            if not selection.wants(index):
                continue
            where = f"{self.path}:{lineno}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                yield index, SampleError("malformed JSON", where, str(exc), None)
                continue
            yield index, self._row(record, index, where)


_ITEM_END = ("end_map", "end_array", "string", "number", "boolean", "null")  # events that complete an item


class LlavaJsonReader(_ConversationReader):
    """A JSON array of records, streamed with ijson; errors name ``file[index]``."""

    def _check_array(self, fh) -> None:
        from ..runs import StageError

        head = fh.read(4096).lstrip()
        fh.seek(0)
        if head.startswith(b"\xef\xbb\xbf"):
            head = head[3:].lstrip()
        if not head.startswith(b"["):
            hint = " (it looks like JSON Lines: use format: llava_jsonl)" if head.startswith(b"{") else ""
            raise StageError(f"{self.path}: expected a JSON array of records{hint}")

    def count_records(self, need: bool) -> Optional[int]:
        if not need:
            return None
        import ijson

        count = 0
        with open(self.path, "rb") as fh:
            self._check_array(fh)
            try:
                for prefix, event, _ in ijson.parse(fh):
                    count += prefix == "item" and event in _ITEM_END
            except ijson.JSONError:
                count += 1  # the record that fails to parse is a (bad) record too; records() reports it
        return count

    def records(self, selection: Selection) -> Iterator[tuple[int, Item]]:
        import ijson

        with open(self.path, "rb") as fh:
            self._check_array(fh)
            index = -1
            try:
                for index, record in enumerate(ijson.items(fh, "item", use_float=True)):
                    if selection.wants(index):
                        yield index, self._row(record, index, f"{self.path}[{index}]")
            except ijson.JSONError as exc:
                where = f"{self.path}[{index + 1}]"
                yield index + 1, SampleError("malformed JSON", where, f"{exc}; nothing after this point can be read")


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
