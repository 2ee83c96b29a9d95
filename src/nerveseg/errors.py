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


class OutputError(NerveSegError, OSError):
    """A result that cannot be written (full disk, quota, read-only or forbidden folder).

    Not an InputError: the input is fine and every later input would fail the same way, so a
    batch stops. Also an OSError with the original ``errno``, so code that falls back on a
    failed write (e.g. an ONNX export kept in memory) still does. ``path`` is the file or
    output folder; the message says which results are intact."""

    def __init__(self, path: str | Path, problem: str, fix: str = "", errno_: int | None = None):
        if errno_ is None:
            OSError.__init__(self, problem)
        else:
            OSError.__init__(self, errno_, problem)
        self.path = Path(path)
        self.problem = problem
        self.fix = fix
        self.message = f"{self.path}: {problem}" + (f" -- {fix}" if fix else "")

    def __str__(self) -> str:
        return self.message
