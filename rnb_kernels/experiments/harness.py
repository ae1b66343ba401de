"""Machine, versions and git SHA recorded with every benchmark row, and CSV appending."""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["append_csv", "cpu_model", "git_sha", "machine_info", "results_dir", "write_markdown"]


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_sha(short: bool = True) -> str:
    """SHA of HEAD of the checkout this package lives in (``"unknown"`` outside git)."""
    here = Path(__file__).resolve().parent
    try:
        cmd = ["git", "rev-parse", "--short", "HEAD"] if short else ["git", "rev-parse", "HEAD"]
        out = subprocess.run(cmd, cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=here,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if out.returncode != 0:
        return "unknown"
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine_info(device: torch.device | str = "cpu") -> dict[str, Any]:
    """What a result row needs to be comparable: hardware, threads, versions, commit, time."""
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = ""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": gpu or cpu_model(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_v,
        "python": platform.python_version(),
        "git_sha": git_sha(),
    }


def results_dir() -> Path:
    """``benchmarks/results`` of the checkout (``$RNB_RESULTS_DIR`` overrides)."""
    env = os.environ.get("RNB_RESULTS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def append_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """Append rows to a CSV, writing the header when the file is new.

    Columns are the union of the existing header and the new keys, so adding a field later
    rewrites the file once with the wider header instead of misaligning rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old: list[dict[str, Any]] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old = list(reader)
    new_keys = [k for r in rows for k in r if k not in header]
    for k in new_keys:
        if k not in header:
            header.append(k)
    mode = "w" if new_keys and old else "a"
    with open(path, mode, newline="") as f:
        w = csv.DictWriter(f, fieldnames=header, restval="")
        if mode == "w" or not old:
            w.writeheader()
            w.writerows(old)
        w.writerows(rows)
    return path


def write_markdown(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Write (and return) a GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text
