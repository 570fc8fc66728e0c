"""The one exception type that means "the user's input is wrong", not "jora has a bug".

Command-line entry points print a `JoraError` as a single line and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class JoraError(Exception):
    """Bad input: a missing or malformed file, shapes that disagree, an output we must not touch."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)
