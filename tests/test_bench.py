"""`rnb bench overhead` at a tiny size, and the benchmark harness (CSV, results location,
interleaved timing, statistics)."""

from __future__ import annotations

import csv
import math

import pytest


def test_overhead_tiny_reports_ratios(tmp_path, capsys):
    from rnb_kernels.cli import main

    out = tmp_path / "overhead.csv"
    rc = main(["bench", "overhead", "--preset", "tiny", "--csv", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "ratio" in printed and "untracked" in printed
    assert "A/A: a second untracked copy reads" in printed
    with open(out) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    expected = {
        "untracked", "untracked-copy", "auto/torch", "exact/torch", "projected/torch",
        "sketch/torch", "projected-plain/torch", "anchor/extra-backward", "anchor/torch.func",
    }  # fmt: skip
    assert expected <= set(rows)
    assert float(rows["untracked"]["ratio"]) == pytest.approx(1.0)
    for name in expected:
        r = float(rows[name]["ratio"])
        assert math.isfinite(r) and r > 0, name
        lo, hi = float(rows[name]["ratio_ci_low"]), float(rows[name]["ratio_ci_high"])
        assert lo <= r <= hi, name
        assert float(rows[name]["ms_per_step"]) > 0, name
        assert float(rows[name]["overhead_pct"]) == pytest.approx(100 * (r - 1), abs=0.02), name
        assert float(rows[name]["ms_q25"]) <= float(rows[name]["ms_per_step"])
        assert float(rows[name]["ms_per_step"]) <= float(rows[name]["ms_q75"])
        assert rows[name]["hardware"] and rows[name]["torch"] and rows[name]["git_sha"]
        assert rows[name]["git_dirty"] in ("True", "False", "")


def test_projected_plain_variant_is_projected_without_exact_rows():
    import torch

    from rnb_kernels.experiments.bench.overhead import PRESETS, _tracked, _Variant
    from rnb_kernels.experiments.models import ModelConfig, build_model

    cfg = PRESETS["tiny"]
    base = build_model(ModelConfig(vocab_size=cfg.vocab_size, context=cfg.context,
                                   n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd))  # fmt: skip
    x = torch.zeros(cfg.batch_size, cfg.context, dtype=torch.long)
    ids = torch.zeros(cfg.batch_size, dtype=torch.long)
    amp = torch.autocast("cpu", enabled=False)
    plain = _tracked(_Variant(base, cfg, x, x, ids, amp), "projected-plain", "torch").tracker
    full = _tracked(_Variant(base, cfg, x, x, ids, amp), "projected", "torch").tracker
    assert (plain.mode, plain.exact_rows) == ("projected", 0)
    assert (full.mode, full.exact_rows) == ("projected", 64)
    plain.remove()
    full.remove()


def test_overhead_csv_appends_with_header_once(tmp_path):
    from rnb_kernels.experiments.harness import append_csv

    p = tmp_path / "x.csv"
    append_csv(p, [{"a": 1, "b": 2}])
    append_csv(p, [{"a": 3, "b": 4}])
    append_csv(p, [{"a": 5, "c": 6}])  # a new column widens the header, old rows kept
    with open(p) as f:
        rows = list(csv.DictReader(f))
    assert [r["a"] for r in rows] == ["1", "3", "5"]
    assert rows[0]["c"] == "" and rows[2]["c"] == "6"


@pytest.mark.hardware  # runs on machines without a GPU; strict mode accepts the skip elsewhere
def test_gpu_presets_refuse_cleanly_without_cuda(capsys):
    import torch

    from rnb_kernels.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "overhead", "--preset", "gpu", "--no-save"]) == 2
    assert main(["bench", "mixing", "--preset", "gpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out


def test_results_dir_order(tmp_path, monkeypatch):
    from rnb_kernels.experiments import harness

    monkeypatch.delenv("RNB_RESULTS_DIR", raising=False)
    assert harness.results_dir(tmp_path / "x") == tmp_path / "x"
    # From this source checkout: its benchmarks/results.
    assert harness.results_dir() == harness._CHECKOUT / "benchmarks" / "results"
    monkeypatch.setenv("RNB_RESULTS_DIR", str(tmp_path / "env"))
    assert harness.results_dir() == tmp_path / "env"
    monkeypatch.delenv("RNB_RESULTS_DIR")
    # An installed package has no checkout beside it: the working directory.
    monkeypatch.setattr(harness, "_CHECKOUT", tmp_path / "site-packages")
    monkeypatch.chdir(tmp_path)
    assert harness.results_dir() == tmp_path / "benchmark_results"
    assert harness.results_csv("kernels", "cpu").name == "kernels_cpu.csv"


def test_environment_columns(monkeypatch):
    import torch

    from rnb_kernels.experiments.harness import environment

    env = environment("cpu")
    assert list(env) == ["timestamp", "device", "hardware", "threads", "torch", "triton",
                         "cuda", "python", "git_sha", "git_dirty", "load_avg_1min",
                         "malloc_tunables", "cpu_folds"]  # fmt: skip
    assert env["device"] == "cpu" and env["hardware"] and env["threads"] >= 1
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=1")
    assert environment("cpu")["malloc_tunables"] == "glibc.malloc.mmap_threshold=1"
    from rnb_kernels.ops import cpu_fold

    monkeypatch.setattr(cpu_fold, "_extension", lambda: object())
    monkeypatch.setattr(cpu_fold, "_shares_torch_openmp", lambda: False)
    assert environment("cpu")["cpu_folds"] == "compiled, threads=1"
    monkeypatch.setattr(cpu_fold, "_shares_torch_openmp", lambda: True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert environment("cpu")["cpu_folds"] == "compiled, threads=3"
    monkeypatch.setattr(cpu_fold, "_extension", lambda: None)
    assert environment("cpu")["cpu_folds"] == "index_add_"


def test_overhead_ratio_is_the_median_of_per_round_ratios(monkeypatch):
    # The ratio column is what it claims: per round, the variant's time over untracked's in
    # that round; the median of those. Times are planted so that the ratio of the medians
    # (1.5 / 1.0) and the median of the ratios (1.02) differ.
    import dataclasses

    import numpy as np

    from rnb_kernels.experiments.bench import overhead

    drift = [1.0, 1.0, 1.0, 2.0, 2.0]
    planted = {"untracked": drift, "untracked-copy": [0.99 * d for d in drift],
               "auto/torch": [1.5, 1.02, 1.02, 2.04, 2.04]}  # fmt: skip

    def fake(fns, repeats, warmup=1, sync=None, seed=0, progress=None):
        assert set(fns) <= set(planted) and repeats == 5
        return {k: list(planted[k]) for k in fns}

    monkeypatch.setattr(overhead, "time_interleaved", fake)
    monkeypatch.setattr(overhead, "_usable_backends", lambda dev: (["torch"], {}))
    cfg = dataclasses.replace(overhead.PRESETS["tiny"], rounds=5, update_every=2)
    rows = {r["variant"]: r for r in overhead.run_overhead(cfg, modes=("auto",), anchors=False)}
    assert rows["auto/torch"]["ratio"] == pytest.approx(1.02)
    assert rows["auto/torch"]["overhead_pct"] == pytest.approx(2.0)
    assert rows["auto/torch"]["ratio_stat"] == "median of per-round ratios"
    assert rows["untracked-copy"]["ratio"] == pytest.approx(0.99)
    assert rows["untracked"]["ratio"] == 1.0
    assert rows["auto/torch"]["ms_per_step"] == pytest.approx(
        np.median(planted["auto/torch"]) / 2e-3
    )
    assert "untracked-copy" not in {
        r["variant"] for r in overhead.run_overhead(cfg, modes=("auto",), anchors=False,
                                                    control=False)
    }  # fmt: skip


def test_time_interleaved_shuffles_every_round():
    from rnb_kernels.experiments.harness import time_interleaved

    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = time_interleaved(fns, repeats=40, warmup=1)
    rounds = ["".join(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert len(rounds) == 41 and all(sorted(r) == list("abc") for r in rounds)
    assert {k: len(v) for k, v in times.items()} == {"a": 40, "b": 40, "c": 40}
    # Every variant runs in every position and after each of the others at least once.
    for name in "abc":
        assert {r.index(name) for r in rounds} == {0, 1, 2}
        before = {calls[i - 1] for i in range(1, len(calls)) if calls[i] == name}
        assert before >= set("abc") - {name}
    calls_again = []
    fns2 = {name: (lambda name=name: calls_again.append(name)) for name in "abc"}
    time_interleaved(fns2, repeats=40, warmup=1)
    assert calls_again == calls  # seeded
    time_interleaved(fns2, repeats=40, warmup=1, seed=1)
    assert calls_again[len(calls) :] != calls
    with pytest.raises(ValueError, match="repeats"):
        time_interleaved(fns, repeats=0)
    with pytest.raises(ValueError, match="empty"):
        time_interleaved({}, repeats=1)


def test_time_interleaved_progress_bar(capsys):
    from rnb_kernels.experiments.harness import time_interleaved

    times = time_interleaved({"a": lambda: None}, repeats=4, warmup=2, progress="rounds")
    assert len(times["a"]) == 4
    err = capsys.readouterr().err
    assert "rounds" in err and "6/6" in err


def test_ratio_ci_pairs_by_round():
    import numpy as np

    from rnb_kernels.experiments.harness import ratio_ci

    rng = np.random.default_rng(0)
    drift = rng.uniform(1.0, 2.0, 200)  # the machine's speed, shared by both variants of a round
    a = 1.03 * drift * rng.normal(1.0, 0.002, 200)
    ratio, lo, hi = ratio_ci(a, drift)
    assert ratio == pytest.approx(1.03, abs=1e-3)
    assert lo <= ratio <= hi and hi - lo < 0.002  # the drift cancels round by round
    assert ratio_ci([2.0, 1.0, 3.0], [1.0, 1.0, 1.0])[0] == 2.0
    with pytest.raises(ValueError, match="positive"):
        ratio_ci([1.0, 2.0], [1.0, 0.0])


def test_summarize_and_paired_ratio_ci():
    import numpy as np

    from rnb_kernels.experiments.harness import ratio_ci, summarize

    x = np.arange(1.0, 102.0)  # median 51, quartiles 26 and 76
    s = summarize(x)
    assert (s.median, s.q25, s.q75, s.n) == (51.0, 26.0, 76.0, 101)
    assert s.ci_low < 51.0 < s.ci_high and s.ci_high - s.ci_low < 30
    # b is a with a drifting load common to both: pairing by round keeps the ratio exact.
    drift = np.linspace(1.0, 3.0, 40)
    a, b = 1.5 * drift, drift
    ratio, lo, hi = ratio_ci(a, b)
    assert ratio == pytest.approx(1.5) and lo <= 1.5 <= hi
    assert summarize([2.0]) == summarize([2.0])  # deterministic (seeded bootstrap)
    with pytest.raises(ValueError, match="paired"):
        ratio_ci([1.0, 2.0], [1.0])


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports rnb_kernels like any user script: no sys.path edits
    return mod


def test_plot_reads_committed_and_new_kernel_rows(tmp_path):
    """benchmarks/plot.py draws the committed CSV (columns of the old harness) and rows with
    the harness's current columns."""
    pytest.importorskip("matplotlib")
    from pathlib import Path

    from rnb_kernels.experiments.harness import append_csv, environment

    plot = _script("plot")
    committed = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "kernels_cpu.csv"
    assert plot.main([str(committed), "--out", str(tmp_path / "old.png")]) == 0
    assert (tmp_path / "old.png").stat().st_size > 0
    row = {"op": "gram", "layer": "l", "tokens": "", "m": 4, "dtype": "fp32", "provider": "torch",
           "ratio_to_floor": 2.0, "target_ratio": 1.25}  # fmt: skip
    csv_path = append_csv(tmp_path / "kernels_cpu.csv", [{**environment("cpu"), **row}])
    assert plot.main(["--results", str(tmp_path)]) == 0
    assert csv_path.with_suffix(".png").stat().st_size > 0


def test_kernel_benchmark_times_projected_and_the_fold_ab():
    """bench_kernels times the projected op, and on the CPU the same ops with the folds forced
    through index_add_ (the compiled folds' A/B), against the same floor."""
    import torch

    from rnb_kernels.ops.cpu_fold import compiled_folds

    bench = _script("bench_kernels")
    args = bench.parse_args(["--quick", "--device", "cpu", "--ops", "projected", "sketch",
                             "--layers", "mini-mlp", "--tokens", "512", "--m", "4",
                             "--dtypes", "fp32", "--rep-ms", "2", "--no-save",
                             "--providers", "torch", "torch-index_add", "loop"])  # fmt: skip
    env = {"hardware": "test"}
    rows = bench.bench_wgrad(args, torch.device("cpu"), 1e10, env)
    got = {(r["op"], r["provider"]) for r in rows}
    want = {("projected", "torch"), ("sketch", "torch"), ("sketch", "loop")}
    if compiled_folds():
        want |= {("projected", "torch-index_add"), ("sketch", "torch-index_add")}
    assert got == want
    for r in rows:
        assert r["ms"] > 0 and r["floor_ms"] > 0 and r["target_ratio"] == pytest.approx(1.10)
