"""Atomic file-system writes: a file or a directory appears complete or not at all.

Both write next to the destination under a hidden temporary name and rename into place
only when the write finished; on any exception the temporary is removed and the
destination is left as it was. Standard library only (the torch-free ``.pth`` writer
uses it).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import uuid
from collections.abc import Callable
from typing import BinaryIO


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> None:
    """Calls ``write(file)`` on a temporary sibling of ``path``, fsyncs it, then renames it
    to ``path`` (replacing an existing file)."""
    path = pathlib.Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(temporary, "xb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike, overwrite: bool = False):
    """Yields a staging directory next to ``directory`` that replaces it only when the
    block finishes; on an exception the staging directory is removed and ``directory``
    is untouched. Refuses an existing ``directory`` unless ``overwrite``."""
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose a new --out or pass --overwrite.")
    staging = directory.with_name(f".{directory.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        yield staging
        if directory.exists():
            shutil.rmtree(directory)
        staging.rename(directory)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
