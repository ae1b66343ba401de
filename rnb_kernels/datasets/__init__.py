"""Loaders for real corpora with their original domain labels.

* :func:`load_fortunes`: Debian ``fortunes`` (category = domain).
* :func:`load_natural_instructions`: Natural Instructions v1 from the BIG-bench archive
  (subtask = domain).
* :func:`load_text` (one example per line), :func:`load_csv`, :func:`load_jsonl`,
  :func:`load_parquet`, :func:`load_hf`: your own data, with a text field / column and an
  optional domain field; :func:`load_corpus` dispatches by name / suffix.
* :func:`train_eval_split`: deterministic (stratified) train/eval indices.

Every loader returns a :class:`Corpus` (``texts``, ``labels``, ``label_names``).
"""

from .corpus import Corpus, CorpusNotFoundError
from .files import (
    NAMED_CORPORA,
    iter_jsonl,
    load_corpus,
    load_csv,
    load_hf,
    load_jsonl,
    load_parquet,
    load_text,
)
from .fortunes import load_fortunes
from .natural_instructions import bigbench_tarball, load_natural_instructions
from .split import train_eval_split, train_val_test_split

__all__ = [
    "Corpus",
    "CorpusNotFoundError",
    "NAMED_CORPORA",
    "load_corpus",
    "load_text",
    "load_csv",
    "load_jsonl",
    "iter_jsonl",
    "load_parquet",
    "load_hf",
    "load_fortunes",
    "load_natural_instructions",
    "bigbench_tarball",
    "train_eval_split",
    "train_val_test_split",
]
