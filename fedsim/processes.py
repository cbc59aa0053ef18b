"""Whether a process still runs: the one liveness check (run directories' owners, a local federation's processes).

Core layer: imports nothing of fedsim.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any


def process_alive(pid: Any, host: str | None = None) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped, does not). On another machine (`host`) it
    cannot be told: taken as alive.

    `kill(pid, 0)` raising PermissionError means the process exists and belongs to someone else: alive."""
    if host is not None and host != socket.gethostname():
        return True
    try:
        os.kill(int(pid), 0)
    except (TypeError, ValueError, ProcessLookupError, OverflowError):
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    try:  # a zombie (killed, not yet reaped by its parent) still answers kill(pid, 0)
        return Path(f"/proc/{int(pid)}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):  # no /proc (macOS): kill(pid, 0) answered
        return True
