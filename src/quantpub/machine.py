"""The machine a stage runs on: its cores, its memory, its CPU's features, and why a process died.

Everything here reads the running machine (``/proc``, ``/sys/fs/cgroup``, ``os``); nothing is
cached across processes, because a venv built on one machine runs on others (a Ray cluster of
several CPU generations, a container moved between hosts).
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from quantpub import formatting

# Signals a process raises on itself when native code goes wrong: the variant's own failure.
CRASH_SIGNALS = {signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT}
# Signals sent from outside (a person, a scheduler, the OOM killer): an interruption, not a failure.
KILL_SIGNALS = {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
NEAR_LIMIT = 0.9  # a SIGKILL with the process tree's peak above this share of memory: probably the OOM killer


def cpu_count() -> int:
    """The cores this process may run on (its affinity, which containers and ``taskset`` narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def total_memory() -> int:
    """Bytes of memory this process may use: the machine's, or its cgroup's limit when lower."""
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_value("memory.max", "memory.limit_in_bytes")
    return min(physical, limit) if limit else physical


def available_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux names them (``avx2``, ``avx512f``, ``amx_int8``, ...); empty elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _cgroup_dir(controller: str) -> Path | None:
    """This process's cgroup directory for ``controller`` (v2: the unified hierarchy; v1: that controller's)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, names, path = line.split(":", 2)
        if names == "" and (Path("/sys/fs/cgroup") / path.lstrip("/") / "cgroup.controllers").exists():
            return Path("/sys/fs/cgroup") / path.lstrip("/")
        if controller in names.split(","):
            return Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    return None


def _cgroup_value(v2_name: str, v1_name: str) -> int | None:
    where = _cgroup_dir("memory")
    if where is None:
        return None
    for name in (v2_name, v1_name):
        try:
            text = (where / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):  # v1 says "no limit" with a huge number, v2 with "max"
            return int(text)
    return None


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has killed in this cgroup so far (None: not readable)."""
    where = _cgroup_dir("memory")
    if where is None:
        return None
    for name in ("memory.events", "memory.oom_control"):  # v2, v1: both carry an "oom_kill N" line
        try:
            for line in (where / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill" and value.strip().isdigit():
                    return int(value)
        except OSError:
            continue
    return None


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process below it (0 when it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


@dataclass(frozen=True)
class Ending:
    """How a process that ended without a result ended: ``crashed`` (its own fault, one attempt of what it
    carried), ``killed`` (from outside: an interruption, retried) or ``lost`` (no signal known)."""

    kind: str
    reason: str
    signal: str | None = None


def ending(exitcode: int | None, *, peak: int | None = None, oom_before: int | None = None,
           estimate: int | None = None) -> Ending:
    """Name how a process ended from its exit code (negative: the signal that ended it).

    A SIGKILL is reported as probably out of memory when the cgroup's OOM-kill count rose since
    ``oom_before`` or the process tree's ``peak`` resident memory came near the machine's memory;
    ``estimate`` (the plan's) is then printed beside the peak.
    """
    if exitcode is None or exitcode >= 0:
        return Ending("lost", f"ended with exit code {exitcode} before finishing")
    number = -exitcode
    try:
        name = signal.Signals(number).name
    except ValueError:
        name = f"signal {number}"
    if number in CRASH_SIGNALS:
        return Ending("crashed", f"crashed: {name}", name)
    if number == signal.SIGKILL:
        limit = total_memory()
        oom_now = oom_kills()
        by_oom = oom_before is not None and oom_now is not None and oom_now > oom_before
        if by_oom or (peak is not None and peak >= NEAR_LIMIT * limit):
            what = f"peak {formatting.size(peak)} of {formatting.size(limit)}" if peak else \
                f"the OOM killer acted (memory {formatting.size(limit)})"
            plan = f"; the plan estimated {formatting.size(estimate)}" if estimate else ""
            return Ending("killed", f"killed, probably out of memory: {what}{plan}", name)
    return Ending("killed", f"killed by {name}", name)
