"""The project's base for errors a user can foresee and fix.

Every library error class that means "your input is wrong, here is what to change" (ConfigError,
ModelResolutionError, DataPreparationError, RegistrationError, SourceError, JudgeError, ...) also inherits
from `OrpoError`, so each front door can show it the same way: its message, which names the file, field or
URL and what to do, without a traceback. The `orpo` CLI prints it and exits 1 (2 for a `UsageError`);
`--debug` or `ORPO_DEBUG=1` shows the traceback instead.

This module imports nothing, so any library module can inherit from it.
"""

from __future__ import annotations

import os

DEBUG_ENV = "ORPO_DEBUG"


class OrpoError(Exception):
    """An anticipated error; its message alone tells the user what went wrong and what to do."""

    exit_code = 1


class UsageError(OrpoError):
    """The command was given something invalid (a config value, an option): exit code 2, as for bad flags."""

    exit_code = 2


def debug_enabled() -> bool:
    """`ORPO_DEBUG=1` (or true/yes): show tracebacks of anticipated errors too."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes", "on")
