"""`rnb demo --quick` end to end on the Debian fortunes corpus."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from rnb_kernels.datasets import CorpusNotFoundError, load_fortunes


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    try:
        load_fortunes()
    except (CorpusNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"fortunes corpus not installed: {exc}")
    from rnb_kernels.cli import main

    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_demo_writes_table_plots_and_logs(demo_out, capsys):
    for name in ("results.csv", "results.md", "eval_loss.png", "weights.png", "meta.json"):
        assert (demo_out / name).stat().st_size > 0, name
    table = (demo_out / "results.md").read_text()
    for method in ("stratified", "dga", "rnb-original", "rnb-regrouped"):
        assert f"| {method} |" in table
    with open(demo_out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"stratified", "dga", "rnb-original", "rnb-regrouped"}
    meta = json.loads((demo_out / "meta.json").read_text())
    for r in rows.values():
        loss = float(r["eval_loss"])
        # Trained below the loss of a uniform guess over the vocabulary.
        assert np.isfinite(loss) and loss < np.log(meta["model"]["vocab_size"])
        assert float(r["overhead_pct"]) >= 0.0
    assert float(rows["stratified"]["mix_s"]) < float(rows["rnb-original"]["mix_s"])
    # Same seed and budget: every run starts from the same model (same step-0 eval loss).
    first = {
        json.loads((demo_out / "logs" / f"{m}.eval.jsonl").read_text().splitlines()[0])["eval_loss"]
        for m in rows
    }
    assert len(first) == 1


def _weights(demo_out, name):
    lines = (demo_out / "logs" / f"{name}.weights.jsonl").read_text().splitlines()
    return np.asarray([json.loads(x)["weights"] for x in lines])


@pytest.mark.parametrize("name", ["dga", "rnb-original", "rnb-regrouped"])
def test_mixture_on_simplex_and_moves(demo_out, name):
    w = _weights(demo_out, name)
    assert w.shape[0] >= 2
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-5)
    uniform = 1.0 / w.shape[1]
    assert np.abs(w[-1] - uniform).max() > 1e-3, f"{name} weights stayed uniform: {w[-1]}"


def test_stratified_stays_uniform(demo_out):
    w = _weights(demo_out, "stratified")
    np.testing.assert_allclose(w, 1.0 / w.shape[1], atol=1e-6)
