"""Projected and sketch statistics against exact ones, on real gradients.

A small GPT-Neo of the demo's shape (``transformers``, built from a config: compact GPT-2 BPE
vocabulary, 2 layers, width 64, tied LM head; the rows committed before the experiments moved
to GPT-Neo came from a hand-written GPT of the same shape) is trained on the Debian fortunes for a few hundred steps; the ``--domains`` largest
categories are the domains. Then, for several rounds (the model trained further between
rounds), the same micro-batches (domain-balanced: every domain equally often) go through deep
copies of the model, each carrying one tracker on the LM head: exact, projected at each
``proj_dim`` and sketch at the same state size (``sketch_dim = proj_dim * (K_in + bias)``),
each approximate mode under several hash seeds. Per round and tracker it records

* ``gram_rel_fro``: ``‖Ĝ - G‖_F / ‖G‖_F`` of the Gram of per-domain gradient sums;
* ``gram_max_cos_err``: ``max_ij |Ĝ_ij - G_ij| / sqrt(G_ii G_jj)`` (entry errors in units of
  the cosine);
* ``rnb_max_abs``: ``max_i |w_i - w*_i|`` of the R&B weights ``softmax(λ G p / ‖G p‖)``
  (``rnb_kernels.mixing.RnB``, ``λ = 2``, ``p`` the eval proportions = the domains' corpus
  shares, means from the per-domain counts) from ``Ĝ`` vs from ``G``.

and, on synthetic tensors of the CPU GPT config (``N=1024, K_in=256, K_out=8192, m=16``), the
median time of the projected op against ``dy.t().mm(x)`` alone, interleaved.

Usage::

    python benchmarks/bench_projection_error.py            # ~4 minutes on 2 idle CPU cores
    python benchmarks/bench_projection_error.py --quick    # smoke run, nothing written

Writes ``benchmarks/results/projection_error_cpu.csv`` (one row per round, mode, size, seed)
and ``projection_error_cpu.md`` (summary table, timing, machine, torch version, git SHA).
"""

from __future__ import annotations

import argparse
import copy
import csv
import datetime as dt
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import rnb_kernels as rnb
from rnb_kernels.datasets import load_fortunes
from rnb_kernels.experiments.models import ModelConfig, build_model, lm_logits
from rnb_kernels.experiments.tokenizer import CompactVocab, load_tokenizer
from rnb_kernels.mixing import RnB
from rnb_kernels.tracking import DomainGradientTracker

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
IGNORE = -100


def git_sha() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
            check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
            capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def machine() -> str:
    name = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


# --------------------------------------------------------------------------- data and model


