"""Writing what the user gets without ever leaving a half-written file or clobbering a non-file.

Every file goes to a temporary name in the destination folder first and is renamed over the
destination only once it is complete (a rename within one folder is atomic on POSIX and Windows),
so a crash, a full disk or a cancel leaves either the old file or the new one, never a mix.
Destinations are checked before any work starts: an existing directory, device or pipe is
refused (renaming over ``/dev/full`` as root would replace the device), and an output folder is
probed for writability, so a read-only or full disk is reported at once rather than after a long
job.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_open", "check_output_file", "prepare_output_dir", "write_text_atomic"]


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on the device"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path after checking that a file can be written there.

    Raises
    ------
    FileNotFoundError
        The folder does not exist.
    IsADirectoryError
        ``path`` is a directory.
    ValueError
        ``path`` exists but is not a regular file (a device, a pipe, a socket).
    """
    out = Path(path).expanduser()
    if out.is_dir():
        raise IsADirectoryError(f"output path is a directory, expected a file name: {out}")
    with contextlib.suppress(FileNotFoundError):
        mode = out.stat().st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(
                f"output path {out} exists and is not a regular file (a device, pipe or socket): "
                "choose a file name"
            )
    parent = out.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"output folder does not exist: {parent}")
    return out


def prepare_output_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` (with parents) and check that files can be written in it.

    Raises PermissionError (read-only, no space, no permission) or FileExistsError (a file is in
    the way) with the reason, before any long job runs.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output folder {out} is an existing file; expected a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        try:
            os.write(fd, b"0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise PermissionError(f"cannot write to output folder {out}: {_reason(exc)}") from exc
    return out


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file beside ``path``; on success it is flushed, synced and renamed to
    ``path``; on any error (or a KeyboardInterrupt) it is removed and ``path`` is untouched."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb'; got {mode!r}")
    out = check_output_file(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as exc:
        raise PermissionError(f"cannot write {out}: {_reason(exc)}") from exc
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs are normal files
        os.replace(tmp, out)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, PermissionError):
            raise OSError(exc.errno, f"cannot write {out}: {_reason(exc)}") from exc
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_open(path, "w") as fh:
        fh.write(text)
    return Path(path).expanduser()
