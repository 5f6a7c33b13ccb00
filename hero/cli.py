"""Command line: ``hero <command> [args]``; ``hero train --config FILE [--key value ...]``.

Subcommands live in a registry so other modules add theirs without touching ``main`` (list the module in
``COMMAND_MODULES`` so ``main`` imports it)::

    from hero.cli import register_command

    @register_command("bench", "run the kernel benchmarks")
    def _bench(argv: list[str]) -> int:
        ...  # parse argv yourself (argparse is fine), return an exit code

``hero train`` reads the YAML config, applies ``--key value`` / ``--section.key=value`` overrides (typed by the
config dataclasses; unknown keys are an error naming the key), trains, and prints where the checkpoints
and metrics went. ``--print-config`` prints the resolved config as YAML and exits.
Exit codes: 0 ok, 2 bad command line or config, 3 bad data row with ``on_bad_row: stop``.
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, NamedTuple, Optional

__all__ = ["main", "register_command", "COMMANDS"]


class Command(NamedTuple):
    fn: Callable[[List[str]], int]
    help: str


#: name -> Command; filled by ``register_command``.
COMMANDS: Dict[str, Command] = {}

#: Modules that register more subcommands when imported; ``main`` imports them on first use (a module that
#: does not exist yet is skipped). Add yours here.
COMMAND_MODULES = ("hero.experiments.confidence_trap.diagnose_cli", "hero.bench_cli")


def register_command(name: str, help: str = ""):
    """Decorator: register ``fn(argv) -> exit code`` as ``hero <name>``."""

    def deco(fn: Callable[[List[str]], int]):
        if name in COMMANDS and COMMANDS[name].fn is not fn:
            raise ValueError(f"hero subcommand {name!r} is already registered")
        COMMANDS[name] = Command(fn, help)
        return fn

    return deco


def _load_command_modules() -> None:
    import importlib

    for mod in COMMAND_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:  # the module exists but one of ITS imports is missing: say so
                raise


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
See hero/config.py for every field and its meaning.
"""


@register_command("train", "train a policy with HERO-GRPO (hero train --config FILE [--key value ...])")
def _train(argv: List[str]) -> int:
    from hero.config import ConfigError, config_to_dict, load_config

    config_path: Optional[str] = None
    print_config = False
    rest: List[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in ("-h", "--help"):
            print(_TRAIN_HELP)
            return 0
        if a == "--config":
            if i + 1 >= len(argv):
                print("hero train: --config needs a file", file=sys.stderr)
                return 2
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
    try:
        cfg = load_config(config_path, rest)
    except (ConfigError, FileNotFoundError) as e:
        print(f"hero train: {e}", file=sys.stderr)
        return 2
    if print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        return 0
    from hero.trainer import BadRowError, Trainer

    try:
        trainer = Trainer(cfg)
        m = trainer.train()
    except BadRowError as e:
        print(f"hero train: bad data row: {e}", file=sys.stderr)
        return 3
    if cfg.export:
        path = trainer.export()
        print(f"final model: {path}")
    keys = ("step", "loss", "reward", "entropy", "kl", "beta", "gate/kept_frac", "tokens_per_s", "peak_memory_mb")
    print("last step: " + ", ".join(f"{k}={m[k]:.4g}" if isinstance(m.get(k), float) else f"{k}={m.get(k)}"
                                    for k in keys if k in m))
    print(f"metrics: {cfg.output_dir}/metrics.jsonl; checkpoints: {cfg.output_dir}/checkpoint-*")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``hero`` script and ``python -m hero``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _load_command_modules()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"hero: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return int(COMMANDS[cmd].fn(rest) or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