def encode(texts, tok, vocab: CompactVocab, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, T]`` inputs and shifted labels (EOS as BOS and end, ``-100`` padding)."""
    n = len(texts)
    inputs = np.full((n, context), vocab.EOS, dtype=np.int64)
    labels = np.full((n, context), IGNORE, dtype=np.int64)
    for i, ids in enumerate(tok.encode_batch(list(texts))):
        seq = np.concatenate([[vocab.EOS], vocab(ids[:context]), [vocab.EOS]])[: context + 1]
        inputs[i, : len(seq) - 1] = seq[:-1]
        labels[i, : len(seq) - 1] = seq[1:]
    return torch.from_numpy(inputs), torch.from_numpy(labels)


def loss_fn(model: torch.nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_logits(model, inputs)
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE
    )


class Data:
    def __init__(self, num_domains: int, vocab_size: int, context: int, seed: int):
        corpus = load_fortunes()
        sizes = np.bincount(corpus.labels)
        keep = np.argsort(-sizes, kind="stable")[:num_domains]
        remap = np.full(len(sizes), -1)
        remap[keep] = np.arange(len(keep))
        dom = remap[corpus.labels]
        idx = np.flatnonzero(dom >= 0)
        texts = [corpus.texts[i] for i in idx]
        tok = load_tokenizer()
        vocab = CompactVocab(tok.encode_batch(texts), tok.vocab_size, vocab_size)
        self.inputs, self.labels = encode(texts, tok, vocab, context)
        self.domains = torch.from_numpy(dom[idx])
        self.vocab_size = vocab.size
        self.tokenizer = tok.name
        self.names = [corpus.label_names[k] for k in keep]
        self.shares = torch.from_numpy(sizes[keep] / sizes[keep].sum())
        self.by_domain = [torch.nonzero(self.domains == d)[:, 0] for d in range(num_domains)]
        self.gen = torch.Generator().manual_seed(seed)

    def random_batch(self, b: int):
        i = torch.randint(0, len(self.domains), (b,), generator=self.gen)
        return self.inputs[i], self.labels[i], self.domains[i]

    def balanced_batch(self, per_domain: int):
        """Every domain ``per_domain`` times, shuffled."""
        rows = []
        for pool in self.by_domain:
            rows.append(pool[torch.randint(0, len(pool), (per_domain,), generator=self.gen)])
        i = torch.cat(rows)[torch.randperm(sum(len(r) for r in rows), generator=self.gen)]
        return self.inputs[i], self.labels[i], self.domains[i]


def train(model, opt, data: Data, steps: int, batch: int) -> float:
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        x, y, _ = data.random_batch(batch)
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())


# --------------------------------------------------------------------------- metrics


def rnb_weights(gram: torch.Tensor, counts: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    return RnB(len(counts), eval_proportions=shares, lam=2.0).update(gram=gram, counts=counts)


def metrics(g_hat: torch.Tensor, g: torch.Tensor, counts, shares, w_exact) -> dict[str, float]:
    d = g.diagonal().clamp(min=1e-300).sqrt()
    return {
        "gram_rel_fro": float((g_hat - g).norm() / g.norm()),
        "gram_max_cos_err": float(((g_hat - g).abs() / (d[:, None] * d[None, :])).max()),
        "rnb_max_abs": float((rnb_weights(g_hat, counts, shares) - w_exact).abs().max()),
    }


# --------------------------------------------------------------------------- timing


def time_ops(reps: int, threads: int) -> dict[str, float]:
    """Median ms of each op at the CPU GPT config, the ops run round-robin (interleaved), with
    ``threads`` intra-op threads."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    n, k_in, k_out, m = 1024, 256, 8192, 16
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(n, k_in, generator=g), torch.randn(n, k_out, generator=g)
    ids = torch.randint(0, m, (n,), generator=g)
    p64 = torch.zeros(m, 64, k_in)
    p128 = torch.zeros(m, 128, k_in)
    acc = torch.zeros(m, k_out, k_in)
    sk = torch.zeros(m, 128 * k_in)
    ops = {
        "dy.t().mm(x)": lambda: dy.t().mm(x),
        "domain_projection proj_dim=64": lambda: rnb.ops.domain_projection(
            x, dy, ids, m, p64, backend="torch", check_ids=False
        ),
        "domain_projection proj_dim=128": lambda: rnb.ops.domain_projection(
            x, dy, ids, m, p128, backend="torch", check_ids=False
        ),
        "segmented_wgrad (exact)": lambda: rnb.ops.segmented_wgrad(
            x, dy, ids, m, acc, backend="torch", check_ids=False
        ),
        "domain_sketch sketch_dim=128*256": lambda: rnb.ops.domain_sketch(
            x, dy, ids, m, sk, backend="torch", check_ids=False
        ),
        # No work to speak of: what one OpenMP parallel region costs on this machine now.
        "probe: torch.zeros(1024, 256)": lambda: torch.zeros(n, k_in),
    }
    for fn in ops.values():  # warm-up (hash tables, allocator)
        fn()
    times: dict[str, list[float]] = {k: [] for k in ops}
    for _ in range(reps):
        for k, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    torch.set_num_threads(saved)
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


