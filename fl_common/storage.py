"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Checkpoints, run state, ledgers and statements are read back after a crash, so a write that
is cut short must leave the previous version in place. Every write here goes to a temporary
file in the target's own folder (a rename is atomic only within one file system), is flushed
and fsynced, renamed over the target with :func:`os.replace`, and then the folder is fsynced
so that the rename itself survives a power cut. On any error the temporary file is removed
and the target is untouched.

:func:`atomic_open` is the one routine; :func:`atomic_write_text`, :func:`atomic_write_bytes`
and :func:`atomic_write_json` are the common cases built on it. Writers that want a file
handle (``csv``, ``torch.save``, ``Figure.savefig``, ``DataFrame.to_parquet``) use
:func:`atomic_open` directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, Literal

#: Permission bits of a new file before the umask, as for ``open()``: usually 0644.
DEFAULT_PERMISSIONS = 0o666


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a no-op where folders cannot be fsynced."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(
    path: str | Path,
    mode: Literal["w", "wb"] = "w",
    *,
    encoding: str = "utf-8",
    newline: str | None = None,
    permissions: int = DEFAULT_PERMISSIONS,
) -> Iterator[IO[Any]]:
    """A handle whose content replaces ``path`` atomically when the ``with`` block ends.

    The folder of ``path`` is created if missing. The temporary file is created with
    ``permissions`` (subject to the umask) from its first moment, so ``0o600`` gives a secret
    that is never readable by others, not even briefly. If the block raises, the temporary
    file is deleted and ``path`` keeps its previous content.

    Args:
        path: the file to write.
        mode: ``"w"`` for text, ``"wb"`` for bytes.
        encoding: text encoding (text mode only).
        newline: as for :func:`open` (``""`` for the ``csv`` module; text mode only).
        permissions: permission bits of a newly created file, before the umask.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, permissions)
    try:
        if mode == "wb":
            handle: IO[Any] = os.fdopen(fd, "wb")
        else:
            handle = os.fdopen(fd, "w", encoding=encoding, newline=newline)
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(
    path: str | Path, data: bytes, *, permissions: int = DEFAULT_PERMISSIONS
) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "wb", permissions=permissions) as handle:
        handle.write(data)
    return Path(path)


def atomic_write_text(
    path: str | Path,
    text: str,
    *,
    encoding: str = "utf-8",
    permissions: int = DEFAULT_PERMISSIONS,
) -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_open`); returns ``path``."""
    with atomic_open(path, "w", encoding=encoding, permissions=permissions) as handle:
        handle.write(text)
    return Path(path)


def atomic_write_json(
    path: str | Path,
    value: Any,
    *,
    indent: int | None = None,
    sort_keys: bool = False,
    allow_nan: bool = True,
    trailing_newline: bool = False,
    permissions: int = DEFAULT_PERMISSIONS,
) -> Path:
    """Write ``json.dumps(value, ...)`` to ``path`` atomically (UTF-8); returns ``path``.

    ``indent``, ``sort_keys`` and ``allow_nan`` are :func:`json.dumps`'s; the text is encoded
    before anything is written, so a value that cannot be encoded leaves no file behind.
    """
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, allow_nan=allow_nan)
    return atomic_write_text(
        path, text + ("\n" if trailing_newline else ""), permissions=permissions
    )
