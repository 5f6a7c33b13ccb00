"""Command line: ``hero <command> [args]``; ``hero train --config FILE [--key value ...]``.

Subcommands are a table of (name, ``"module:function"``, one-line help) in ``COMMANDS``: ``hero --help`` lists
them without importing anything, and ``main`` imports only the module of the command that runs, so ``hero train``
never imports an experiment or the benchmark suite. Add one with::

    from hero.cli import register_command

    register_command("mine", "my_package.cli:mine_command", "what it does (hero mine --help)")

where ``mine_command(argv: list[str]) -> int`` parses ``argv`` itself (argparse is fine) and returns an exit code.

``hero train`` reads the YAML config, applies ``--key value`` / ``--section.key=value`` overrides (typed by the
config dataclasses; unknown keys are an error naming the key), trains, and prints where the checkpoints
and metrics went. ``--print-config`` prints the resolved config as YAML and exits.
Errors the user can fix raise ``hero.errors.HeroUserError``; ``main`` prints them as one line (``HERO_DEBUG=1``:
with the traceback) and exits with their code: 0 ok, 2 bad command line, config or input, 3 bad data row with
``on_bad_row: stop``, 130 Ctrl-C (``hero train`` saves a checkpoint first and prints the resume command).
Warnings print as one line each.
"""
from __future__ import annotations

import sys
import traceback
import warnings
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence

from hero.config import ConfigError, config_to_dict, load_config
from hero.errors import HeroUserError, TrainingInterrupted, debug_enabled

__all__ = ["main", "register_command", "resume_command", "COMMANDS"]


class Command(NamedTuple):
    target: str  # "module:function"; function(argv: List[str]) -> exit code
    help: str


#: name -> Command. Only names and help live here; a command's module is imported when that command runs.
COMMANDS: Dict[str, Command] = {
    "train": Command("hero.cli:_train", "train a policy with HERO-GRPO (hero train --config FILE [--key value ...])"),
    "plot": Command("hero.cli:_plot",
                    "plot reward, entropy, KL and kept fraction of a run (hero plot RUN_DIR [--out FILE.png])"),
    "bench": Command("hero.bench_cli:_bench",
                     "run the kernel micro-benchmarks from a source checkout (python -m benchmarks; --help)"),
    "diagnose": Command("hero.experiments.confidence_trap.diagnose_cli:_diagnose_cmd",
                        "confidence-trap diagnosis of a VLM (hero diagnose --model PATH --data FILE.jsonl --out DIR)"),
    "demo": Command("hero.experiments.confidence_trap.diagnose_cli:_demo_cmd",
                    "the confidence-trap demo end to end on CPU (hero demo --out demo_out)"),
}


def register_command(name: str, target: str, help: str = "") -> None:
    """Add ``hero <name>``, implemented by ``target`` = ``"module:function"`` (imported when the command runs)."""
    if ":" not in target:
        raise ValueError(f"register_command target must be 'module:function', got {target!r}")
    if name in COMMANDS and COMMANDS[name].target != target:
        raise ValueError(f"hero subcommand {name!r} is already registered")
    COMMANDS[name] = Command(target, help)


def _command_fn(name: str) -> Callable[[List[str]], int]:
    """Import the module of ``hero <name>`` and return its function; one-line error when the module is missing."""
    import importlib

    module, fn = COMMANDS[name].target.split(":", 1)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise  # the module exists but one of ITS imports is missing: say which
        raise HeroUserError(f"this command needs the module {module!r}, which is not installed") from e
    return getattr(mod, fn)


def _usage() -> str:
    width = max((len(n) for n in COMMANDS), default=4)
    lines = ["usage: hero <command> [args]", "", "commands:"]
    lines += [f"  {n.ljust(width)}  {c.help}" for n, c in sorted(COMMANDS.items())]
    lines += ["", "'hero <command> --help' for a command's options."]
    return "\n".join(lines)


_TRAIN_HELP = """usage: hero train [--config FILE] [--print-config] [--KEY VALUE | --KEY=VALUE ...]

Train a policy with HERO-GRPO. KEY is any config field, nested with dots, e.g.
  hero train --config configs/tiny.yaml --lr 1e-5 --loss.kappa 0.5 --gate.keep_frac=0.8 --steps 20
Lists: --rewards.funcs yes_no,format   Booleans: --bf16 true (a bare --bf16 means true).
Runs: --resume auto continues the run in --output_dir (Ctrl-C saves a checkpoint and prints this command);
  --overwrite deletes the run there and starts over; --allow-config-change resumes with changed lr,
  batch_size, loss.*, ... (steps, save cadence, logging and output options may always change).
Exit codes: 0 done, 2 bad command line / config / input, 3 bad data row with on_bad_row=stop, 130 Ctrl-C.
HERO_DEBUG=1 shows the traceback behind a one-line error. See hero/config.py for every field.
"""


