"""Run one benchmark method in a child process under a memory and time watchdog; scratch folders.

The child is the calling script run again with other arguments; it prints its measurements as one JSON line last.
The parent polls the RSS of the child's process tree and kills it beyond ``memory_limit`` bytes or ``time_limit``
seconds, so that a peer that runs out of memory is reported instead of taking the machine down.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil

GIB = 2**30


def run_watched(script: str, label: str, arguments: list[str], *, memory_limit: int, time_limit: float) -> dict:
    """Run ``script`` with ``arguments``; return its JSON line, or why it was stopped or failed.

    Always present: ``process_wall_s`` and ``polled_peak_rss_bytes``; then the child's own keys, or ``stopped``
    (by the watchdog) or ``failed`` (the last lines of its stderr, or ``"out of memory (MemoryError)"``).
    """
    print(f"[{time.strftime('%H:%M:%S')}] {label} ...", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, script, *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    watched = psutil.Process(process.pid)
    polled_peak, stopped = 0, None
    while process.poll() is None:
        try:
            rss = watched.memory_info().rss + sum(c.memory_info().rss for c in watched.children(recursive=True))
        except psutil.NoSuchProcess:
            break
        polled_peak = max(polled_peak, rss)
        elapsed = time.perf_counter() - start
        if rss > memory_limit:
            stopped = f"out of memory: stopped by the watchdog at {elapsed:.0f} s with {rss / GIB:.2f} GiB RSS"
        elif elapsed > time_limit:
            stopped = f"stopped by the watchdog after {elapsed:.0f} s"
        if stopped:
            process.kill()
            break
        time.sleep(0.1)
    stdout, stderr = process.communicate()
    entry: dict = {"process_wall_s": time.perf_counter() - start, "polled_peak_rss_bytes": polled_peak}
    if stopped is not None:
        entry["stopped"] = stopped
    elif process.returncode != 0:
        lines = stderr.strip().splitlines()
        entry["failed"] = "out of memory (MemoryError)" if any("MemoryError" in x for x in lines) else lines[-5:]
    else:
        entry.update(json.loads(stdout.strip().splitlines()[-1]))
    return entry


#: File that marks a scratch folder as a benchmark's own, so that only such folders are ever deleted.
WORKDIR_MARK = ".hest-zarr-benchmark"


def claim_workdir(path: Path, *, empty: bool) -> Path:
    """Create ``path`` as a benchmark's scratch folder (``empty``: clear a previous run's first).

    An existing folder is only reused or cleared when a benchmark made it: ``--workdir ~/data`` is refused,
    never deleted.
    """
    path = Path(path)
    if path.exists() and any(path.iterdir()) and not (path / WORKDIR_MARK).is_file():
        raise SystemExit(f"{path}: exists and was not made by a benchmark; choose another --workdir")
    if empty:
        release_workdir(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / WORKDIR_MARK).touch()
    return path


def release_workdir(path: Path) -> None:
    """Delete a scratch folder made by :func:`claim_workdir` (and nothing else)."""
    if (Path(path) / WORKDIR_MARK).is_file():
        shutil.rmtree(path, ignore_errors=True)
