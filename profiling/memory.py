"""Peak resident memory of this process, per measured point (torch-free)."""

from __future__ import annotations


def can_reset_peak_rss() -> bool:
    """Whether reset_peak_rss() can restart the peak count here (Linux), without doing it."""
    import os

    return os.access("/proc/self/clear_refs", os.W_OK)


def reset_peak_rss() -> bool:
    """Restart this process's peak-memory count (Linux: VmHWM, via /proc/self/clear_refs); False
    where that is not possible, and peak_rss() then reports the whole process lifetime's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    """Peak resident memory of this process since the last reset_peak_rss() (else since it started),
    bytes. Linux: VmHWM; elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    import re

    try:
        with open("/proc/self/status") as f:
            return 1024 * int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        import resource  # not on Windows, which has neither
        import sys

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
