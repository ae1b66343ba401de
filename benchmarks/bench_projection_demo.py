"""Projected-mode R&B weights against exact ones on the demo's own gradients.

Trains the demo's R&B runs (``rnb demo``'s corpus, model, budget and hyper-parameters:
Natural Instructions target shift, GPT-Neo 2 x 64, 300 steps, ``lam`` from the defaults) with
the **exact** tracker, and at every round, right before the mixer reads ``G c``, computes
what projected mode would have held for the same micro-batches. The projection is linear, so
projected mode's state for domain ``d`` is ``P_out G_d`` with ``G_d`` the exact per-domain
gradient sum: ``project_columns_torch`` applied to the exact accumulators gives it without
running the model a second time. For each ``proj_dim`` and hash seed it records, per round:

* ``rnb_max_abs``: ``max_i |w_i - w*_i|`` between the R&B weights from the projected ``G c``
  and from the exact one (the same ``RnB`` mixer, ``lam``, ``p_eval`` and counts);
* ``gvec_rel``: ``‖Ĝc - Gc‖ / ‖Gc‖``.

Each ``proj_dim`` is run without and with exact rows (``--exact-rows``, the tracker's
``exact_rows``): the rule the tracker follows is replayed -- round ``r`` keeps exactly the rows
with the largest ``Σ ‖dW_i‖²`` over round ``r - 1``'s micro-batches (recorded from the exact
tracker's backward), round 0 none -- and ``Ĝc`` is the exact Gram of those rows plus the
projected Gram of the others.

Usage::

    python benchmarks/bench_projection_demo.py            # ~2 minutes on one CPU core
    python benchmarks/bench_projection_demo.py --quick    # smoke run, nothing written

Writes ``projection_demo_cpu.{csv,md}`` to the results directory (``--out``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch

from rnb_kernels.experiments.config import ExperimentConfig
from rnb_kernels.experiments.data import prepare
from rnb_kernels.experiments.harness import environment, markdown_table, results_dir, write_csv
from rnb_kernels.experiments.methods import resolve_methods
from rnb_kernels.experiments.train import train
from rnb_kernels.mixing import RnB
from rnb_kernels.ops import sketch_hash as H
from rnb_kernels.ops.domain_projection import project_columns_torch
from rnb_kernels.ops.sketch_hash import round_seed
from rnb_kernels.tracking import DomainGradientTracker
from rnb_kernels.tracking.slot import Slot


def projected_gvec(
    grads: torch.Tensor,
    shape: tuple[int, int],
    c: torch.Tensor,
    proj_dim: int,
    seed: int,
    heavy: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Ĝ c`` from projected-mode states ``P_out G_d`` (layer 0, unsharded, no bias); with
    ``heavy`` rows kept exactly, their Gram plus the projected Gram of the other rows."""
    m = grads.shape[0]
    k_out, k_in = shape
    g = grads.view(m, k_out, k_in)
    exact = torch.zeros(m, 0, dtype=torch.float64)
    if heavy is not None:
        exact = g[:, heavy].reshape(m, -1).double()
        g = g.clone()
        g[:, heavy] = 0
    g = g.transpose(1, 2).reshape(m * k_in, k_out)
    proj = project_columns_torch(g, proj_dim, seed, 0, 0, H.PROJ_OUT).view(m, -1).double()
    return proj @ (proj.t() @ c) + exact @ (exact.t() @ c)


