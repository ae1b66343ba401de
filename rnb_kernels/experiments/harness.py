"""The one benchmark harness: environment columns, results location, CSV and markdown output,
timing (GPU, CPU, and interleaved A/B of whole steps) and robust statistics.

Used by ``rnb bench mixing``, ``rnb bench overhead`` and the scripts in ``benchmarks/``.

* :func:`environment` — the columns every result row carries, under one set of names:
  ``timestamp, device, hardware, threads, torch, triton, cuda, python, git_sha, git_dirty,
  load_avg_1min``. ``hardware`` is the GPU name on CUDA and the CPU model otherwise.
* :func:`results_dir` — ``--out`` when given, else ``$RNB_RESULTS_DIR``, else
  ``benchmarks/results`` of the source checkout the package was imported from, else
  ``./benchmark_results`` (an installed package has no checkout).
* :func:`append_csv` (header union), :func:`write_csv`, :func:`markdown_table`.
* :func:`median_ms` — ``triton.testing.do_bench`` on CUDA (L2 flushed between runs, CUDA
  events), a ``perf_counter`` loop on the CPU (:func:`cpu_time_ms`).
* :func:`time_interleaved` — every variant once per round, in a fresh seeded random order each
  round (:func:`round_orders`), so load from other processes, clock drift and whatever one
  variant leaves behind for the next hit every variant alike; :func:`summarize` (median, IQR,
  bootstrap CI of the median) and :func:`ratio_ci` (median of the per-round ratios, bootstrap
  CI over rounds) turn the samples into numbers that can be compared.
* :func:`t_interval` and :func:`paired_t` — mean and Student-t confidence interval of a few
  per-seed values, or of per-seed differences (paired by seed), for learning-quality results.

Example:
    >>> samples = time_interleaved({"a": lambda: sum(range(100)), "b": lambda: None}, 5)
    >>> s = summarize(samples["a"])
    >>> s.ci_low <= s.median <= s.ci_high
    True
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import platform
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch

from ..ops.cpu_fold import compiled_folds, fold_threads

__all__ = [
    "Summary",
    "append_csv",
    "copy_bandwidth",
    "cpu_model",
    "cpu_time_ms",
    "environment",
    "git_info",
    "gpu_time_ms",
    "markdown_table",
    "median_ms",
    "median_ms_group",
    "paired_t",
    "ratio_ci",
    "round_orders",
    "results_csv",
    "results_dir",
    "summarize",
    "t_interval",
    "time_interleaved",
    "write_csv",
]

T = TypeVar("T")

# The repository root when the package runs from a source checkout (editable install or
# PYTHONPATH); an installed wheel has no benchmarks/ beside it.
_CHECKOUT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- environment
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


def git_info(path: str | Path | None = None) -> tuple[str, bool | None]:
    """``(short SHA of HEAD, tracked files differ from it)`` of the checkout holding ``path``
    (default: this package's checkout); ``("unknown", None)`` outside git.

    ``RNB_GIT_SHA`` overrides it, as ``(that value, None)``: a copy of the tree shipped to
    another machine (a GPU box) may carry an older ``.git`` that would name the wrong commit.
    """
    if os.environ.get("RNB_GIT_SHA"):
        return os.environ["RNB_GIT_SHA"], None
    cwd = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
        if sha.returncode != 0:
            return "unknown", None
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return sha.stdout.strip(), bool(dirty.stdout.strip())


def environment(device: str | torch.device = "cpu") -> dict[str, Any]:
    """The columns that make a result row comparable across machines and commits."""
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    try:  # CPU rows from a shared machine are only as good as its idleness
        load = round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        load = ""
    sha, dirty = git_info()
    return {
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "hardware": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda or "",
        "python": platform.python_version(),
        "git_sha": sha,
        "git_dirty": "" if dirty is None else dirty,
        "load_avg_1min": load,
        # glibc's allocator settings change CPU step times (on the 2-core VM, the untracked
        # CPU preset step went from ~210 to ~175 ms when large temporaries stopped being
        # mmapped and page-faulted in on every step), so a row says which it ran under.
        "malloc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        # The torch backend's folds on CPU tensors: compiled (rnb_kernels._cpu, on how many
        # threads) or index_add_.
        "cpu_folds": f"compiled, threads={fold_threads()}" if compiled_folds() else "index_add_",
    }


# ----------------------------------------------------------------------------- output
def results_dir(out: str | Path | None = None) -> Path:
    """Where results go: ``out``, else ``$RNB_RESULTS_DIR``, else the source checkout's
    ``benchmarks/results``, else ``./benchmark_results`` (not created here)."""
    if out is not None:
        return Path(out)
    env = os.environ.get("RNB_RESULTS_DIR")
    if env:
        return Path(env)
    checkout = _CHECKOUT / "benchmarks" / "results"
    if checkout.is_dir():
        return checkout
    return Path.cwd() / "benchmark_results"


def results_csv(prefix: str, device: str | torch.device, out: str | Path | None = None) -> Path:
    """``<results_dir(out)>/<prefix>_<gpu|cpu>.csv``."""
    kind = "gpu" if torch.device(device).type == "cuda" else "cpu"
    return results_dir(out) / f"{prefix}_{kind}.csv"


def append_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> Path:
    """Append rows to a CSV, writing the header when the file is new.

    Columns are the union of the existing header and the new keys: a new column rewrites the
    file once with the wider header (old rows get empty cells) instead of misaligning rows.
    """
    rows = list(rows)
    path = Path(path)
    old: list[dict[str, str]] = []
    header: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            old = list(reader)
    added = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in header]
    if added or not old:
        return write_csv(path, [*old, *rows], [*header, *added])
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, restval="").writerows(rows)
    return path


def write_csv(
    path: str | Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
) -> Path:
    """Write ``rows`` to a new CSV (columns: ``columns``, else every key in first-seen order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), restval="")
        w.writeheader()
        w.writerows(rows)
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """GitHub markdown table of ``rows`` (floats as ``%.4g``; missing cells empty)."""

    def cell(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- timing
def gpu_time_ms(
    fn: Callable[[], object], *, warmup_ms: float = 25.0, rep_ms: float = 100.0
) -> float:
    """Median ms of ``fn()`` on a CUDA device with ``triton.testing.do_bench``."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def cpu_time_ms(
    fn: Callable[[], object],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 3,
    max_reps: int = 1000,
) -> float:
    """Median ms of ``fn()`` on the CPU: run for about ``warmup_ms``, then timed one call at
    a time for about ``rep_ms`` (at least ``min_reps`` calls). The median discards stragglers
    caused by other processes."""
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
    return float(np.median(times) * 1e3)


def median_ms(
    fn: Callable[[], object],
    device: str | torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
) -> float:
    """Median ms of ``fn()``: :func:`gpu_time_ms` on CUDA, :func:`cpu_time_ms` otherwise."""
    if torch.device(device).type == "cuda":
        return gpu_time_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return cpu_time_ms(fn, warmup_ms=warmup_ms, rep_ms=rep_ms)


def round_orders(names: Sequence[T], rounds: int, seed: int = 0) -> Iterator[list[T]]:
    """The order of ``names`` in each of ``rounds`` rounds: a fresh random permutation every
    round, seeded (the same ``seed`` gives the same orders).

    Shuffling each round keeps any cost of a position in the round (running first) *and* of a
    predecessor (running right after a variant that leaves the caches or the allocator in some
    state) from landing on one variant every time; a fixed rotation (A B C, B C A, ...)
    balances positions but puts C before A in two rounds of three.

    Example:
        >>> orders = list(round_orders("abc", 4))
        >>> len(orders), all(sorted(o) == list("abc") for o in orders)
        (4, True)
    """
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        yield [names[i] for i in rng.permutation(len(names))]


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    sync: Callable[[], None] | None = None,
    seed: int = 0,
    progress: str | None = None,
) -> dict[str, list[float]]:
    """Time whole steps of several variants in rounds: every variant once per round, in the
    order :func:`round_orders` gives (shuffled every round).

    Every variant runs ``warmup`` untimed rounds, then ``repeats`` timed ones; sample ``i`` of
    every variant comes from round ``i``, so samples are paired by round (see
    :func:`ratio_ci`).

    Args:
        fns: ``{name: fn}``; each ``fn()`` is one unit of work (a step, a round of steps).
        repeats: timed rounds (``>= 1``).
        warmup: untimed rounds first.
        sync: called before each clock read (e.g. ``torch.cuda.synchronize``) so the time of
            asynchronous work lands in its own variant.
        seed: seed of the orders.
        progress: a description: show a progress bar over the rounds (tqdm, on stderr).

    Returns:
        ``{name: [seconds] * repeats}``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1; got {repeats}")
    if not fns:
        raise ValueError("fns is empty")
    from tqdm.auto import tqdm

    sync = sync or (lambda: None)
    orders = round_orders(list(fns), warmup + repeats, seed)
    times: dict[str, list[float]] = {name: [] for name in fns}
    with tqdm(total=warmup + repeats, desc=progress, disable=progress is None) as bar:
        for _ in range(warmup):
            for name in next(orders):
                fns[name]()
            bar.update()
        sync()
        for order in orders:
            for name in order:
                t0 = time.perf_counter()
                fns[name]()
                sync()
                times[name].append(time.perf_counter() - t0)
            bar.update()
    return times


def median_ms_group(
    fns: Mapping[str, Callable[[], object]],
    device: str | torch.device,
    *,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 1000,
) -> dict[str, float]:
    """Median ms of each of several callables that are compared with one another.

    CUDA: :func:`gpu_time_ms` one after the other (the GPU is not shared). CPU:
    :func:`time_interleaved`, with as many rounds as fit ``rep_ms`` per callable (at least
    ``min_reps``), so the ratios between them stay meaningful on a loaded machine.
    """
    if torch.device(device).type == "cuda":
        return {name: gpu_time_ms(fn, rep_ms=rep_ms) for name, fn in fns.items()}
    t0 = time.perf_counter()
    for fn in fns.values():  # one untimed round: warm-up and the size of a round
        fn()
    per_round = max(time.perf_counter() - t0, 1e-9)
    repeats = int(min(max_reps, max(min_reps, rep_ms * len(fns) / 1e3 / per_round)))
    samples = time_interleaved(fns, repeats, warmup=0)
    return {name: float(np.median(t) * 1e3) for name, t in samples.items()}


def copy_bandwidth(device: str | torch.device, nbytes: int = 1 << 30) -> float:
    """Measured device-memory copy bandwidth in bytes/s (read + write counted): what a plain
    ``copy_`` achieves on this machine, the yardstick of the bandwidth-bound targets."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / (ms / 1e3)


# ----------------------------------------------------------------------------- statistics
@dataclass(frozen=True)
class Summary:
    """Robust summary of timing samples (same unit as the samples).

    Attributes:
        median: the sample median.
        q25, q75: the interquartile range.
        ci_low, ci_high: bootstrap confidence interval of the median.
        n: number of samples.
    """

    median: float
    q25: float
    q75: float
    ci_low: float
    ci_high: float
    n: int


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def summarize(
    samples: Sequence[float], confidence: float = 0.95, n_boot: int = 2000, seed: int = 0
) -> Summary:
    """Median, IQR and a percentile-bootstrap CI of the median of ``samples`` (``float[n]``)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"samples must be a non-empty 1-D sequence; got shape {x.shape}")
    meds = np.median(x[_boot_indices(x.size, n_boot, seed)], axis=1)
    alpha = (1.0 - confidence) / 2
    q25, q75 = np.percentile(x, [25, 75])
    lo, hi = np.quantile(meds, [alpha, 1 - alpha])
    return Summary(float(np.median(x)), float(q25), float(q75), float(lo), float(hi), int(x.size))


