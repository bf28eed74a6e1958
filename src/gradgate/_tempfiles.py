"""Temp files that name their owner, so a killed writer's leftovers can be removed (private).

A file is written to ``<name>.gg-<pid>@<host>.<random>.tmp`` next to its
destination and renamed over it when complete. A process killed with
SIGKILL leaves its temp file behind; the next operation in that folder calls
``remove_orphans``, which deletes the temp files whose owning process (on
this host) no longer exists. Files of live processes, of other hosts and of
other programs are never touched.
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path

__all__ = ["remove_orphans", "temp_path"]

_PATTERN = re.compile(r"\.gg-(?P<pid>\d+)@(?P<host>.+)\.[A-Za-z0-9_]+\.tmp\Z")


def _host() -> str:
    # '/' and '\0' cannot be in a file name; '@' and '.' parse fine (see _PATTERN).
    return socket.gethostname().replace("/", "_").replace("\0", "_") or "localhost"


def temp_path(dest: Path) -> Path:
    """Create an empty temp file next to ``dest`` whose name records this process.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> tmp = temp_path(Path(tempfile.mkdtemp()) / "model.safetensors")
        >>> tmp.name.startswith(f"model.safetensors.gg-{os.getpid()}@"), tmp.suffix
        (True, '.tmp')
    """
    fd, name = tempfile.mkstemp(
        prefix=f"{dest.name}.gg-{os.getpid()}@{_host()}.", suffix=".tmp", dir=dest.parent
    )
    os.close(fd)
    return Path(name)


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: never guess
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists and belongs to someone else
        return True
    return True


def remove_orphans(folder: Path) -> list[Path]:
    """Delete temp files in ``folder`` left by dead processes of this host; return them.

    A folder that cannot be listed or written is left alone (the caller's
    own operation reports that, if it matters).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp())
        >>> live = temp_path(folder / "x")  # this process is alive
        >>> remove_orphans(folder), live.exists()
        ([], True)
    """
    removed: list[Path] = []
    host = _host()
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        m = _PATTERN.search(name)
        if m is None or m["host"] != host or _alive(int(m["pid"])):
            continue
        path = folder / name
        try:
            path.unlink()
        except OSError:  # already removed by another process, or a read-only folder
            continue
        removed.append(path)
    return removed
