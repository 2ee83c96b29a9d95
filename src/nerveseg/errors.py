"""Exceptions that name the offending file and say what to do about it."""

from __future__ import annotations

from pathlib import Path


class NerveSegError(Exception):
    """Base class of every error nerveseg raises on purpose."""


class InputError(NerveSegError):
    """A file that cannot be used as given.

    The message always names the file, says what is wrong and how to fix it, so a batch job
    can report it and go on.
    """

    def __init__(self, path: str | Path | None, problem: str, fix: str = ""):
        self.path = None if path is None else Path(path)
        self.problem = problem
        self.fix = fix
        where = f"{self.path}: " if self.path is not None else ""
        message = f"{where}{problem}"
        if fix:
            message += f" -- {fix}"
        super().__init__(message)


class ConfigError(NerveSegError):
    """An invalid option or combination of options."""
