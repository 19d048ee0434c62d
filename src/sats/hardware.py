"""What the machine offers: the CPU cores this process may use, native bf16, and how
glibc hands freed memory back.

Every ``sats`` command starts with :func:`use_available_cores`, so torch and SimpleITK
run one thread per core the process may really use. In a container with a
CPU limit (``docker --cpus 2``, a Kubernetes ``limits.cpu``) the CPUs the process sees
can be many more than the cores its quota pays for; a thread per visible CPU then
waits on the quota's throttling.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Callable

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_groups(proc_cgroup: Path) -> tuple[str, str]:
    """This process's cgroup v2 path and its cgroup v1 ``cpu`` path, from ``/proc/self/cgroup``
    (lines ``0::/path`` and ``N:cpu,cpuacct:/path``); "" where absent."""
    own_v2, own_v1 = "", ""
    try:
        for line in proc_cgroup.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                own_v2 = path.strip("/")
            elif "cpu" in controllers.split(","):
                own_v1 = path.strip("/")
    except (OSError, ValueError):
        pass
    return own_v2, own_v1


def _read_v2(folder: Path) -> tuple[int, int]:
    quota, period = (folder / "cpu.max").read_text().split()[:2]
    return (-1 if quota == "max" else int(quota)), int(period)


def _read_v1(folder: Path) -> tuple[int, int]:
    return int((folder / "cpu.cfs_quota_us").read_text()), int((folder / "cpu.cfs_period_us").read_text())


def _group_limits(base: Path, own: str, read: Callable[[Path], tuple[int, int]]) -> list[float] | None:
    """The CPU limits in cores of the group ``own`` and of its ancestors under ``base``;
    None where none of them has the files."""
    parts = [p for p in own.split("/") if p]
    found, limits = False, []
    for i in range(len(parts), -1, -1):
        try:
            quota, period = read(base.joinpath(*parts[:i]))
        except (OSError, ValueError):
            continue
        found = True
        if quota > 0 and period > 0:
            limits.append(quota / period)
    return limits if found else None


def cpu_quota_cores(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU limit of this process's control group, in cores (quota / period), or None
    where there is none. Reads cgroup v2 (``cpu.max``: ``"200000 100000"`` or ``"max
    100000"``), else cgroup v1 (``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, -1 for
    none): the smallest limit of the process's own group and its ancestors up to the
    root, which is the container's own group where the container has no cgroup namespace.

    Example:
        >>> cpu_quota_cores()  # doctest: +SKIP
        2.0
    """
    own_v2, own_v1 = _own_groups(proc_cgroup)
    candidates = [(root, own_v2, _read_v2)] + [(root / m, own_v1, _read_v1) for m in ("cpu", "cpu,cpuacct", "cpuacct,cpu")]
    for base, own, read in candidates:
        limits = _group_limits(base, own, read)
        if limits is not None:
            return min(limits, default=None)
    return None


def available_cores() -> int:
    """Cores this process may use: the CPUs it is pinned to (affinity), capped by its
    control group's CPU limit rounded up; at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cpu_quota_cores()
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def use_available_cores() -> int:
    """Run torch and SimpleITK on :func:`available_cores` threads, and say so in the
    environment, which child processes and libraries loaded later (a BLAS) read; returns
    the number. A thread count the user set in ``OMP_NUM_THREADS`` is left as it is."""
    if os.environ.get("OMP_NUM_THREADS"):
        return int(os.environ["OMP_NUM_THREADS"]) if os.environ["OMP_NUM_THREADS"].isdigit() else available_cores()
    n = available_cores()
    # Libraries read these when they load; child processes inherit them.
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ.setdefault(var, str(n))
    if "torch" in sys.modules:  # already loaded: tell it directly
        import torch

        if torch.get_num_threads() > n:
            torch.set_num_threads(n)
    if "SimpleITK" in sys.modules:
        import SimpleITK as sitk

        if sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() > n:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    return n


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AMX or AVX512-BF16); Linux flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(f in flags for f in (" amx_bf16", " avx512_bf16"))


def keep_freed_memory() -> bool:
    """Ask glibc to serve allocations under 32 MiB from its heap and to keep freed memory
    (up to 1 GiB) instead of returning it to the kernel after every step: each training
    step frees and re-allocates the same activation buffers, and handing them back costs
    page faults (cpu preset, 2 cores: 5.2 M -> 3.2 M minor faults, system time 12 -> 7 s
    over 20 steps). Returns False where the C library is not glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False
