"""One exception type for mistakes a user can fix: ``HeroUserError``.

Anything that is the user's to fix (a config key, a missing file, a model name that does not exist, a reward
function that returns the wrong number of values, ...) raises ``HeroUserError`` (or a subclass:
``hero.config.ConfigError``, ``hero.rollout.BadRowError``) with a message that names the problem and the fix.
``hero.cli.main`` catches it and prints ``hero <command>: <message>`` as ONE line on stderr, then exits with
``exit_code`` (2 unless the subclass says otherwise); ``HERO_DEBUG=1`` prints the traceback as well.
Everything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os

__all__ = ["HeroUserError", "TrainingInterrupted", "debug_enabled"]


class HeroUserError(Exception):
    """A mistake the user can fix; the message names the problem and the fix (one line)."""

    #: process exit code when this reaches ``hero.cli.main``
    exit_code = 2


class TrainingInterrupted(HeroUserError):
    """Ctrl-C: the trainer saved a checkpoint at a step boundary (``checkpoint``) and stopped."""

    exit_code = 130  # the shell's code for "ended by SIGINT"

    def __init__(self, message: str, checkpoint: str = ""):
        super().__init__(message)
        self.checkpoint = checkpoint


def debug_enabled() -> bool:
    """HERO_DEBUG=1 (or any value but "", "0", "false"): show tracebacks of user errors too."""
    return os.environ.get("HERO_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
