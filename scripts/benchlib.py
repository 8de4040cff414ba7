"""Helpers shared by the benchmark scripts (run as `python scripts/NAME.py`, so this
directory is on sys.path)."""

import platform


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (what every benchmark reports its numbers
    with), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
