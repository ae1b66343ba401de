"""Debian ``fortunes``: one domain per category file.

Install with ``apt-get install fortunes fortunes-min`` (files under
``/usr/share/games/fortunes``). With both packages that is 43 categories and 15,217
texts. Each category file holds texts separated by lines containing only ``%``; the
``.dat`` files are strfile indexes and the ``.u8`` entries are symlinks to the same
texts, so both are skipped (counting them would duplicate every fortune).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .corpus import Corpus, CorpusNotFoundError

__all__ = ["load_fortunes", "fortunes_dir", "DEFAULT_FORTUNES_DIR"]

DEFAULT_FORTUNES_DIR = "/usr/share/games/fortunes"
_SEPARATOR = re.compile(r"^%[ \t\r]*$", flags=re.MULTILINE)
_HOW_TO = "install it with: sudo apt-get install fortunes fortunes-min"


def fortunes_dir() -> Path:
    """``$RNB_FORTUNES_DIR`` if set, else ``/usr/share/games/fortunes``."""
    return Path(os.environ.get("RNB_FORTUNES_DIR", DEFAULT_FORTUNES_DIR))


def _category_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.iterdir()):
        if p.is_symlink() or not p.is_file() or p.suffix in (".dat", ".u8"):
            continue
        if p.name.startswith("."):
            continue
        out.append(p)
    return out


def load_fortunes(
    path: str | os.PathLike[str] | None = None,
    *,
    categories: Sequence[str] | None = None,
    min_chars: int = 1,
) -> Corpus:
    """Load the Debian fortunes; domain = category (the file name).

    Args:
        path: directory of fortune files (default :func:`fortunes_dir`).
        categories: keep only these categories (names as in the directory).
        min_chars: drop texts shorter than this after stripping whitespace.

    Returns:
        :class:`~rnb_kernels.datasets.Corpus`; ``labels int64[n]`` index
        ``label_names`` (sorted category names).

    Raises:
        CorpusNotFoundError: the directory is missing or holds no fortune files.

    Example:
        >>> c = load_fortunes()                 # doctest: +SKIP
        >>> len(c), c.num_domains               # doctest: +SKIP
        (15217, 43)
    """
    root = Path(path) if path is not None else fortunes_dir()
    if not root.is_dir():
        raise CorpusNotFoundError(f"fortunes corpus not found at {root}; {_HOW_TO}")
    files = _category_files(root)
    if categories is not None:
        wanted = set(categories)
        missing = wanted - {p.name for p in files}
        if missing:
            raise ValueError(f"unknown fortune categories {sorted(missing)} in {root}")
        files = [p for p in files if p.name in wanted]
    texts: list[str] = []
    labels: list[int] = []
    names: list[str] = []
    for p in files:
        # Most files are UTF-8; replacement keeps the odd legacy byte from aborting a load.
        raw = p.read_bytes().decode("utf-8", errors="replace")
        # Strip only newlines so ASCII art keeps its leading indentation.
        items = [t.strip("\r\n") for t in _SEPARATOR.split(raw)]
        items = [t for t in items if len(t.strip()) >= min_chars]
        if not items:
            continue
        names.append(p.name)
        texts.extend(items)
        labels.extend([len(names) - 1] * len(items))
    if not texts:
        raise CorpusNotFoundError(f"no fortune files found in {root}; {_HOW_TO}")
    return Corpus(
        texts=texts,
        labels=np.asarray(labels, dtype=np.int64),
        label_names=names,
        name="fortunes",
        meta={"path": str(root), "files": len(names)},
    )
