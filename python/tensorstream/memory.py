"""Host memory facts: available RAM, peak RSS, file mappings, aligned and pinned buffers."""

from __future__ import annotations

import os
from typing import Optional

import torch

from .consts import PAGE


def meminfo() -> dict:
    """/proc/meminfo in bytes (empty off Linux)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                k, v = line.split(":", 1)
                parts = v.split()
                out[k] = int(parts[0]) * (1024 if len(parts) > 1 else 1)
    except OSError:
        pass
    return out


def available_ram() -> int:
    """RAM this process can still take: ``MemAvailable``, within the memory cgroup's limit."""
    info = meminfo()
    free = info["MemAvailable"] if "MemAvailable" in info else _psutil().available
    limit = cgroup_limit()
    return free if limit is None else min(free, limit[1])


def total_ram() -> int:
    """The machine's RAM, or the memory cgroup's limit when it is lower."""
    info = meminfo()
    total = info["MemTotal"] if "MemTotal" in info else _psutil().total
    limit = cgroup_limit()
    return total if limit is None else min(total, limit[0])


def _psutil():
    import psutil

    return psutil.virtual_memory()


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _stat(text: str, key: str) -> int:
    for line in text.splitlines():
        k, _, v = line.partition(" ")
        if k == key:
            return int(v)
    return 0


_CGROUP_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2**63


def cgroup_limit() -> Optional[tuple]:
    """(limit, free) of this process's memory cgroup (v2, else v1), or None without a limit.
    Free is the limit less what the group uses, its inactive file pages counted as free (the
    kernel reclaims them before it would kill)."""
    for d, files in (
        ("/sys/fs/cgroup", ("memory.max", "memory.current", "inactive_file")),
        ("/sys/fs/cgroup/memory", ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")),
    ):
        limit = _read(os.path.join(d, files[0]))
        if limit is None:
            continue
        limit = limit.strip()
        if limit == "max" or int(limit) >= _CGROUP_UNLIMITED:
            return None
        used = int(_read(os.path.join(d, files[1])) or 0)
        inactive = _stat(_read(os.path.join(d, "memory.stat")) or "", files[2])
        return int(limit), max(int(limit) - used + inactive, 0)
    return None


def peak_rss() -> int:
    """Peak resident set size of this process (VmHWM), in bytes."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0). Returns False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def aligned_empty(nbytes: int) -> torch.Tensor:
    """A uint8 CPU tensor of `nbytes` whose data starts on a 4 KiB boundary (for O_DIRECT).
    Pinned buffers come from `pinned_empty`."""
    raw = torch.empty(nbytes + PAGE, dtype=torch.uint8)
    off = (-raw.data_ptr()) % PAGE
    return raw[off : off + nbytes]


class _HostRegistration:
    """Keeps a CPU buffer registered with CUDA (page-locked) for as long as it lives."""

    def __init__(self, ptr: int, nbytes: int):
        self.ptr = ptr
        rc = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
        self.ok = int(rc) == 0

    def __del__(self):
        if self.ok:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.ptr)
            except Exception:
                pass


def pinned_empty(nbytes: int) -> tuple:
    """A page-aligned uint8 CPU tensor registered with CUDA (pinned), and whether pinning
    worked. Registering exactly `nbytes` avoids the caching host allocator's rounding up to a
    power of two, which would pin up to twice the memory asked for."""
    t = aligned_empty(nbytes)
    reg = _HostRegistration(t.data_ptr(), nbytes)
    t._tensorstream_pin = reg  # unregistered when the tensor goes
    return t, reg.ok


def file_mappings() -> list:
    """(start, end) of this process's file-backed memory mappings (Linux)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6 and parts[5].startswith("/"):
                    lo, hi = parts[0].split("-")
                    out.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return out


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
