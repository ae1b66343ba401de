"""Natural Instructions v1, read straight from the BIG-bench 1.0.0 source archive.

BIG-bench ships NI v1 as the ``natural_instructions`` task: 61 subtasks
(``bigbench-1.0.0/bigbench/benchmark_tasks/natural_instructions/subtaskNNN_*/task.json``)
with 193,250 examples in total. The subtask is the domain. The archive is the sdist that
``pip download --no-deps bigbench==1.0.0`` fetches (358 MB); we read the 61 JSON members
from it with :mod:`tarfile` without unpacking or installing anything.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .._cache import default_cache_dir
from .corpus import Corpus, CorpusNotFoundError

logger = logging.getLogger(__name__)

__all__ = ["load_natural_instructions", "bigbench_tarball", "TEXT_MODES"]

BIGBENCH_VERSION = "1.0.0"
TARBALL_NAME = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
_NI_PREFIX = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/natural_instructions/"
TEXT_MODES = ("input", "instruction_input", "input_target")


def _cache_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _how_to(cache: Path) -> str:
    return (
        f"fetch it with: {sys.executable} -m pip download --no-deps "
        f"bigbench=={BIGBENCH_VERSION} -d {cache}  (or set RNB_CACHE to a directory that "
        f"holds {TARBALL_NAME})"
    )


def bigbench_tarball(
    cache_dir: str | os.PathLike[str] | None = None, *, download: bool = True
) -> Path:
    """Path of ``bigbench-1.0.0.tar.gz`` in the cache, downloading it with pip if missing.

    Args:
        cache_dir: where to look / download (default ``$RNB_CACHE`` or
            ``~/.cache/rnb_kernels``).
        download: run ``pip download`` when the archive is missing.

    Raises:
        CorpusNotFoundError: missing and not downloadable; the message gives the command.
    """
    cache = _cache_root(cache_dir)
    path = cache / TARBALL_NAME
    if path.is_file():
        return path
    if not download:
        raise CorpusNotFoundError(f"{TARBALL_NAME} not found in {cache}; {_how_to(cache)}")
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps",
        f"bigbench=={BIGBENCH_VERSION}", "-d", str(cache),
    ]  # fmt: skip
    logger.info("downloading %s (358 MB) into %s", TARBALL_NAME, cache)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise CorpusNotFoundError(f"could not run pip ({exc}); {_how_to(cache)}") from exc
    if proc.returncode != 0 or not path.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
        raise CorpusNotFoundError(
            f"downloading {TARBALL_NAME} failed (pip exit code {proc.returncode}: "
            f"{' | '.join(tail)}); {_how_to(cache)}"
        )
    return path


def _example_text(ex: dict, prefix: str, mode: str) -> str:
    inp = ex.get("input", "")
    if mode == "input":
        return inp
    if mode == "instruction_input":
        return f"{prefix}\n\n{inp}" if prefix else inp
    target = ex.get("target", "")
    if isinstance(target, list):
        target = target[0] if target else ""
    return f"{inp}\n{target}" if target else inp


def load_natural_instructions(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    text: str = "input",
    subtasks: Sequence[str] | None = None,
    max_per_task: int | None = None,
    seed: int = 0,
    download: bool = True,
) -> Corpus:
    """Load NI v1 (61 subtasks, 193,250 examples) from the BIG-bench archive.

    Args:
        cache_dir: where ``bigbench-1.0.0.tar.gz`` lives / is downloaded (see
            :func:`bigbench_tarball`).
        text: what each text holds: ``"input"`` (the example input, default),
            ``"instruction_input"`` (the task definition, then the input) or
            ``"input_target"`` (input, then the first reference answer).
        subtasks: keep only these subtask names (e.g. ``"subtask001_quoref_question_generation"``).
        max_per_task: keep at most this many examples per subtask (a seeded random subset,
            in original order), for quick experiments.
        download: fetch the archive with pip when it is missing.

    Returns:
        :class:`~rnb_kernels.datasets.Corpus` with domain = subtask; label names sorted.

    Example:
        >>> ni = load_natural_instructions(max_per_task=100)   # doctest: +SKIP
        >>> ni.num_domains                                      # doctest: +SKIP
        61
    """
    if text not in TEXT_MODES:
        raise ValueError(f"text must be one of {TEXT_MODES}; got {text!r}")
    if max_per_task is not None and max_per_task < 1:
        raise ValueError(f"max_per_task must be >= 1; got {max_per_task}")
    path = bigbench_tarball(cache_dir, download=download)
    wanted = set(subtasks) if subtasks is not None else None
    rng = np.random.default_rng(seed)
    per_task: dict[str, list[str]] = {}
    try:
        # Streaming mode ("r|gz") reads the 358 MB archive once, front to back.
        with tarfile.open(path, mode="r|gz") as tar:
            for member in tar:
                name = member.name
                if not (name.startswith(_NI_PREFIX) and name.endswith("/task.json")):
                    continue
                sub = name[len(_NI_PREFIX) :].split("/")[0]
                if not sub.startswith("subtask") or (wanted is not None and sub not in wanted):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                task = json.load(f)
                prefix = task.get("task_prefix") or task.get("description") or ""
                exs = task.get("examples", [])
                if max_per_task is not None and len(exs) > max_per_task:
                    keep = np.sort(rng.choice(len(exs), size=max_per_task, replace=False))
                    exs = [exs[i] for i in keep]
                # An example with a blank input is degenerate in every text mode; dropping
                # it by input (not by final text) keeps the modes aligned row for row.
                exs = [e for e in exs if str(e.get("input", "")).strip()]
                per_task[sub] = [_example_text(e, prefix, text) for e in exs]
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorpusNotFoundError(
            f"{path} is not a readable BIG-bench archive ({exc}); delete it and "
            f"{_how_to(path.parent)}"
        ) from exc
    if wanted is not None and wanted - set(per_task):
        raise ValueError(f"unknown NI subtasks: {sorted(wanted - set(per_task))}")
    if not per_task:
        raise CorpusNotFoundError(f"no natural_instructions subtasks found inside {path}")
    names = sorted(per_task)
    texts: list[str] = []
    labels: list[int] = []
    for i, sub in enumerate(names):
        texts.extend(per_task[sub])
        labels.extend([i] * len(per_task[sub]))
    return Corpus(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=names,
        name="natural-instructions",
        meta={"path": str(path), "text": text, "subtasks": len(names)},
    )
