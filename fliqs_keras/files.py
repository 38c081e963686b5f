"""Files written whole or not at all.

Each is written to a temporary file in the destination's folder and renamed
over the destination, so a full disk or a crash never leaves a truncated file
where a complete one is expected.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile
from typing import Iterator

import keras


def destination(path: str | os.PathLike) -> pathlib.Path:
    """`path` with its folder created; checked before any expensive work that ends in writing it.

    Raises:
        ValueError: when a part of the folder is a regular file, or `path` is a folder.
    """
    path = pathlib.Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in [path.parent, *path.parent.parents] if p.exists() and not p.is_dir()), None)
        raise ValueError(f"Cannot write {str(path)!r}: {str(blocking or path.parent)!r} is a file, not a folder.") \
            from None
    if path.is_dir():
        raise ValueError(f"Cannot write {str(path)!r}: it is a folder.")
    return path


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path beside `path` (same suffix) to write; on success it replaces `path`.

    On an error the temporary file is removed and `path` is left as it was.
    """
    path = destination(path)
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(handle)
    temporary = pathlib.Path(name)
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_bytes(path: str | os.PathLike, data: bytes):
    """Writes `data` to `path` whole or not at all."""
    with replacing(path) as temporary:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())


def write_text(path: str | os.PathLike, text: str):
    """Writes `text` (UTF-8) to `path` whole or not at all."""
    write_bytes(path, text.encode())


def save_model(model: keras.Model, path: str | os.PathLike):
    """`model.save(path)` whole or not at all."""
    with replacing(path) as temporary:
        model.save(temporary)
