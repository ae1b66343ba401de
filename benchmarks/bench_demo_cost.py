"""Full cost of each demo method against stratified, timed interleaved.

The demo's own table divides each method's training-loop time by stratified's in the same
seed, runs one after the other; on a shared machine that ratio drifts with the load. Here every
variant trains the demo's model on the demo's data (``rnb demo``'s corpus, model, batch and
hyper-parameters, evaluation off) for ``--steps`` steps, and the variants take turns, in a
fresh random order every repetition (``harness.round_orders``), so drift and load hit all of
them alike. Each variant's time is the training loop only (mixing, tracking, target batches
and extra passes included; model build and evaluation excluded), in CPU time of the process
and in wall time; the ratio to stratified is the median over repetitions of the variant's
time over stratified's in the same repetition, with a bootstrap interval
(``harness.ratio_ci``).

Usage::

    python benchmarks/bench_demo_cost.py                 # ~6 minutes on one idle core
    python benchmarks/bench_demo_cost.py --quick         # smoke run, nothing written

Writes ``demo_cost_cpu.{csv,md}`` to the results directory (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from rnb_kernels.experiments.config import DEMO_METHODS, ExperimentConfig
from rnb_kernels.experiments.data import prepare
from rnb_kernels.experiments.harness import (
    environment,
    markdown_table,
    ratio_ci,
    results_dir,
    round_orders,
    write_csv,
)
from rnb_kernels.experiments.methods import resolve_methods
from rnb_kernels.experiments.train import train


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--modes", default="projected,exact", help="tracker modes of tracked methods")
    ap.add_argument("--work", default="/tmp/rnb_demo_cost", help="corpus preparation")
    ap.add_argument("--out", default=None, help="results directory (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="10 steps, 2 repetitions, nothing written")
    args = ap.parse_args(argv)
    steps, reps = (10, 2) if args.quick else (args.steps, args.reps)
    torch.set_num_threads(1)
    cfg = ExperimentConfig()
    prep = prepare(cfg.corpus, vocab_cap=cfg.model.vocab_size, context=cfg.model.context,
                   out=args.work)  # fmt: skip
    model_cfg = replace(cfg.model, vocab_size=prep.vocab.size)
    evals = {"val": prep.split("val")}
    variants = []
    for method in resolve_methods(DEMO_METHODS):
        tracked = method.name.startswith(("rnb", "dga"))
        for mode in args.modes.split(",") if tracked else ["-"]:
            variants.append((method, mode))

    def label(method, mode: str) -> str:
        return method.name if mode == "-" else f"{method.name} ({mode})"

    # Keyed in the methods' order, so the table keeps it whatever order the variants ran in.
    cpu: dict[str, list[float]] = {label(*v): [] for v in variants}
    wall: dict[str, list[float]] = {label(*v): [] for v in variants}
    t0 = time.perf_counter()
    for rep, order in enumerate(round_orders(variants, reps)):
        for method, mode in order:
            name = label(method, mode)
            tcfg = replace(
                cfg.train,
                steps=steps,
                eval_every=10**9,
                tracker_mode=mode if mode != "-" else cfg.train.tracker_mode,
            )
            m = prep.num_domains(method.domains)
            r = train(model_cfg, prep.split("train", method.domains), evals, method, tcfg,
                      target=prep.split("target", method.domains), seed=rep,
                      hparams=cfg.hparams, num_domains=m, num_groups=prep.num_original,
                      name=method.name, progress=False)  # fmt: skip
            cpu[name].append(r.train_cpu_s)
            wall[name].append(r.train_s)
    env = environment("cpu")
    rows = []
    for name in cpu:
        rc = ratio_ci(cpu[name], cpu["stratified"])
        rw = ratio_ci(wall[name], wall["stratified"])
        rows.append({
            "variant": name, "steps": steps, "reps": reps,
            "cpu_s_median": round(statistics.median(cpu[name]), 3),
            "cpu_ratio": round(rc[0], 3), "cpu_ratio_ci_low": round(rc[1], 3),
            "cpu_ratio_ci_high": round(rc[2], 3),
            "wall_ratio": round(rw[0], 3), "wall_ratio_ci_low": round(rw[1], 3),
            "wall_ratio_ci_high": round(rw[2], 3),
            **env,
        })  # fmt: skip
    table = markdown_table(
        [
            {
                "variant": r["variant"],
                "CPU s (median)": r["cpu_s_median"],
                "CPU time / stratified [95% CI]": (
                    f"{r['cpu_ratio']:.3f} [{r['cpu_ratio_ci_low']:.3f}, {r['cpu_ratio_ci_high']:.3f}]"
                ),
                "wall time / stratified [95% CI]": (
                    f"{r['wall_ratio']:.3f} [{r['wall_ratio_ci_low']:.3f}, {r['wall_ratio_ci_high']:.3f}]"
                ),
            }
            for r in rows
        ],
        ["variant", "CPU s (median)", "CPU time / stratified [95% CI]",
         "wall time / stratified [95% CI]"],
    )  # fmt: skip
    print(table)
    if args.quick:
        return
    out = results_dir(args.out)
    write_csv(out / "demo_cost_cpu.csv", rows)
    (out / "demo_cost_cpu.md").write_text(
        "# Full cost of the demo's methods, interleaved\n\n"
        f"Produced by `python benchmarks/bench_demo_cost.py` ({time.perf_counter() - t0:.0f} s);"
        " rows in `demo_cost_cpu.csv`.\n\n"
        f"- {env['hardware']}, 1 torch thread, torch {env['torch']}, git {env['git_sha']}"
        f"{'+dirty' if env['git_dirty'] else ''}, {env['timestamp']}, 1-min load "
        f"{env['load_avg_1min']} at the end\n"
        f"- the demo's setting (Natural Instructions target shift, GPT-Neo 2 x 64, batch 16 x 64"
        f" tokens, the default hyper-parameters), {steps} steps per run, evaluation off; "
        f"{reps} repetitions (model seed = repetition), variants in turn, in a fresh random "
        "order every repetition\n"
        "- time: the training loop (tracking, statistics, mixer updates, target batches "
        "included); ratio: median over repetitions of the variant's time / stratified's in the "
        "same repetition, 95% bootstrap interval over repetitions\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
