"""``midtrain <stage> [--config FILE.yaml] [--run-dir DIR] [--force] [key=value ...]``.

``midtrain run PIPELINE.yaml`` runs a list of stages into one run directory::

    run_dir: runs/demo
    stages:
      - stage: catalog
        config: {datasets: [...]}
      - stage: sft
        config_file: configs/sft.yaml   # optional, merged under `config`
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .config import ConfigError, help_text, load_yaml
from .experiments.runner import StageRunner
from .extras import missing_extra_message
from .runs import RunDir, SampleError, StageError
from .stages import PIPELINE, STAGES


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (not the one at creation), so a handler made
    under a redirected or captured stderr never writes to a closed stream later."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_console_logging(verbose: bool) -> None:
    root = logging.getLogger("midtrain")
    if not any(getattr(h, "_midtrain_console", False) for h in root.handlers):
        h = _StderrHandler()
        h.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        h._midtrain_console = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)


def run_stage(name: str, run_dir: Path, config_file: Path | None, overrides: list[str], force: bool = False,
              base: dict | None = None) -> Path:  # fmt: skip
    """Resolve the stage's config and run it (:class:`midtrain.experiments.runner.StageRunner`)."""
    return StageRunner(RunDir(run_dir), force=force, announce=False).run(name, base, config_file=config_file, overrides=overrides,
                                                         label=name)  # fmt: skip


def run_pipeline(pipeline_file: Path, run_dir: Path | None, overrides: list[str], force: bool) -> None:
    spec = load_yaml(pipeline_file)
    stages = spec.get("stages")
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{pipeline_file}: expected a non-empty `stages:` list")
    runner = StageRunner(RunDir(Path(run_dir or spec.get("run_dir") or "runs/default")), name="pipeline", force=force)
    for i, entry in enumerate(stages):
        if not isinstance(entry, dict) or entry.get("stage") not in STAGES:
            raise ConfigError(
                f"{pipeline_file}: stages[{i}]: expected `stage:` one of {', '.join(STAGES)}, got {entry!r}"
            )
        name = entry["stage"]
        base = {}
        if entry.get("config_file"):
            base.update(load_yaml(pipeline_file.parent / entry["config_file"]))
        base.update(entry.get("config") or {})
        stage_overrides = [o.split(".", 1)[1] for o in overrides if o.startswith(f"{name}.")]
        logging.getLogger("midtrain").info("pipeline: stage %d/%d: %s", i + 1, len(stages), name)
        runner.run(name, base, overrides=stage_overrides, label=name)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose ``--help`` ends with the stage's config options, read from the
    stage's config dataclass only when help is asked for (so building the CLI imports no stage)."""

    def __init__(self, *args, stage_spec=None, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.stage_spec = stage_spec

    def format_help(self) -> str:
        text = super().format_help()
        if self.stage_spec is None:
            return text
        config_cls = self.stage_spec.load_config_class()
        return (f"{text}\nconfig options (YAML keys of --config, or key=value; dotted for nested; "
                f"[throughput] options do not change the output, so changing them keeps finished work):\n"
                f"{help_text(config_cls)}\n")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="midtrain",
        description="Mid-training for vision-language-action models: " + " -> ".join(PIPELINE),
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", metavar="<stage>")
    groups: dict[str, argparse._SubParsersAction] = {}
    for spec in STAGES.values():
        if " " in spec.name:
            group, leaf = spec.name.split(" ", 1)
            if group not in groups:
                gp = sub.add_parser(group, help=f"{group} stages: " + ", ".join(
                    s.name.split(" ", 1)[1] for s in STAGES.values() if s.name.startswith(group + " ")))
                groups[group] = gp.add_subparsers(dest="subcommand", metavar=f"<{group} stage>", required=True)
            p = groups[group].add_parser(leaf, help=spec.help, description=spec.help, stage_spec=spec)
        else:
            p = sub.add_parser(spec.name, help=spec.help, description=spec.help, stage_spec=spec)
        p.set_defaults(stage=spec.name)
        p.add_argument("--config", type=Path, help="YAML file with the stage's config")
        p.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="run directory (default: runs/default)")
        p.add_argument("--force", action="store_true", help="recompute even if the stage is complete")
        p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (dotted keys)")
    p = sub.add_parser("run", help="run a pipeline YAML (a list of stages) into one run directory")
    p.add_argument("pipeline", type=Path)
    p.add_argument("--run-dir", type=Path)
    p.add_argument("--force", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="stage.key=value")
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parse_args`` that takes ``key=value`` overrides anywhere, also after ``--force`` or
    ``--config FILE`` (argparse fills a ``nargs="*"`` positional once and refuses what follows)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_args(parser, argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_console_logging(args.verbose)
    try:
        if args.command == "run":
            run_pipeline(args.pipeline, args.run_dir, args.overrides, args.force)
        else:
            out = run_stage(args.stage, args.run_dir, args.config, args.overrides, args.force)
            print(out)
    except (ConfigError, StageError, SampleError, FileNotFoundError) as exc:
        print(f"midtrain: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        message = missing_extra_message(exc)
        if message is None:
            raise
        print(f"midtrain: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
