"""`rnb bench overhead` at a tiny size: every variant runs and reports a ratio."""

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
    with open(out) as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    expected = {
        "untracked", "exact/torch", "sketch/torch", "anchor/extra-backward", "anchor/torch.func",
    }  # fmt: skip
    assert expected <= set(rows)
    assert float(rows["untracked"]["ratio"]) == pytest.approx(1.0)
    for name in expected:
        r = float(rows[name]["ratio"])
        assert math.isfinite(r) and r > 0, name
        assert rows[name]["machine"] and rows[name]["torch"] and rows[name]["git_sha"]


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


def test_gpu_presets_refuse_cleanly_without_cuda(capsys):
    import torch

    from rnb_kernels.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", "overhead", "--preset", "gpu", "--no-save"]) == 2
    assert main(["bench", "mixing", "--preset", "gpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().out
