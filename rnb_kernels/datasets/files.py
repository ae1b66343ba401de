"""User corpora: plain text (one example per line), CSV / TSV, jsonl, parquet and Hugging Face
``datasets``, plus :func:`load_corpus`."""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .._deps import require
from .corpus import Corpus, CorpusNotFoundError

__all__ = [
    "load_text",
    "load_csv",
    "load_jsonl",
    "iter_jsonl",
    "load_parquet",
    "load_hf",
    "load_corpus",
    "NAMED_CORPORA",
    "TEXT_SUFFIXES",
    "CSV_SUFFIXES",
]

NAMED_CORPORA = ("fortunes", "natural-instructions")
_NI_ALIASES = {"natural-instructions", "natural_instructions", "ni", "ni-v1"}


def _encode_domains(values: list[Any], field: str, source: str) -> tuple[np.ndarray, list[str]]:
    for i, v in enumerate(values):
        if v is None:
            raise ValueError(f"{source}: row {i} has no value for domain field {field!r}")
    names = sorted({str(v) for v in values})
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[str(v)] for v in values], dtype=np.int64), names


TEXT_SUFFIXES = (".txt", ".txt.gz", ".text")
CSV_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz")
_SUPPORTED = ".txt (one example per line), .csv / .tsv, .jsonl / .jsonl.gz or .parquet"


def _check_text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return value


def _open_text(path: Path, newline: str | None = None) -> io.TextIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", newline=newline)  # type: ignore[return-value]
    return open(path, encoding="utf-8", newline=newline)


def load_text(path: str | os.PathLike[str], *, limit: int | None = None) -> Corpus:
    """Load a plain-text file (optionally ``.gz``): one example per line, blank lines skipped.

    Plain text carries no domain field; every text is unlabelled.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is not UTF-8 (the message gives ``file:line``) or holds no
            non-blank line.

    Example:
        >>> c = load_text("corpus.txt")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such text file: {p}")
    texts: list[str] = []
    lineno = 0
    try:
        with _open_text(p) as f:
            for lineno, line in enumerate(f, start=1):  # noqa: B007 - reported on error
                if limit is not None and len(texts) >= limit:
                    break
                line = line.rstrip("\r\n")
                if line.strip():
                    texts.append(line)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}:{lineno + 1}: not UTF-8 text ({exc.reason})") from exc
    if not texts:
        raise ValueError(f"empty corpus: {p} has no non-blank lines")
    return Corpus(texts, None, None, name=p.name, meta={"path": str(p)})


def load_csv(
    path: str | os.PathLike[str],
    text_field: str = "text",
    domain_field: str | None = None,
    *,
    limit: int | None = None,
) -> Corpus:
    """Load a CSV (``.csv``) or tab-separated (``.tsv``) file with a header row, optionally
    ``.gz``; the text and the optional domain are columns named in the header.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the header lacks ``text_field`` / ``domain_field`` (the message lists the
            columns present), a row is missing a cell (``file:line``), the file is not UTF-8,
            or it has no data row.

    Example:
        >>> c = load_csv("data.csv", text_field="review", domain_field="product")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such CSV file: {p}")
    delimiter = "\t" if ".tsv" in p.suffixes else ","
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one cell
    texts: list[str] = []
    domains: list[Any] = []
    try:
        with _open_text(p, newline="") as f:
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            if not header:
                raise ValueError(f"empty corpus: {p} has no header row")
            for fld in (text_field, domain_field):
                if fld is not None and fld not in header:
                    raise ValueError(
                        f"{p}: missing column {fld!r} (columns present: {list(header)}); "
                        "name the text column with --text-column"
                    )
            for row in reader:
                if limit is not None and len(texts) >= limit:
                    break
                where = f"{p}:{reader.line_num}"
                text = row.get(text_field)
                if text is None:
                    raise ValueError(f"{where}: row has no cell for column {text_field!r}")
                texts.append(text)
                if domain_field is not None:
                    if row.get(domain_field) in (None, ""):
                        raise ValueError(f"{where}: no value for domain column {domain_field!r}")
                    domains.append(row[domain_field])
    except UnicodeDecodeError as exc:
        raise ValueError(f"{p}: not UTF-8 text ({exc.reason})") from exc
    except csv.Error as exc:
        raise ValueError(f"{p}: malformed CSV ({exc})") from exc
    if not texts:
        raise ValueError(f"empty corpus: {p} has no rows")
    labels, names = (None, None)
    if domain_field is not None:
        labels, names = _encode_domains(domains, domain_field, str(p))
    return Corpus(texts, labels, names, name=p.name, meta={"path": str(p)})


