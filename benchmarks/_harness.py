"""Shared benchmark harness: timing, device copy bandwidth, environment rows, CSV output.

Timing is a median: ``triton.testing.do_bench`` on CUDA (it flushes L2 between runs and
times with CUDA events), and a ``time.perf_counter`` loop on the CPU. Every result row carries
the hardware (GPU name or the CPU model from ``/proc/cpuinfo``), torch / triton / CUDA
versions, the git SHA of the checkout and a timestamp, so rows from different machines and
commits can sit in one CSV.

Example:
    >>> from benchmarks._harness import environment, median_ms
    >>> env = environment("cpu")
    >>> ms = median_ms(lambda: sum(range(1000)), "cpu", rep_ms=5)
"""

from __future__ import annotations

import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha() -> str:
    """Short SHA of HEAD, with ``+dirty`` when tracked files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def environment(device: str | torch.device) -> dict[str, str]:
    """Columns identifying where and on what a row was measured."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = f"{cpu_model()} ({torch.get_num_threads()} threads)"
    try:  # CPU rows from a shared machine are only as good as its idleness
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    return {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "hardware": hardware,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "git_sha": git_sha(),
        "load_avg_1min": load,
    }


def median_ms(
    fn: Callable[[], object],
    device: str | torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 1000,
) -> float:
    """Median wall time of ``fn()`` in milliseconds.

    CUDA: ``triton.testing.do_bench(..., return_mode="median")``. CPU: ``fn`` is run for about
    ``warmup_ms``, then timed one call at a time for about ``rep_ms`` (at least ``min_reps``
    calls); the median discards stragglers from other processes on the machine.
    """
    if torch.device(device).type == "cuda":
        import triton.testing

        return float(
            triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        )
    t_end = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < t_end:
        fn()
    times: list[float] = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def median_ms_group(
    fns: Mapping[str, Callable[[], object]],
    device: str | torch.device,
    *,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> dict[str, float]:
    """Median ms of each of several callables that are to be compared with one another.

    CUDA: :func:`median_ms` one after the other (the GPU is not shared). CPU: the callables
    run round-robin, one call each per round, so load from other processes and frequency
    drift hit every provider alike and the ratios between them stay meaningful.
    """
    if torch.device(device).type == "cuda":
        return {name: median_ms(fn, device, rep_ms=rep_ms) for name, fn in fns.items()}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    t_end = time.perf_counter() + rep_ms * len(fns) / 1e3
    rounds = 0
    while rounds < min_reps or (time.perf_counter() < t_end and rounds < max_reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write counted).

    This is the denominator of the DESIGN.md section 5 bandwidth targets: what a plain
    ``copy_`` achieves on this machine, not the datasheet figure.
    """
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms / 1e3)


def append_csv(path: str | Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """Append ``rows`` to ``path``; a new column widens the header (the file is rewritten)."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, str]] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old = list(reader)
    added = [k for r in rows for k in r if k not in header]
    for k in added:
        if k not in header:
            header.append(k)
    rewrite = bool(added) or not old
    with open(path, "w" if rewrite else "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        if rewrite:
            writer.writeheader()
            writer.writerows(old)
        writer.writerows(rows)
    return path


def results_csv(prefix: str, device: str | torch.device) -> Path:
    """``benchmarks/results/<prefix>_<gpu|cpu>.csv``; ``$RNB_RESULTS_DIR`` overrides the folder."""
    folder = Path(os.environ.get("RNB_RESULTS_DIR", RESULTS_DIR))
    kind = "gpu" if torch.device(device).type == "cuda" else "cpu"
    return folder / f"{prefix}_{kind}.csv"


def format_table(rows: list[Mapping[str, object]], columns: list[str]) -> str:
    """Fixed-width text table (for the terminal and for pasting into notes)."""

    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [
        max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)
    ]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)