def _split_train_args(argv: List[str]):
    """(config path, --print-config, the --key value overrides) of ``hero train``; None when --help."""
    config_path: Optional[str] = None
    print_config = False
    rest: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            return None
        if a == "--config":
            if i + 1 >= len(argv):
                raise ConfigError("--config needs a file")
            config_path = argv[i + 1]
            i += 2
            continue
        if a.startswith("--config="):
            config_path = a.split("=", 1)[1]
        elif a == "--print-config":
            print_config = True
        else:
            rest.append(a)
        i += 1
    return config_path, print_config, rest


def resume_command(argv: Sequence[str]) -> str:
    """The ``hero train`` command line that continues this run: ``argv`` without --resume / --overwrite, plus
    ``--resume auto``."""
    import shlex

    keep: List[str] = []
    skip_value = False
    for i, a in enumerate(argv):
        if skip_value:
            skip_value = False
            continue
        key = a.split("=", 1)[0]
        if key in ("--resume", "--overwrite"):
            nxt = argv[i + 1] if i + 1 < len(argv) else "--"
            skip_value = "=" not in a and (key == "--resume" or nxt.lower() in ("true", "false", "1", "0"))
            continue
        keep.append(a)
    return shlex.join(["hero", "train", *keep, "--resume", "auto"])


def _train(argv: List[str]) -> int:
    parsed = _split_train_args(argv)
    if parsed is None:
        print(_TRAIN_HELP)
        return 0
    config_path, print_config, rest = parsed
    cfg = load_config(config_path, rest)
    if print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from hero.trainer import Trainer

    try:
        trainer = Trainer(cfg)
        if trainer.finished:
            return _already_complete(trainer)
        trainer.train()
    except TrainingInterrupted as e:
        raise TrainingInterrupted(f"{e}; resume with: {resume_command(argv)}", e.checkpoint) from e
    except KeyboardInterrupt:  # the second Ctrl-C, or one before the training loop
        raise TrainingInterrupted(f"stopped by Ctrl-C; steps after the last checkpoint are lost; resume with: "
                                  f"{resume_command(argv)}") from None
    final = trainer.export() if cfg.export else None
    from hero.run_report import summary_lines

    print("\n".join(summary_lines(cfg.output_dir, final)))
    return 0


def _already_complete(trainer) -> int:
    """A resumed run that has already done every step: say so (export the final model if a kill lost it)."""
    import os

    cfg = trainer.cfg
    print(f"the run in {cfg.output_dir} is already complete: step {trainer.step} of {cfg.steps} "
          f"({trainer._resumed_from}); raise --steps to train further")
    final = os.path.join(cfg.output_dir, "final")
    if cfg.export and not os.path.isdir(final):
        print(f"final model: {trainer.export()} (exported again: it was missing)")
    return 0


def _plot(argv: List[str]) -> int:
    import argparse

    from hero.run_report import plot_metrics

    ap = argparse.ArgumentParser(prog="hero plot", description="PNG of reward, entropy, KL and kept fraction per "
                                 "step from RUN_DIR/metrics.jsonl")
    ap.add_argument("run_dir", help="the --output_dir of a hero train run")
    ap.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    args = ap.parse_args(argv)
    print(f"wrote {plot_metrics(args.run_dir, args.out)}")
    return 0


class _OneLineWarnings(warnings.catch_warnings):
    """Warnings as ``hero <command>: warning: <message>``, one line each, while a command runs."""

    def __init__(self, command: str):
        super().__init__()
        self.command = command

    def __enter__(self):
        super().__enter__()
        prefix = f"hero {self.command}: warning: "

        def show(message, category, filename, lineno, file=None, line=None):
            print(prefix + " ".join(str(message).split()), file=file or sys.stderr, flush=True)

        warnings.showwarning = show
        return self


def _user_error(command: str, e: HeroUserError) -> int:
    if debug_enabled():
        traceback.print_exc()
    print(f"hero {command}: {' '.join(str(e).split())}", file=sys.stderr)
    return e.exit_code


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``hero`` script and ``python -m hero``. A HeroUserError from any command is one line on
    stderr and its exit code (HERO_DEBUG=1: with the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"hero: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    with _OneLineWarnings(cmd):
        try:
            return int(_command_fn(cmd)(rest) or 0)
        except HeroUserError as e:
            return _user_error(cmd, e)
        except KeyboardInterrupt:
            print(f"hero {cmd}: interrupted", file=sys.stderr)
            return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