# --------------------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", type=int, default=32)
    ap.add_argument("--proj-dims", type=int, nargs="+", default=[16, 32, 64, 128, 256])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--micro-batches", type=int, default=3)
    ap.add_argument("--per-domain", type=int, default=2, help="samples per domain per micro-batch")
    ap.add_argument("--train-steps", type=int, default=200)
    ap.add_argument("--steps-between", type=int, default=20)
    ap.add_argument("--timing-reps", type=int, default=31)
    ap.add_argument("--quick", action="store_true", help="tiny smoke run; writes nothing")
    args = ap.parse_args(argv)
    if args.quick:
        args.proj_dims, args.seeds, args.rounds, args.micro_batches = [16, 64], 2, 1, 1
        args.train_steps, args.steps_between, args.timing_reps = 5, 0, 3
    torch.manual_seed(0)
    t_start = time.perf_counter()

    data = Data(args.domains, vocab_size=4096, context=64, seed=0)
    m = args.domains
    cfg = ModelConfig(vocab_size=data.vocab_size, context=64, n_layer=2, n_head=2, n_embd=64)
    model = build_model(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loss = train(model, opt, data, args.train_steps, batch=32)
    print(
        f"trained {args.train_steps} steps, loss {loss:.3f} ({time.perf_counter() - t_start:.0f} s)"
    )

    head = model.lm_head
    k_in, has_bias = head.weight.shape[1], head.bias is not None
    width = k_in + int(has_bias)
    configs = [("exact", 0, 0)]
    for p in args.proj_dims:
        for s in range(args.seeds):
            configs += [("projected", p, s), ("sketch", p, s)]
    copies = {}
    for mode, p, s in configs:
        mdl = copy.deepcopy(model)
        kw = {"proj_dim": p} if mode == "projected" else {"sketch_dim": p * width}
        tr = DomainGradientTracker(
            mdl, m, modules="lm_head", mode=mode, seed=s, backend="torch",
            **(kw if mode != "exact" else {}),
        )  # fmt: skip
        copies[(mode, p, s)] = (mdl, tr)

    rows = []
    for r in range(args.rounds):
        if r:
            train(model, opt, data, args.steps_between, batch=32)
        batches = [data.balanced_batch(args.per_domain) for _ in range(args.micro_batches)]
        state = model.state_dict()
        for mdl, tr in copies.values():
            mdl.load_state_dict(state)
            tr.reset()
            for x, y, ids in batches:
                with tr.domains(ids):
                    loss_fn(mdl, x, y).backward()
                mdl.zero_grad(set_to_none=True)
        ex = copies[("exact", 0, 0)][1]
        g, counts = ex.gram(), ex.counts()
        w_exact = rnb_weights(g, counts, data.shares)
        for (mode, p, s), (_, tr) in copies.items():
            if mode == "exact":
                continue
            row = {"round": r, "mode": mode, "proj_dim": p, "seed": s,
                   "state_floats_per_domain": p * width}  # fmt: skip
            row.update(metrics(tr.gram(), g, counts, data.shares, w_exact))
            rows.append(row)
        print(f"round {r}: done ({time.perf_counter() - t_start:.0f} s)")

    threads = torch.get_num_threads()
    timing = {t: time_ops(args.timing_reps, t) for t in sorted({threads, 1}, reverse=True)}
    elapsed = time.perf_counter() - t_start
    summary = summarize(rows, args.proj_dims)
    print(format_summary(summary))
    for t, tm in timing.items():
        for k, v in tm.items():
            print(f"{t} thr  {k:34s} {v:8.2f} ms  ({v / tm['dy.t().mm(x)']:.2f}x)")
    if args.quick:
        return
    env = {
        "timestamp": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hardware": machine(),
        "torch": torch.__version__,
        "git_sha": git_sha(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "projection_error_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*env, *rows[0]])
        w.writeheader()
        w.writerows({**env, **r} for r in rows)
    setup = {
        "model": f"GPT-Neo vocab {data.vocab_size} ({data.tokenizer} BPE, compact), context 64, "
        f"2 layers, width 64, tied LM head; AdamW lr 3e-3, batch 32",
        "tracked": f"lm_head [{head.weight.shape[0]}, {k_in}] (bias: {has_bias})",
        "domains": f"m = {m}: the {m} largest Debian fortunes categories",
        "data": f"{args.train_steps} training steps, then {args.rounds} rounds "
        f"{args.steps_between} steps apart; a round = {args.micro_batches} micro-batches of "
        f"{args.per_domain} samples per domain ({args.micro_batches * args.per_domain * m} "
        "samples, 64 tokens each), the same batches through every tracker",
        "seeds": f"{args.seeds} hash seeds per approximate configuration",
        "R&B": "softmax(2 · G p / ‖G p‖), G of per-domain mean gradients, p = domain shares",
    }
    write_md(summary, timing, env, setup, elapsed)
    print(f"wrote {RESULTS / 'projection_error_cpu.md'} ({elapsed:.0f} s)")


def summarize(rows: list[dict], dims: list[int]) -> list[dict]:
    out = []
    for p in dims:
        for mode in ("projected", "sketch"):
            sel = [r for r in rows if r["proj_dim"] == p and r["mode"] == mode]
            item = {"mode": mode, "proj_dim": p, "state": sel[0]["state_floats_per_domain"]}
            for k in ("gram_rel_fro", "gram_max_cos_err", "rnb_max_abs"):
                vals = [r[k] for r in sel]
                item[k] = (statistics.fmean(vals), max(vals))
            out.append(item)
    return out


def format_summary(summary: list[dict]) -> str:
    head = (
        "| mode | proj_dim | state / domain (floats) | Gram rel. Frobenius error, mean / max "
        "| Gram max entry error (cosine units), mean / max | R&B weights max abs diff, mean / max |"
    )
    lines = [head, "|" + "---|" * 6]
    for it in summary:
        size = f"{it['proj_dim']} x 64" if it["mode"] == "projected" else f"k = {it['state']}"
        cells = [it["mode"], str(it["proj_dim"]), f"{it['state']} ({size})"]
        for k in ("gram_rel_fro", "gram_max_cos_err", "rnb_max_abs"):
            mean, mx = it[k]
            cells.append(f"{mean:.4f} / {mx:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reading(summary: list[dict], target: float = 0.01) -> str:
    """One sentence per mode: the sizes whose worst R&B error meets ``target``."""
    out = []
    for mode in ("projected", "sketch"):
        ok = [
            it["proj_dim"]
            for it in summary
            if it["mode"] == mode and it["rnb_max_abs"][1] <= target
        ]
        at = "proj_dim " + ", ".join(map(str, ok)) if ok else "none of the proj_dim tried"
        out.append(f"{mode}: R&B weights within {target} (max abs, worst seed and round) of exact "
                   f"at {at}.")  # fmt: skip
    return " ".join(out)


def write_md(summary, timing, env, setup, elapsed) -> None:
    lines = [
        "# Projected vs sketch vs exact statistics on real gradients (CPU)",
        "",
        "Produced by `python benchmarks/bench_projection_error.py` "
        f"({elapsed:.0f} s); per-round rows in `projection_error_cpu.csv`.",
        "",
        f"- machine: {env['hardware']} (shared; timings are medians of interleaved runs)",
        f"- torch {env['torch']}, git {env['git_sha']}, {env['timestamp']}",
        *(f"- {k}: {v}" for k, v in setup.items()),
        "",
        "## Error vs exact, by proj_dim (sketch mode at the same state size)",
        "",
        "Mean and max over rounds x hash seeds.",
        "",
        format_summary(summary),
        "",
        reading(summary),
        "",
        "## Op time at the CPU GPT config",
        "",
        "`N=1024, K_in=256, K_out=8192, m=16` (every domain present), fp32, torch backend; the ops"
        " run round-robin, median of the repetitions. Each op includes its `dW = dyᵀ x`. The"
        " probe row is a 1 MiB `torch.zeros`: with 2 threads on a loaded shared machine every"
        " OpenMP parallel region waits for a scheduler slice, so ops made of several small"
        " parallel kernels pay that wait several times; the 1-thread column measures the work.",
        "",
        "| op | "
        + " | ".join(f"{t} thread(s): median ms (vs `dy.t().mm(x)`)" for t in timing)
        + " |",
        "|---|" + "---|" * len(timing),
    ]
    for k in next(iter(timing.values())):
        cells = [f"{tm[k]:.2f} ({tm[k] / tm['dy.t().mm(x)']:.2f}x)" for tm in timing.values()]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("")
    (RESULTS / "projection_error_cpu.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
