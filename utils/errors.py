"""One-line errors for bad input: `error: <what> (<flag>)` on stderr and exit code 2, no traceback.

The same holds for what stops a program from outside: a disk that fills up or turns read-only while it writes
(`write_failure`) and Ctrl-C arriving before a program installed its own stop handler (utils/outputs.py does).
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn


class UserError(Exception):
    """A problem with the user's input (a flag, a path, a file), reported as one line."""


# errno values of a write that the machine, not the program, refused: full disk or quota, read-only or lost mount
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EFBIG}
# how libraries that do not raise OSError report one: torch.save's zip writer (a RuntimeError from
# inline_container.cc), safetensors (a SafetensorError "I/O error: No space left on device (os error 28)")
TORCH_WRITE_FAILURES = ("PytorchStreamWriter failed", "file write failed", "inline_container",
                        *(os.strerror(code) for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)))
_outputs: dict[str, str] = {}  # real path of each output of this program -> the flag that named it


def note_output(path: str, flag: str) -> None:
    """Remember that `path` is written for `flag`, so a failed write below it names the flag."""
    _outputs[os.path.realpath(os.path.abspath(path))] = flag


def _in_temporary_of(real: str, path: str) -> bool:
    """Whether `real` is, or lies inside, a temporary sibling of the output `path` (a hidden `.partial` name of
    files.atomic_write, where a staged output is written before it is moved in)."""
    head = real
    while os.path.dirname(head) != head:
        name = os.path.basename(head)
        if os.path.dirname(head) == os.path.dirname(path) and name.startswith(".") and ".partial" in name:
            return True
        head = os.path.dirname(head)
    return False


def _output_of(filename: str | None) -> tuple[str, str, bool]:
    """(path, flag, written aside) of the registered output that holds `filename`, or whose temporary sibling does
    (written aside: True), or of the only one registered; else ("", "", False)."""
    if filename:
        real = os.path.realpath(os.path.abspath(str(filename)))
        for path, flag in _outputs.items():
            if real == path or real.startswith(path.rstrip(os.sep) + os.sep) or os.path.dirname(path) == real:
                return path, flag, False
            if _in_temporary_of(real, path):
                return path, flag, True
    return (*next(iter(_outputs.items())), False) if len(_outputs) == 1 else ("", "", False)


def write_failure(exc: BaseException) -> str | None:
    """The one-line message of an exception that is a failed write (full disk, quota, read-only file system), or
    None when it is something else (a bug keeps its traceback)."""
    if isinstance(exc, OSError) and exc.errno in WRITE_ERRNOS:
        filename = str(exc.filename) if exc.filename else None
        path, flag, aside = _output_of(filename)
        if aside:
            filename = path  # a temporary name of ours means nothing to the user: name the output
        what = f"cannot write {filename}" if filename else "a write failed"
        return f"{what}: {exc.strerror or exc}{f' ({flag})' if flag else ''}"
    if not isinstance(exc, OSError) and any(s in str(exc) for s in TORCH_WRITE_FAILURES):
        flag = _output_of(None)[1]
        return f"a write failed: {str(exc).strip().splitlines()[0]}{f' ({flag})' if flag else ''}"
    return None


def fail(message: str, code: int = 2) -> NoReturn:
    """Print `error: message` to stderr and exit with status `code` (2, argparse's code for bad usage, unless told)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn a UserError raised inside the block into `fail(message)`; so too a failed write (`write_failure`) and
    a Ctrl-C that reaches the block as KeyboardInterrupt (exit 130, as a shell reports SIGINT)."""
    try:
        yield
    except UserError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("stopped by SIGINT (Ctrl-C); finished outputs are kept", 130)
    except Exception as exc:  # noqa: BLE001 -- re-raised unless it is a failed write
        message = write_failure(exc)
        if message is None:
            raise
        fail(message)
