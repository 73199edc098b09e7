"""Typed stage configs: a dataclass per stage, filled from YAML and ``key=value`` overrides.

Why not a config framework: the contract is small (dataclasses, a handful of
types) and the error messages matter more than features. Every value is
checked against its annotation and a bad one is reported as
``<stage>.<dotted.key>: expected <type>, got <value>`` so a user can fix the
YAML line without reading a traceback.

A field is declared with :func:`option`, which carries its one-line help (``midtrain <stage>
--help`` prints it with the type and default) and whether it is a *throughput* setting: one
that changes how fast a stage runs but not what it writes (device, batch size, workers,
compile, backend, ...). Throughput settings are left out of the resume fingerprint
(:func:`output_settings`), so retrying a run with a smaller batch keeps its finished work.
Checks run in ``__post_init__``, so a config built in Python is validated like one parsed
from YAML.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value is missing, unknown or of the wrong type. The message names the key."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
           throughput: bool = False) -> Any:  # fmt: skip
    """A config field with its one-line ``help``; ``throughput=True`` keeps it out of the fingerprint."""
    meta = {"help": help, "throughput": throughput}
    if factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def check_device(value: str, key: str) -> None:
    """``auto``, ``cpu``, ``mps``, ``cuda`` or ``cuda:N``: the names torch takes, checked before any work."""
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        raise ConfigError(f"{key}: expected a device (auto, cpu, cuda, cuda:N, mps), got {value!r}")


Device = Annotated[str, check_device]


class Settings:
    """Base of every config dataclass: fields are type-checked (and coerced) and ``validate``
    runs on construction, whether the values came from YAML or from Python."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self), include_extras=True)
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.init:
                setattr(self, f.name, coerce(getattr(self, f.name), hints[f.name], f.name))
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses extend. Raise ConfigError naming the keys."""

    def to_dict(self) -> dict[str, Any]:
        return to_plain(self)


@dataclasses.dataclass
class StageConfig(Settings):
    """Fields every stage shares."""

    seed: int = option(0, "seed of every sampling and training step, for reproducible runs")
    on_error: Literal["raise", "skip"] = option(
        "raise", "a bad sample stops the stage (raise) or is recorded in errors.jsonl and the manifest counts (skip)"
    )


def to_plain(obj: Any) -> Any:
    """Dataclasses, Paths and tuples to JSON/YAML-safe builtins (for manifests)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


_FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Annotated:
        return _type_name(get_args(tp)[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against annotation ``tp``; convert where unambiguous (str -> Path, int -> float)."""
    origin = get_origin(tp)
    if origin is Annotated:
        base, *checks = get_args(tp)
        value = coerce(value, base, key)
        for check in checks:
            if callable(check):
                check(value, key)
        return value
    fail = ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if origin is Literal:
        if value in get_args(tp):
            return value
        raise fail
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise fail
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except ConfigError:
                continue
        raise fail
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise fail
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise fail
            return tuple(coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        out = [coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise fail
        ktp, vtp = get_args(tp) or (Any, Any)
        return {coerce(k, ktp, key): coerce(v, vtp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise fail
        return from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise fail
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as text; a float field means a number
        raise fail
    if tp is str:
        if isinstance(value, str):
            return value
        raise fail
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise fail
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise fail


def from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"{where}{unknown[0]}: unknown key for {cls.__name__}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"{where}{missing[0]}: required key is missing ({cls.__name__})")
    try:
        obj = cls(**kwargs)  # Settings.__post_init__ checks types again and runs validate()
    except ConfigError as exc:
        if prefix and not str(exc).startswith(prefix):
            raise ConfigError(f"{prefix}.{exc}") from None
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or cls.__name__}: {exc}") from exc
    return obj


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=1`` -> (["a", "b"], 1). The value is parsed as YAML so lists and numbers work."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
            child = dict(child)
            node[part] = child
            node = child
        node[path[-1]] = value
    return out


def load_yaml(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; expected a YAML file")
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path}: cannot read it ({exc})") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def load_config(
    cls: type[T], path: Path | None = None, overrides: list[str] | None = None, base: dict | None = None
) -> T:
    """Resolve a stage config: defaults <- YAML file (or ``base`` mapping) <- ``key=value`` overrides."""
    data: dict[str, Any] = dict(base or {})
    if path is not None:
        data.update(load_yaml(path))
    data = apply_overrides(data, list(overrides or []))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        src = f" (from {path})" if path is not None else ""
        raise ConfigError(f"{exc}{src}") from None


# --------------------------------------------------------------------------- introspection


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    """One config field, for ``--help`` and the manifest: dotted name, type, default, help."""

    name: str
    type: str
    default: Any
    help: str
    throughput: bool


def config_options(cls: type, prefix: str = "") -> list[OptionInfo]:
    """Every option of a config class, nested dataclass fields flattened to dotted names."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out: list[OptionInfo] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp = hints[f.name]
        name = f"{prefix}{f.name}"
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = dataclasses.MISSING
        if dataclasses.is_dataclass(tp):
            out += [dataclasses.replace(o, throughput=o.throughput or f.metadata.get("throughput", False))
                    for o in config_options(tp, name + ".")]  # fmt: skip
            continue
        out.append(OptionInfo(name, _type_name(tp), default, f.metadata.get("help", ""), f.metadata.get("throughput", False)))
    return out


def output_settings(config: Any) -> dict[str, Any]:
    """The config without its throughput settings: what decides the stage's output (the fingerprint)."""
    out = {}
    for f in dataclasses.fields(config):
        if f.metadata.get("throughput", False):
            continue
        value = getattr(config, f.name)
        out[f.name] = output_settings(value) if dataclasses.is_dataclass(value) else to_plain(value)
    return out


def throughput_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """The settings left out of :func:`output_settings` (dotted names), for the manifest."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.metadata.get("throughput", False):
            out[prefix + f.name] = to_plain(value)
        elif dataclasses.is_dataclass(value):
            out.update(throughput_settings(value, prefix + f.name + "."))
    return out


def help_text(cls: type) -> str:
    """The options of a config class as ``--help`` lines: name, type, default, meaning."""
    lines = []
    for o in config_options(cls):
        default = "required" if o.default is dataclasses.MISSING else f"default {_short(o.default)}"
        tag = " [throughput]" if o.throughput else ""
        lines.append(f"  {o.name}: {o.type} ({default}){tag}\n      {o.help or '(no description)'}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    text = yaml.safe_dump(to_plain(value), default_flow_style=True, width=10_000).strip()
    text = text.removesuffix("\n...").removesuffix("...").strip()
    return text if len(text) <= 60 else text[:57] + "..."
