"""Host memory facts: available RAM, peak RSS, file mappings, aligned and pinned buffers."""

from __future__ import annotations

import torch

PAGE = 4096


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
    info = meminfo()
    if "MemAvailable" in info:
        return info["MemAvailable"]
    import psutil

    return int(psutil.virtual_memory().available)


def total_ram() -> int:
    info = meminfo()
    if "MemTotal" in info:
        return info["MemTotal"]
    import psutil

    return int(psutil.virtual_memory().total)


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