def iter_jsonl(
    path: str | os.PathLike[str], text_field: str = "text", *, limit: int | None = None
) -> Iterator[str]:
    """Yield the ``text_field`` of each line of a jsonl file, lazily (for streaming).

    Raises the same errors as :func:`load_jsonl`, at the offending line.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such jsonl file: {p}")
    with _open_text(p) as f:
        count = 0
        for lineno, line in enumerate(f, start=1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            row = _parse_line(line, p, lineno)
            if text_field not in row:
                raise ValueError(
                    f"{p}:{lineno}: missing text field {text_field!r} "
                    f"(fields present: {sorted(row)})"
                )
            yield _check_text(row[text_field], text_field, f"{p}:{lineno}")
            count += 1


def _parse_line(line: str, p: Path, lineno: int) -> dict:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{p}:{lineno}: invalid JSON ({exc.msg})") from exc
    if not isinstance(row, dict):
        raise ValueError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
    return row


def load_jsonl(
    path: str | os.PathLike[str],
    text_field: str = "text",
    domain_field: str | None = None,
    *,
    limit: int | None = None,
) -> Corpus:
    """Load a JSON-lines file (optionally ``.gz``): one object per line.

    Args:
        text_field: key holding the text (required on every line).
        domain_field: optional key holding the original domain (any JSON scalar).
        limit: read at most this many rows.

    Raises:
        ValueError: a line lacks ``text_field`` / ``domain_field`` or is not a JSON
            object; the message gives ``file:line`` and the fields present.
        TypeError: a text is not a string.

    Example:
        >>> c = load_jsonl("data.jsonl", text_field="text", domain_field="source")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such jsonl file: {p}")
    texts: list[str] = []
    domains: list[Any] = []
    with _open_text(p) as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(texts) >= limit:
                break
            if not line.strip():
                continue
            row = _parse_line(line, p, lineno)
            for fld in (text_field, domain_field):
                if fld is not None and fld not in row:
                    raise ValueError(
                        f"{p}:{lineno}: missing field {fld!r} (fields present: {sorted(row)})"
                    )
            texts.append(_check_text(row[text_field], text_field, f"{p}:{lineno}"))
            if domain_field is not None:
                domains.append(row[domain_field])
    if not texts:
        raise ValueError(f"empty corpus: {p} has no rows")
    labels, names = (None, None)
    if domain_field is not None:
        labels, names = _encode_domains(domains, domain_field, str(p))
    return Corpus(texts, labels, names, name=p.name, meta={"path": str(p)})


def _from_columns(
    columns: dict[str, list[Any]], text_field: str, domain_field: str | None, source: str
) -> tuple[list[str], np.ndarray | None, list[str] | None]:
    for fld in (text_field, domain_field):
        if fld is not None and fld not in columns:
            raise ValueError(
                f"{source}: missing field {fld!r} (columns present: {sorted(columns)})"
            )
    texts = columns[text_field]
    for i, t in enumerate(texts):
        _check_text(t, text_field, f"{source} row {i}")
    if not texts:
        raise ValueError(f"empty corpus: {source} has no rows")
    if domain_field is None:
        return list(texts), None, None
    labels, names = _encode_domains(list(columns[domain_field]), domain_field, source)
    return list(texts), labels, names


def load_parquet(
    path: str | os.PathLike[str],
    text_field: str = "text",
    domain_field: str | None = None,
    *,
    limit: int | None = None,
) -> Corpus:
    """Load a parquet file (needs ``pyarrow``); same contract as :func:`load_jsonl`."""
    pq = require("pyarrow.parquet", what="reading parquet files", extra="hf")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"no such parquet file: {p}")
    schema_names = pq.read_schema(p).names
    cols = [c for c in (text_field, domain_field) if c is not None]
    for c in cols:
        if c not in schema_names:
            raise ValueError(f"{p}: missing field {c!r} (columns present: {sorted(schema_names)})")
    table = pq.read_table(p, columns=cols)
    if limit is not None:
        table = table.slice(0, limit)
    texts, labels, names = _from_columns(table.to_pydict(), text_field, domain_field, str(p))
    return Corpus(texts, labels, names, name=p.name, meta={"path": str(p)})


