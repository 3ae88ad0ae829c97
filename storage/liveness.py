"""Is the process that measures a run still alive?  (Why a run shows ``abandoned``.)

A pid alone lies: after the measuring process dies, the kernel may hand the same pid to another
process.  So a run records the kernel's boot id and the process's start time (clock ticks since
boot, field 22 of /proc/PID/stat) beside the pid; the three together name one process for ever.
Where /proc is unavailable, or the run was recorded on another machine or before a reboot, the
heartbeat decides: a run whose heartbeat is older than :data:`STALE_AFTER` is abandoned.
"""

from __future__ import annotations

import os
import time
from typing import Any

#: How often a measuring process refreshes its heartbeat (s), and when silence means death.
HEARTBEAT_EVERY = 5.0
STALE_AFTER = 60.0


def boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces or ')': split after
    # the last ')'.  Field 22 (starttime) is then the 20th field.
    try:
        return int(stat[stat.rindex(b")") + 2:].split()[19])
    except (ValueError, IndexError):
        return None


def process_identity() -> dict[str, Any]:
    """The columns that identify this process in a run row."""
    pid = os.getpid()
    return {"pid": pid, "host_boot": boot_id(), "proc_start": start_ticks(pid)}


def is_alive(pid: int | None, host_boot: str | None, proc_start: int | None, heartbeat: float | None,
             *, clock: float | None = None) -> bool:
    """True while the process that recorded (pid, host_boot, proc_start) still runs."""
    here = boot_id()
    if pid is not None and host_boot is not None and here is not None and host_boot == here:
        return proc_start is not None and start_ticks(pid) == proc_start
    if heartbeat is None:
        return False
    return (clock if clock is not None else time.time()) - heartbeat < STALE_AFTER
