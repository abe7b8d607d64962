"""What this process's control groups allow it: CPU time (a quota) and memory (a limit).

Containers, Kubernetes pods and systemd units set these, on cgroup v2 or (older hosts, still
common) v1, and on any level of the process's cgroup path: a pod's limit on its own cgroup, a
unit's on its slice. So each is read at every level from the process's cgroup up to the root of
the hierarchy this process sees, and the tightest wins. A container often sees only its own part
of the tree (its cgroup is the root of the mount, while /proc/self/cgroup names the host's path):
levels that the mount does not show are skipped.
"""

from __future__ import annotations

from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1 = 1 << 62  # cgroup v1 says "no memory limit" with the largest page-aligned number


def cpu_quota() -> float | None:
    """CPUs' worth of time the tightest CPU quota allows (1.5: a core and a half); None where none is set."""
    quotas = [quota for level in levels("cpu") if (quota := _cpu_quota_at(level)) is not None]
    return min(quotas, default=None)


def memory_headroom() -> int | None:
    """Bytes this process may still take before a memory limit: at the tightest level, the limit
    less the anonymous memory charged there (page cache is reclaimed, so it is not counted as
    taken); None where no limit is set."""
    rooms = [room for level in levels("memory") if (room := _memory_headroom_at(level)) is not None]
    return min(rooms, default=None)


def levels(controller: str) -> list[Path]:
    """The directories of this process's cgroup and its ancestors, innermost first, in the
    hierarchy that holds ``controller``: v1's own (/sys/fs/cgroup/cpu), else v2's unified one."""
    try:
        entries = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    except OSError:
        return []
    v1 = [path for _, controllers, path in entries if controller in controllers.split(",")]
    v2 = [path for hierarchy, controllers, path in entries if hierarchy == "0" and not controllers]
    if v1:
        root, path = CGROUP_ROOT / controller, v1[0]
    elif v2 and (CGROUP_ROOT / "cgroup.controllers").exists():
        root, path = CGROUP_ROOT, v2[0]
    else:
        return []
    relative = Path(path.lstrip("/"))
    return [root / level for level in (relative, *relative.parents) if (root / level).is_dir()]


def _cpu_quota_at(level: Path) -> float | None:
    try:
        if (level / "cpu.max").exists():  # v2: "QUOTA PERIOD" in microseconds, or "max PERIOD"
            quota, period = (level / "cpu.max").read_text().split()
            return None if quota == "max" else int(quota) / int(period)
        quota = int((level / "cpu.cfs_quota_us").read_text())  # v1: -1 for none
        return None if quota < 0 else quota / int((level / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def _memory_headroom_at(level: Path) -> int | None:
    try:
        if (level / "memory.max").exists():  # v2
            limit, anonymous = (level / "memory.max").read_text().strip(), "anon"
            if limit == "max":
                return None
        else:  # v1: its own limit file, and the anonymous memory of the cgroup and those below it
            limit, anonymous = (level / "memory.limit_in_bytes").read_text().strip(), "total_rss"
            if int(limit) >= UNLIMITED_V1:
                return None
        stat = dict(line.split() for line in (level / "memory.stat").read_text().splitlines())
        return int(limit) - int(stat[anonymous])
    except (OSError, KeyError, ValueError):
        return None
