"""What the benchmarks share: the record of the machine they ran on, and peak resident-set measurement.

Memory is measured the same way in every CPU benchmark: release the heap that is already free, read
the resident set as the baseline, reset the kernel's high-water mark (``VmHWM``) to it, run the timed
steps, then read the high-water mark. Linux only (``/proc/self``).
"""

from __future__ import annotations

import ctypes
import datetime
import gc
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any


def machine_info(*packages: str) -> dict[str, Any]:
    """Where the numbers were taken: platform, CPU, torch and transformers (and ``packages``) versions, date, load.

    Args:
        packages: more distributions whose versions matter to the benchmark (e.g. ``"peft"``).
    """
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **{name: _version(name) for name in packages},
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        # other work on the machine slows every variant; a load well above 0 means noisier timings
        "load_average_1_5_15m_at_end": os.getloadavg(),
    }


def _version(distribution: str) -> str | None:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def proc_status_kb(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``).

    Raises:
        RuntimeError: the field is missing (not Linux).
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (this benchmark needs Linux)")


def memory_baseline() -> tuple[int, bool]:
    """Give freed heap memory back to the OS, then read the resident set, which now holds only live data.

    Returns:
        ``(resident set in kB, whether glibc's malloc_trim was available and called)``.
    """
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        trimmed = False
    else:
        libc.malloc_trim(0)
        trimmed = True
    return proc_status_kb("VmRSS"), trimmed


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark of the resident set (``VmHWM``) to the current resident set."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_kb() -> int:
    """The resident set's high-water mark since :func:`reset_peak_rss`, in kB."""
    return proc_status_kb("VmHWM")


def memory_fields(setup_peak_kb: int, baseline_kb: int, train_eval_peak_kb: int) -> dict[str, float]:
    """A run's memory readings as the benchmarks' JSON holds them (MB): the peak during set-up, the baseline before
    training, the peak during training and evaluation, and the larger peak."""
    return {
        "setup_peak_rss_mb": setup_peak_kb / 1024,
        "baseline_rss_mb": baseline_kb / 1024,
        "train_eval_peak_rss_mb": train_eval_peak_kb / 1024,
        "peak_rss_mb": max(setup_peak_kb, train_eval_peak_kb) / 1024,
    }


def worker_or_driver(args: Any, run_worker: Callable[[Any], Any]) -> bool:
    """A benchmark's process is a worker when its command line names one (``--worker``): run it and return True;
    else (the driver) check the data folder (:func:`check_data_dir`) and return False."""
    if args.worker:
        run_worker(args)
        return True
    check_data_dir(args.data_dir)
    return False


def check_data_dir(data_dir: Path, files: tuple[str, ...] = ("train.tsv", "dev.tsv")) -> None:
    """Stop with the fix when the data folder (SST-2's, by default) lacks one of ``files``.

    Raises:
        SystemExit: a file is missing.
    """
    for name in files:
        if not (data_dir / name).is_file():
            raise SystemExit(f"{data_dir / name} does not exist; pass --data-dir=<folder with SST-2's tsv files>")
