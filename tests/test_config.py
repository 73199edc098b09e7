"""Typed stage configs: every bad value is reported with its dotted key; YAML + overrides resolve in order."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from midtrain.config import (
    ConfigError,
    Device,
    StageConfig,
    apply_overrides,
    help_text,
    load_config,
    option,
    output_settings,
    parse_override,
    throughput_settings,
    to_plain,
)


@dataclass
class Inner:
    size: int = 4
    mode: Literal["a", "b"] = "a"


@dataclass
class DemoConfig(StageConfig):
    name: str = "demo"
    rate: float = 0.5
    steps: int = 10
    enabled: bool = True
    out: Path = Path("out")
    cap: Optional[int] = None
    tags: list[str] = field(default_factory=list)
    weights: dict[str, float] = field(default_factory=dict)
    inner: Inner = field(default_factory=Inner)
    items: list[Inner] = field(default_factory=list)

    def validate(self) -> None:
        if self.cap is not None and self.cap > self.steps:
            raise ConfigError(f"cap: must be <= steps ({self.steps}), got {self.cap}")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"steps": "ten"}, "steps: expected int, got 'ten'"),
        ({"steps": True}, "steps: expected int, got True"),
        ({"enabled": "yes"}, "enabled: expected bool, got 'yes'"),
        ({"rate": "fast"}, "rate: expected float, got 'fast'"),
        ({"cap": 1.5}, "cap: expected int | null, got 1.5"),
        ({"tags": "x"}, "tags: expected list[str], got 'x'"),
        ({"tags": ["a", 3]}, "tags[1]: expected str, got 3"),
        ({"weights": {"a": "heavy"}}, "weights.a: expected float, got 'heavy'"),
        ({"inner": {"size": "big"}}, "inner.size: expected int, got 'big'"),
        ({"inner": {"mode": "c"}}, "inner.mode: expected 'a' | 'b', got 'c'"),
        ({"items": [{"size": 1}, {"mode": "z"}]}, "items[1].mode: expected 'a' | 'b', got 'z'"),
        ({"items": [{"colour": 1}]}, "items[0].colour: unknown key for Inner"),
        ({"stepz": 3}, "stepz: unknown key for DemoConfig; known keys:"),
        ({"on_error": "ignore"}, "on_error: expected 'raise' | 'skip', got 'ignore'"),
        ({"cap": 20}, "cap: must be <= steps (10), got 20"),
    ],
)
def test_type_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as exc:
        load_config(DemoConfig, base=data)
    assert message in str(exc.value)


def test_values_are_coerced_where_unambiguous():
    cfg = load_config(DemoConfig, base={"rate": 1, "out": "runs/x", "items": [{"size": 2}], "cap": None})
    assert cfg.rate == 1.0 and isinstance(cfg.rate, float)
    assert cfg.out == Path("runs/x") and cfg.items == [Inner(size=2)] and cfg.cap is None
    assert to_plain(cfg)["out"] == "runs/x" and to_plain(cfg)["items"] == [{"size": 2, "mode": "a"}]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 20\nrate: 0.1\ninner:\n  size: 8\ntags: [a]\n")
    cfg = load_config(DemoConfig, path, ["rate=0.25", "inner.mode=b", "tags=[x, y]", "name=hello world"],
                      base={"steps": 5, "name": "base"})
    assert (cfg.steps, cfg.rate, cfg.inner, cfg.tags, cfg.name) == (20, 0.25, Inner(8, "b"), ["x", "y"], "hello world")


def test_errors_from_a_file_name_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: lots\n")
    with pytest.raises(ConfigError, match=r"steps: expected int, got 'lots' \(from .*c.yaml\)"):
        load_config(DemoConfig, path)
    path.write_text("steps: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(DemoConfig, path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(DemoConfig, path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(DemoConfig, tmp_path / "missing.yaml")


def test_override_parsing():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    assert parse_override("x=") == (["x"], "")
    assert parse_override("x=[1, 2]") == (["x"], [1, 2])
    assert parse_override("x=null") == (["x"], None)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="empty key"):
        parse_override("=3")
    data = {"inner": {"size": 1, "mode": "a"}}
    out = apply_overrides(data, ["inner.size=3"])
    assert out == {"inner": {"size": 3, "mode": "a"}} and data == {"inner": {"size": 1, "mode": "a"}}  # input untouched


@dataclass
class DeviceConfig(StageConfig):
    device: Device = option("auto", "where to run", throughput=True)
    lr: float = option(1e-3, "learning rate")
    inner: Inner = option(factory=Inner, help="nested")


def test_config_values_parse_as_a_user_means_them(tmp_path):
    assert load_config(DeviceConfig, overrides=["lr=1e-4"]).lr == 1e-4  # YAML 1.1 reads 1e-4 as text
    assert load_config(DeviceConfig, overrides=["lr=5e-5"]).lr == 5e-5
    assert load_config(DeviceConfig, overrides=["lr=.5"]).lr == 0.5
    with pytest.raises(ConfigError, match="lr: expected float, got 'fast'"):
        load_config(DeviceConfig, overrides=["lr=fast"])
    assert load_config(DeviceConfig, overrides=["device=cuda:1"]).device == "cuda:1"
    with pytest.raises(ConfigError, match=r"device: expected a device \(auto, cpu, cuda, cuda:N, mps\), got 'gpu'"):
        load_config(DeviceConfig, overrides=["device=gpu"])
    with pytest.raises(ConfigError, match="is a directory; expected a YAML file"):
        load_config(DeviceConfig, tmp_path)


def test_a_config_built_in_python_is_validated_too():
    with pytest.raises(ConfigError, match="cap: must be <= steps"):
        DemoConfig(cap=20)
    with pytest.raises(ConfigError, match="steps: expected int, got 'ten'"):
        DemoConfig(steps="ten")
    with pytest.raises(ConfigError, match="device: expected a device"):
        DeviceConfig(device="gpu")
    assert DeviceConfig(lr="1e-4").lr == 1e-4


def test_throughput_settings_are_separated_from_output_settings():
    cfg = DeviceConfig(device="cpu")
    assert output_settings(cfg) == {"seed": 0, "on_error": "raise", "lr": 1e-3, "inner": {"size": 4, "mode": "a"}}
    assert throughput_settings(cfg) == {"device": "cpu"}
    text = help_text(DeviceConfig)
    assert "  device: str (default auto) [throughput]\n      where to run" in text
    assert "  inner.size: int (default 4)" in text and "  seed: int (default 0)" in text