def load_hf(
    dataset: Any,
    text_field: str = "text",
    domain_field: str | None = None,
    *,
    split: str | None = None,
    limit: int | None = None,
) -> Corpus:
    """Load a Hugging Face ``datasets`` object, or a directory saved with ``save_to_disk``.

    Nothing is downloaded: pass an already-loaded ``Dataset`` / ``DatasetDict`` (with
    ``split``) or a local path.
    """
    if isinstance(dataset, (str, os.PathLike)):
        hf = require("datasets", what="loading Hugging Face datasets", extra="hf")
        dataset = hf.load_from_disk(str(dataset))
    if isinstance(getattr(dataset, "num_rows", None), dict):  # a DatasetDict of splits
        if split is None:
            raise ValueError(
                f"dataset has splits {sorted(dataset.keys())}; pass split= to choose one"
            )
        dataset = dataset[split]
    if not hasattr(dataset, "column_names"):
        raise TypeError(f"expected a datasets.Dataset or a path; got {type(dataset).__name__}")
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    cols = [c for c in (text_field, domain_field) if c is not None]
    for c in cols:
        if c not in dataset.column_names:
            raise ValueError(
                f"dataset: missing field {c!r} (columns present: {sorted(dataset.column_names)})"
            )
    data = {c: dataset[c] for c in cols}
    texts, labels, names = _from_columns(data, text_field, domain_field, "dataset")
    return Corpus(texts, labels, names, name="hf-dataset")


def load_corpus(
    source: str | os.PathLike[str] | Any,
    text_field: str = "text",
    domain_field: str | None = None,
    *,
    limit: int | None = None,
    **kwargs: Any,
) -> Corpus:
    """Load a named corpus or a file, dispatching on the name / suffix.

    Args:
        source: ``"fortunes"``, ``"natural-instructions"`` (aliases ``"ni"``,
            ``"natural_instructions"``), a ``.txt`` file (one example per line), a
            ``.csv``/``.tsv`` file, a ``.jsonl``/``.jsonl.gz``/``.ndjson`` file, a
            ``.parquet`` file, a ``save_to_disk`` directory, or a ``datasets.Dataset``.
        text_field / domain_field: the field (jsonl, parquet, HF) or column (CSV) holding
            the text / the original domain; see :func:`load_jsonl` (ignored for named
            corpora, which carry their own domains, and for plain text, which has none).
        limit: at most this many texts (a seeded uniform sample for named corpora).
        **kwargs: passed to the specific loader (e.g. ``split=`` for HF, ``text=`` for NI).

    Example:
        >>> c = load_corpus("fortunes")                                # doctest: +SKIP
        >>> c = load_corpus("train.jsonl", text_field="text")         # doctest: +SKIP
    """
    if isinstance(source, str) and source.lower() == "fortunes":
        from .fortunes import load_fortunes

        c = load_fortunes(**kwargs)
        return c.sample(limit) if limit is not None else c
    if isinstance(source, str) and source.lower() in _NI_ALIASES:
        from .natural_instructions import load_natural_instructions

        c = load_natural_instructions(**kwargs)
        return c.sample(limit) if limit is not None else c
    if not isinstance(source, (str, os.PathLike)):
        return load_hf(source, text_field, domain_field, limit=limit, **kwargs)
    p = Path(source)
    if p.is_dir():
        return load_hf(p, text_field, domain_field, limit=limit, **kwargs)
    if not p.exists():
        raise CorpusNotFoundError(
            f"{str(source)!r} is neither a file nor a named corpus ({', '.join(NAMED_CORPORA)})"
        )
    name = p.name.lower()
    if name.endswith(TEXT_SUFFIXES):
        if domain_field is not None:
            raise ValueError(
                f"{p} is plain text (one example per line) and has no domain column; "
                "use a CSV or jsonl file for domains"
            )
        return load_text(p, limit=limit)
    if name.endswith(CSV_SUFFIXES):
        return load_csv(p, text_field, domain_field, limit=limit)
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        return load_jsonl(p, text_field, domain_field, limit=limit)
    if name.endswith(".parquet"):
        return load_parquet(p, text_field, domain_field, limit=limit)
    raise ValueError(f"unsupported file type for {p}: use {_SUPPORTED}")