def rnb_weights(gvec: torch.Tensor, counts: torch.Tensor, p: torch.Tensor, lam: float):
    return RnB(len(counts), eval_proportions=p, lam=lam).update(gram_vec=gvec, counts=counts)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", default="rnb-original,rnb-regrouped")
    ap.add_argument("--proj-dims", type=int, nargs="+", default=[64, 128, 256, 1024])
    ap.add_argument("--exact-rows", type=int, nargs="+", default=[0, 64],
                    help="exact rows per variant (0 = plain projection)")  # fmt: skip
    ap.add_argument("--seeds", type=int, default=5, help="hash seeds per proj_dim")
    ap.add_argument("--steps", type=int, default=None, help="default: the demo's")
    ap.add_argument("--work", default="/tmp/rnb_projection_demo", help="corpus preparation")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="30 steps, nothing written")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = ExperimentConfig()
    steps = 30 if args.quick else (args.steps or cfg.train.steps)
    tcfg = replace(cfg.train, steps=steps, eval_every=10**9, tracker_mode="exact")
    t0 = time.perf_counter()
    prep = prepare(cfg.corpus, vocab_cap=cfg.model.vocab_size, context=cfg.model.context,
                   out=args.work)  # fmt: skip
    model_cfg = replace(cfg.model, vocab_size=prep.vocab.size)
    rows: list[dict] = []
    state: dict = {}
    # {method: {"exact": [w*_r], (proj_dim, seed index, fresh hash per round): [w_r]}}
    mixtures: dict = {}
    original = DomainGradientTracker.gram_vector
    original_accumulate = Slot.accumulate

    def accumulate(self, x2, dy2, ctx, rows=None):
        # Record the rows' energy Σ ‖dW_i‖² of every domain micro-batch, as projected mode does.
        dw = original_accumulate(self, x2, dy2, ctx, rows)
        if ctx.kind == "domain":
            e = dw.double().square().sum(1)
            state["energy"] = e if state.get("energy") is None else state["energy"] + e
        return dw

    def gram_vector(self, coeffs):
        exact = original(self, coeffs)
        counts = self.counts().double()
        c = torch.as_tensor(coeffs, dtype=torch.float64)
        p = c * counts
        p = p / p.sum()
        grads, shape = self.domain_grads(), (self._slots[0].k_out, self._slots[0].k_in)
        w_exact = rnb_weights(exact, counts, p, state["lam"])
        runs = mixtures.setdefault(state["method"], {})
        runs.setdefault("exact", []).append(w_exact)
        prev = state.get("prev_energy")
        for dim in args.proj_dims:
            for k in args.exact_rows:
                heavy = None if (k == 0 or prev is None) else torch.topk(prev, k).indices
                for s in range(args.seeds):
                    fixed, fresh = 1000 + s, round_seed(1000 + s, state["round"])
                    for hash_seed, is_fresh in ((fixed, False), (fresh, True)):
                        g_hat = projected_gvec(grads, shape, c, dim, hash_seed, heavy)
                        w = rnb_weights(g_hat, counts, p, state["lam"])
                        runs.setdefault((dim, k, s, is_fresh), []).append(w)
                        if is_fresh:
                            continue  # per-round errors are alike; rows keep the fixed hash's
                        rows.append({
                            "method": state["method"], "round": state["round"],
                            "proj_dim": dim, "exact_rows": k, "hash_seed": hash_seed,
                            "domains": len(counts),
                            "rnb_max_abs": float((w - w_exact).abs().max()),
                            "gvec_rel": float((g_hat - exact).norm() / exact.norm()),
                        })  # fmt: skip
        state["round"] += 1
        state["prev_energy"], state["energy"] = state.get("energy"), None
        return exact

    DomainGradientTracker.gram_vector = gram_vector
    Slot.accumulate = accumulate
    try:
        for method in resolve_methods(tuple(args.methods.split(","))):
            state.update(method=method.name, round=0, lam=float(cfg.hparams["rnb"]["lam"]),
                         energy=None, prev_energy=None)  # fmt: skip
            m = prep.num_domains(method.domains)
            train(model_cfg, prep.split("train", method.domains), {"val": prep.split("val")},
                  method, tcfg, target=prep.split("target", method.domains), seed=0,
                  hparams=cfg.hparams, num_domains=m, num_groups=prep.num_original,
                  name=method.name, progress=False)  # fmt: skip
    finally:
        DomainGradientTracker.gram_vector = original
        Slot.accumulate = original_accumulate
    summary = []
    for method in dict.fromkeys(r["method"] for r in rows):
        for dim in args.proj_dims:
            for k in args.exact_rows:
                sel = [r for r in rows if r["method"] == method and r["proj_dim"] == dim
                       and r["exact_rows"] == k]  # fmt: skip
                a = np.array([r["rnb_max_abs"] for r in sel])
                g = np.array([r["gvec_rel"] for r in sel])
                a1 = np.array([r["rnb_max_abs"] for r in sel if r["round"] > 0])
                summary.append({
                    "method": method, "domains": sel[0]["domains"], "proj_dim": dim,
                    "exact rows": k, "rounds x seeds": len(sel),
                    "R&B max abs diff: median / p95 / max": (
                        f"{np.median(a):.4f} / {np.quantile(a, 0.95):.4f} / {a.max():.4f}"
                    ),
                    "max, rounds ≥ 1": f"{a1.max():.4f}",
                    "‖Ĝc − Gc‖ / ‖Gc‖: median / max": f"{np.median(g):.3f} / {g.max():.3f}",
                })  # fmt: skip
    table = markdown_table(summary, list(summary[0]))
    print(table)
    # The mixture a run draws from is its weights averaged over the rounds: one hash biases
    # every round alike, a fresh hash per round (the tracker's default) averages errors out.
    avg = []
    for method, runs in mixtures.items():
        mean_exact = torch.stack(runs["exact"]).mean(0)
        for dim in args.proj_dims:
            for k in args.exact_rows:
                row = {"method": method, "proj_dim": dim, "exact rows": k}
                for is_fresh, label in (
                    (False, "one hash per run"), (True, "fresh hash per round")
                ):  # fmt: skip
                    errs = [
                        float(
                            (torch.stack(runs[(dim, k, s, is_fresh)]).mean(0) - mean_exact)
                            .abs()
                            .max()
                        )
                        for s in range(args.seeds)
                    ]
                    row[f"{label}: median / max over seeds"] = (
                        f"{np.median(errs):.4f} / {max(errs):.4f}"
                    )
                avg.append(row)
    avg_table = markdown_table(avg, list(avg[0]))
    print(avg_table)
    if args.quick:
        return
    env = environment("cpu")
    out = results_dir(args.out)
    write_csv(out / "projection_demo_cpu.csv", [{**r, **env} for r in rows])
    (out / "projection_demo_cpu.md").write_text(
        "# Projected-mode R&B weights vs exact, on the demo's gradients\n\n"
        f"Produced by `python benchmarks/bench_projection_demo.py` "
        f"({time.perf_counter() - t0:.0f} s); per-round rows in `projection_demo_cpu.csv`.\n\n"
        f"- {env['hardware']}, 1 torch thread, torch {env['torch']}, git {env['git_sha']}"
        f"{'+dirty' if env['git_dirty'] else ''}, {env['timestamp']}\n"
        f"- the demo's setting: Natural Instructions target shift, GPT-Neo 2 x 64 (vocabulary "
        f"{prep.vocab.size}, T={cfg.model.context}), {steps} steps, seed 0, `lam` "
        f"{cfg.hparams['rnb']['lam']}; tracked: the LM head; exact tracker, projected states "
        "computed from its per-domain gradient sums at every round (projection is linear, so "
        "this is what projected mode would hold); hash seeds 1000 to 1000 + seeds - 1; "
        "exact rows: round r keeps the rows with the most energy (sum of squared row norms of "
        "each micro-batch's dW) in round r - 1, round 0 none, as the tracker does\n\n"
        + table
        + "\n\nThe run's mixture (its R&B weights averaged over the rounds) against exact's, max "
        "abs difference; the fresh hash of round r is `sketch_hash.round_seed(seed, r)`, what "
        "the tracker does by default (`reseed=True`):\n\n" + avg_table + "\n"
    )


if __name__ == "__main__":
    main()
