"""What every suite reports: the device in words, the date, and best-of-N wall times."""
from __future__ import annotations

import platform
import time
from datetime import datetime, timezone

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{_cpu_model()}, {torch.get_num_threads()} threads"


def _cpu_model() -> str:
    """The CPU's name: Linux's platform.processor() is empty, and the architecture names no machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def sig(x: float, digits: int = 4) -> float:
    """x to `digits` significant digits: rates from 0.1 to 10,000 per second read alike."""
    return float(f"{x:.{digits}g}")


def timed(fn, repeat: int) -> float:
    """Best of `repeat` wall times of fn()."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
