"""One-line errors for bad input: `error: <what> (<flag>)` on stderr and exit code 2, no traceback."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn


class UserError(Exception):
    """A problem with the user's input (a flag, a path, a file), reported as one line."""


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` to stderr and exit with status `code` (2, argparse's code for bad usage, unless told)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError raised inside the block into `fail(message)`."""
    try:
        yield
    except UserError as exc:
        fail(str(exc))
