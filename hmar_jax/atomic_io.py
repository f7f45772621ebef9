"""Atomic file-system writes: a file or a directory appears complete or not at all.

Both write next to the destination under a hidden temporary name and rename into place
only when the write finished; on any exception the temporary is removed and the
destination is left as it was. Without ``overwrite`` the final step refuses to replace a
destination that appeared while the work ran (another process writing the same output),
so two writers never silently replace each other. Staging directories carry the host and
process id of their writer: one left behind by a killed process is removed by the next
write to the same destination. Standard library only (the torch-free ``.pth`` writer uses
it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import socket
import uuid
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object],
                 overwrite: bool = True) -> None:
    """Calls ``write(file)`` on a temporary sibling of ``path``, fsyncs it, then moves it to
    ``path``. With ``overwrite=False`` an existing ``path`` (also one created by another
    process meanwhile) raises FileExistsError and is left untouched."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(temporary, path)
        else:
            try:
                os.link(temporary, path)  # fails if path exists: no silent replacement
            except FileExistsError:
                raise FileExistsError(f"{path} was created by another process while this one "
                                      "ran; choose another --out or pass --overwrite.") from None
            os.remove(temporary)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def _staging_prefix(directory: pathlib.Path) -> str:
    return f".{directory.name}.partial-"


def _is_stale(staging: pathlib.Path, prefix: str) -> bool:
    """A staging directory of this host whose writing process no longer runs."""
    host, _, rest = staging.name[len(prefix):].rpartition("-pid")
    pid = rest.split("-", 1)[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def remove_stale_staging(directory: str | os.PathLike) -> list[pathlib.Path]:
    """Removes the staging directories of ``directory`` left by killed writers on this host;
    returns what was removed."""
    directory = pathlib.Path(directory).absolute()
    prefix = _staging_prefix(directory)
    removed = []
    if directory.parent.is_dir():
        for staging in directory.parent.glob(prefix + "*"):
            if staging.is_dir() and _is_stale(staging, prefix):
                shutil.rmtree(staging, ignore_errors=True)
                removed.append(staging)
    return removed


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False):
    """Yields a staging directory next to ``directory`` that replaces it only when the
    block finishes; on an exception the staging directory is removed and ``directory``
    is untouched. Refuses an existing ``directory`` unless ``overwrite``, also one that
    another process created while the block ran."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose a new --out or pass --overwrite.")
    remove_stale_staging(directory)
    staging = directory.with_name(f"{_staging_prefix(directory)}{socket.gethostname()}"
                                  f"-pid{os.getpid()}-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        yield staging
        if directory.exists():
            if not overwrite:
                raise FileExistsError(f"{directory} was created by another process while this "
                                      "one ran; choose a new --out or pass --overwrite.")
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
