"""Crash-safe writes: a file or folder is written under a temporary sibling name, flushed to disk, then renamed
into place, so a reader (or a run resumed after a kill) sees either the old version or the whole new one."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from typing import Iterator


def _remove(path: str) -> None:
    """Delete a file or a folder if it is there."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def _fsync(path: str) -> None:
    """Flush one file or folder entry to disk (best effort: some platforms cannot open folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: str) -> None:
    """Flush a file, or every file and folder under a folder, so the rename never outruns the data."""
    for root, _dirs, names in os.walk(path):
        for name in names:
            _fsync(os.path.join(root, name))
        _fsync(root)
    if os.path.isfile(path):
        _fsync(path)


def _sibling(path: str, tag: str) -> str:
    """A hidden name next to `path` that is this process's own: `.<name>.<tag>-<pid>`."""
    head, name = os.path.split(os.path.abspath(path))
    return os.path.join(head, f".{name}.{tag}-{os.getpid()}")


def install(tmp: str, path: str, aside: str | None = None, overwrite: bool = True) -> None:
    """Flush `tmp` (a finished file or folder) to disk and rename it to `path`.

    An existing `path` is replaced: first renamed to `aside` (os.replace cannot overwrite a non-empty folder),
    deleted once the new one is in place. With overwrite=False an existing file `path` raises FileExistsError
    instead, even when it appears during the call (hard-linked, or the name reserved with O_EXCL where a
    file system has no hard links), and `tmp` is left for the caller.
    """
    _fsync_tree(tmp)
    if not overwrite:
        try:
            os.link(tmp, path)  # atomic, and fails when `path` exists
            os.remove(tmp)
        except FileExistsError:
            raise
        except OSError:  # no hard links here: reserve the name, then move onto it
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(tmp, path)
    elif os.path.lexists(path) and (os.path.isdir(path) or os.path.isdir(tmp)):
        aside = aside or _sibling(path, "old")
        _remove(aside)
        os.replace(path, aside)
        os.replace(tmp, path)
        _remove(aside)
    else:
        os.replace(tmp, path)
    _fsync(os.path.dirname(os.path.abspath(path)))


def install_into(tmp: str, folder: str) -> None:
    """Move each entry of the finished folder `tmp` into `folder` (see `install`: an entry of the same name is
    replaced) and remove `tmp`. What `folder` holds under other names stays: a program replaces only its own files."""
    os.makedirs(folder, exist_ok=True)
    for name in sorted(os.listdir(tmp)):
        install(os.path.join(tmp, name), os.path.join(folder, name))
    _remove(tmp)


@contextmanager
def atomic_write(path: str, overwrite: bool = True, into: bool = False) -> Iterator[str]:
    """Yield a temporary sibling of `path` to write a file or a folder at; once the block succeeds it is installed
    as `path` (see `install`); if the block or the install fails it is removed and `path` is left as it was.
    into: a folder written onto an existing folder `path` is moved into it entry by entry (`install_into`)
    instead of replacing it whole, so the files `path` holds under other names are kept; the temporary is then
    made inside `path` (same file system, nothing written beside the folder)."""
    into_folder = into and os.path.isdir(path) and not os.path.islink(path)
    tmp = os.path.join(path, f".partial-{os.getpid()}") if into_folder else _sibling(path, "partial")
    _remove(tmp)
    try:
        yield tmp
        if not os.path.lexists(tmp):
            raise RuntimeError(f"nothing was written to {tmp}")
        if into_folder and os.path.isdir(tmp):
            install_into(tmp, path)
        else:
            install(tmp, path, overwrite=overwrite)
    finally:
        _remove(tmp)