def ratio_ci(
    a: Sequence[float],
    b: Sequence[float],
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Median over rounds of ``a[i] / b[i]`` and a percentile-bootstrap CI of that median
    (rounds resampled), for samples paired by round as :func:`time_interleaved` takes them.

    Each round's ratio compares two variants timed seconds apart, so a slow stretch of the
    machine that lengthens both cancels in it; a ratio of the two medians would keep it. On the
    2-core CPU, two untracked copies of one model timed against each other (an A/A test,
    60 rounds of 10 steps, twice) read 1.000 [0.988, 1.011] and 1.003 [0.986, 1.015] this way,
    and 0.983 [0.972, 1.001] and 1.001 [0.980, 1.024] as a ratio of medians.

    Returns:
        ``(ratio, ci_low, ci_high)``.

    Example:
        >>> drift = [1.0, 1.5, 1.0, 1.5]  # the machine slows down every other round
        >>> ratio_ci([1.02 * d for d in drift], drift)[0]
        1.02
    """
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"a and b must be paired 1-D samples; got {x.shape} and {y.shape}")
    if not (y > 0).all():
        raise ValueError("b must be positive (times)")
    r = x / y
    meds = np.median(r[_boot_indices(r.size, n_boot, seed)], axis=1)
    alpha = (1.0 - confidence) / 2
    lo, hi = np.quantile(meds, [alpha, 1 - alpha])
    return float(np.median(r)), float(lo), float(hi)


# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (no scipy needed).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)  # fmt: skip


def _t_quantile(df: int, confidence: float) -> float:
    if confidence == 0.95:
        return _T975[df - 1] if df <= len(_T975) else 1.96
    try:
        from scipy import stats
    except ImportError as exc:  # pragma: no cover - scipy comes with the regroup extra
        raise ValueError(f"confidence {confidence} needs scipy (0.95 does not)") from exc
    return float(stats.t.ppf(0.5 + confidence / 2, df))


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its Student-t confidence interval.

    For a handful of per-seed results (``n >= 2``): ``mean ± t_{n-1} · sd / sqrt(n)``.
    With one value the interval is ``(nan, nan)``.

    Returns:
        ``(mean, ci_low, ci_high)``.

    Example:
        >>> m, lo, hi = t_interval([1.0, 2.0, 3.0])
        >>> m, round(lo, 3), round(hi, 3)
        (2.0, -0.484, 4.484)
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence; got shape {x.shape}")
    mean = float(x.mean())
    if x.size < 2:
        return mean, float("nan"), float("nan")
    half = _t_quantile(x.size - 1, confidence) * float(x.std(ddof=1)) / float(np.sqrt(x.size))
    return mean, float(mean - half), float(mean + half)


def paired_t(
    a: Sequence[float], b: Sequence[float], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of the paired differences ``a[i] - b[i]`` (e.g. one method's and the baseline's
    eval loss under seed ``i``) and its Student-t confidence interval."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"a and b must be paired 1-D samples; got {x.shape} and {y.shape}")
    return t_interval(x - y, confidence)
