"""Replacing a file so that readers see the old or the new content, never half of either."""

from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomically(path: str, text: str, mode: int, dir_mode: int = 0o755) -> None:
    """Replace `path` with `text` (file mode `mode`), creating its directory if needed.

    The file and its directory entry are fsynced, so after a crash the path holds one version
    in full. (The CNI plugin keeps its own copy: it runs without site-packages and cannot import
    this package.)
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=dir_mode, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
