"""Files the compliance package writes: all at once, readable by their owner only."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


def write_atomically(path: Path, chunks: Iterable[str]) -> None:
    """Write ``chunks`` (UTF-8 text) to ``path`` as a whole, with mode 0600.

    They go to a temporary file beside ``path``, synced to disk and then renamed over it, so a
    reader sees the old file or the complete new one, never a part; nothing is left on failure.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.writelines(chunks)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
