"""A process and its descendants as Linux's /proc shows them: the server (under --workers, the
supervisor and its workers) for its CPU and memory metrics (serve/metrics.py), and a server
`resserve bench serve` started, for the CPU it used under load.

Elsewhere (no /proc) there is nothing to read: the callers say so rather than guess.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class TreeUsage:
    """What a process and its live descendants use."""

    # user and system time, every thread, with that of descendants that ended and were waited
    # for (restarted workers, tools run), so it does not drop when one ends
    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    most_open_fds: int  # the most any one process holds: each has its own limit (ulimit -n)


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (which may hold spaces): state is [0], ppid [1]."""
    try:
        return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _tree(pid: int) -> list[int]:
    """``pid`` and every live process below it (none if ``pid`` is not running)."""
    if _stat_fields(pid) is None:
        return []
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))):
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, stack = [], [pid]
    while stack:
        current = stack.pop()
        tree.append(current)
        stack.extend(children.get(current, []))
    return tree


def _open_fds(pid: int) -> int:
    try:
        return len(os.listdir(PROC / str(pid) / "fd"))
    except OSError:  # gone meanwhile
        return 0


def tree_usage(pid: int) -> TreeUsage | None:
    """CPU time and memory of ``pid`` and its descendants, and the most files one holds open; None
    where /proc has no such process. Parents are read before their children, so a child waited
    for in between is left out of this reading (once), never counted twice."""
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    cpu, resident, virtual, fds, found = 0.0, 0, 0, 0, False
    for member in _tree(pid):
        fields = _stat_fields(member)
        if fields is None:  # ended since the tree was read
            continue
        found = True
        cpu += sum(map(int, fields[11:15])) / ticks  # utime, stime, and children's cutime, cstime
        virtual += int(fields[20])  # vsize, bytes
        resident += int(fields[21]) * page  # rss, pages
        fds = max(fds, _open_fds(member))
    return TreeUsage(cpu, resident, virtual, fds) if found else None
