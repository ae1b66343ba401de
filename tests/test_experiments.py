"""The experiments subpackage: layering, one config, one method registry, and a mixer that
exists only in this file driven through `rnb demo --methods` and `rnb bench mixing`."""

from __future__ import annotations

import ast
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rnb_kernels.datasets import CorpusNotFoundError, load_fortunes

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "rnb_kernels"


# ----------------------------------------------------------------------------- layering
def test_library_core_loads_nothing_from_experiments():
    core = ["rnb_kernels", "rnb_kernels.ops", "rnb_kernels.tracking", "rnb_kernels.mixing",
            "rnb_kernels.sampling", "rnb_kernels.balancer", "rnb_kernels.regroup",
            "rnb_kernels.datasets", "rnb_kernels.distributed"]  # fmt: skip
    code = (
        f"import importlib, sys\nfor m in {core!r}: importlib.import_module(m)\n"
        "print([m for m in sys.modules if m.startswith('rnb_kernels.experiments')])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.strip() == "[]", out.stdout


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module a file imports (relative imports resolved)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    package = parts[:-1]
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            mod = ".".join([*base, *([node.module] if node.module else [])])
            names += [mod] + [f"{mod}.{a.name}" for a in node.names]
    return names


def test_no_library_module_imports_experiments():
    offenders = []
    for path in PKG.rglob("*.py"):
        if "experiments" in path.relative_to(PKG).parts:
            continue
        for name in _imported_modules(path):
            if name.startswith("rnb_kernels.experiments"):
                offenders.append(f"{path.relative_to(ROOT)}: {name}")
    assert offenders == []


# ----------------------------------------------------------------------------- config
def test_config_replace_routes_each_setting_to_its_section():
    from rnb_kernels.experiments.config import DEMO, QUICK

    cfg = QUICK.replace(steps=7, corpus="ni", embedder="minilm", n_embd=64, seeds=[3, 4],
                        methods=["odm"], device=None)  # fmt: skip
    assert (cfg.train.steps, cfg.corpus.name, cfg.corpus.embedder) == (7, "ni", "minilm")
    assert cfg.model.n_embd == 64 and cfg.model.n_layer == QUICK.model.n_layer
    assert cfg.seeds == (3, 4) and cfg.methods == ("odm",)
    assert cfg.train.device == "cpu"  # None = unset, ignored
    assert QUICK.train.steps == 40  # the preset itself is untouched
    with pytest.raises(TypeError, match="no setting 'stepz'"):
        DEMO.replace(stepz=3)
    # warmup follows steps unless set (15 warmup steps per 225 optimizer steps).
    assert DEMO.train.warmup_steps == 20 and QUICK.replace(steps=60).train.warmup_steps == 4
    assert json.loads(json.dumps(DEMO.to_dict()))["hparams"]["rnb"] == {"lam": 2.0}


# ----------------------------------------------------------------------------- methods
def test_named_methods_and_suffixes():
    from rnb_kernels.experiments.methods import (
        Method,
        get_method,
        method_names,
        needs_tracker,
        resolve_methods,
    )

    assert get_method("dga-extra") == Method("dga-extra", "dga", "original", "extra")
    assert get_method("rnb-regrouped") == Method("rnb-regrouped", "rnb", "regrouped")
    assert get_method("odm-regrouped") == Method("odm-regrouped", "odm", "regrouped")
    assert get_method("dga-regrouped-extra") == Method(
        "dga-regrouped-extra", "dga", "regrouped", "extra"
    )
    # A registered name containing a dash is not split into suffixes.
    assert get_method("dga-distribution").mixer == "dga-distribution"
    with pytest.raises(ValueError, match="unknown method 'nope'.*registered mixer"):
        get_method("nope")
    with pytest.raises(ValueError, match="unknown method"):
        get_method("rnb-extra-extra")
    with pytest.raises(ValueError, match="'odm' is listed twice"):
        resolve_methods(["odm", "stratified", "odm"])
    assert {"stratified", "dga-extra", "rnb-regrouped", "dga-distribution"} <= set(method_names())
    # The tracker follows the mixer's declared statistics, not the method's name.
    tracked = {n: needs_tracker(n) for n in ("stratified", "static", "odm", "dga", "dga-extra",
                                             "rnb-original", "rnb-regrouped")}  # fmt: skip
    assert tracked == {"stratified": False, "static": False, "odm": False, "dga": True,
                       "dga-extra": False, "rnb-original": True, "rnb-regrouped": True}  # fmt: skip


def test_extra_gradients_need_an_alignment_mixer():
    from rnb_kernels.experiments.methods import build_method_mixer

    kw = dict(num_domains=3, train_domains=np.array([0, 1, 2]),
              eval_proportions=np.ones(3), target_domains=np.array([0]), update_every=2)  # fmt: skip
    with pytest.raises(ValueError, match="'extra' needs a mixer that requires 'alignment'"):
        build_method_mixer("rnb-extra", **kw)
    mixer = build_method_mixer("dga-extra", hparams={"dga": {"step_size": 0.5}}, **kw)
    assert (mixer.step_size, mixer.update_every) == (0.5, 2)
    odm = build_method_mixer("odm", hparams={"odm": {"update_every": 1}}, **kw)
    assert odm.update_every == 1  # a mixer's own hyper-parameter beats the round length
    static = build_method_mixer("static", **{**kw, "train_domains": np.array([0, 0, 1, 2])})
    np.testing.assert_allclose(static.weights.numpy(), [0.5, 0.25, 0.25])


# ----------------------------------------------------------------------------- a toy mixer
@pytest.fixture
def toy_mixer():
    """Registered from this file only: puts every weight on domain 0 at its first update and
    records the statistics the Balancer handed it."""
    from rnb_kernels.mixing import Mixer, register_mixer, unregister_mixer

    @register_mixer
    class Toy(Mixer):
        name = "toy"
        requires = ("losses", "counts")
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def update(self, losses, counts):
            Toy.seen.append((torch.as_tensor(losses).clone(), torch.as_tensor(counts).clone()))
            w = torch.zeros(self.num_domains, dtype=torch.float64)
            w[0] = 1.0
            return self._commit(w)

    yield Toy
    unregister_mixer("toy")


@pytest.fixture
def fortunes():
    try:
        load_fortunes()
    except (CorpusNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"fortunes corpus not installed: {exc}")


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _check_all_on_domain_zero(log_dir: Path, name: str, per_round: int) -> None:
    """Weights history and the Balancer's per-round draw counts of a Toy run."""
    # One row per update (the uniform start is not logged).
    weights = np.asarray([r["weights"] for r in _jsonl(log_dir / f"{name}.weights.jsonl")])
    m = weights.shape[1]
    np.testing.assert_array_equal(weights, np.broadcast_to(np.eye(m)[0], weights.shape))
    rounds = _jsonl(log_dir / name / "mixture.jsonl")
    counts = np.asarray([r["counts"] for r in rounds])
    assert counts.shape == weights.shape
    assert (counts.sum(1) == per_round).all()
    assert np.count_nonzero(counts[0]) > 1  # round 1 drew from the uniform mixture
    # After the first update every sample comes from domain 0.
    np.testing.assert_array_equal(counts[1:, 0], per_round)
    assert counts[1:, 1:].sum() == 0


def test_toy_mixer_through_rnb_demo(tmp_path, toy_mixer, fortunes, capsys):
    from rnb_kernels.cli import main
    from rnb_kernels.experiments.config import QUICK

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--methods", "stratified,toy", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "| toy |" in table and "| stratified |" in table and "rnb-original" not in table
    with open(out / "results.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"stratified", "toy"}
    assert float(rows["toy"]["final_weight_max"]) == 1.0
    rounds = QUICK.train.steps // QUICK.train.update_every
    assert int(rows["toy"]["updates"]) == rounds == len(toy_mixer.seen)
    per_round = QUICK.train.update_every * QUICK.train.batch_size
    _check_all_on_domain_zero(out / "logs", "toy", per_round)
    # The Balancer gave the toy its declared statistics: per-domain mean losses where drawn.
    for losses, counts in toy_mixer.seen:
        assert float(counts.sum()) == per_round
        assert torch.isfinite(losses[counts > 0]).all() and torch.isnan(losses[counts == 0]).all()


def test_toy_mixer_through_rnb_bench_mixing(tmp_path, toy_mixer, fortunes, capsys):
    from rnb_kernels.cli import main
    from rnb_kernels.experiments.config import BENCH_PRESETS

    out = tmp_path / "bench"
    args = ["bench", "mixing", "--preset", "tiny", "--corpora", "fortunes", "--seeds", "0",
            "--methods", "toy,toy-regrouped", "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(args) == 0
    assert "| fortunes | toy |" in capsys.readouterr().out
    with open(out / "mixing_tiny.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"toy", "toy-regrouped"}
    assert int(rows["toy-regrouped"]["domains"]) < int(rows["toy"]["domains"])
    tiny = BENCH_PRESETS["tiny"].train
    logs = out / "mixing_tiny_work" / "fortunes_s0" / "logs"
    for name in rows:
        assert float(rows[name]["final_weight_max"]) == 1.0
        _check_all_on_domain_zero(logs, name, tiny.update_every * tiny.batch_size)


def test_unknown_method_is_refused_before_any_work(tmp_path, capsys):
    from rnb_kernels.cli import main

    assert main(["demo", "--quick", "--methods", "stratified,nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "mixing", "--preset", "tiny", "--methods", "nope"]) == 2
    assert capsys.readouterr().out.count("unknown method 'nope'") == 2
    assert not (tmp_path / "partition").exists()
