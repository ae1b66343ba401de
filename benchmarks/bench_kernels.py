"""Kernel benchmark: segmented_wgrad (exact), domain_sketch, domain_projection and gram against
their anchors.

Providers, all timed in the same run on the same tensors:

* ``triton`` / ``cuda`` — the public op with that backend (each only where it can run:
  ``cuda`` when ``rnb.backends()["cuda"]`` is available and the op has a CUDA kernel,
  ``triton`` on a GPU or under ``TRITON_INTERPRET=1``, whose timings are not performance).
* ``torch`` — the public op with ``backend="torch"`` (the reference backend).
* ``torch-index_add`` — the same on CPU tensors with the folds forced through ``index_add_``
  (``rnb_kernels.ops.cpu_fold.index_add_folds``): the A/B of the compiled CPU folds, for the
  sketch and projected ops, where ``rnb_kernels._cpu`` is built.
* ``cublas`` — plain ``dy.T @ x``: the untracked weight gradient, **the floor** (on the CPU
  this is torch's CPU BLAS, kept under the same name so CSVs line up). For ``gram`` it is
  ``a @ a.T`` in the input dtype; the gram floor is the copy-bandwidth time instead.
* ``loop`` — a per-domain Python loop of masked GEMMs (what one would write by hand).

Reported per row: median ms, TFLOP/s, GB/s (minimal traffic), ``ratio_to_floor`` and the
performance target for that shape as ``target_ms`` / ``target_ratio``. The targets: the exact
op may cost 15% over the plain GEMM plus the unavoidable read-modify-write of the touched
accumulators, the sketch and the projection 10% over the plain GEMM, and the Gram product must
stream ``A`` at 80% of the measured copy bandwidth:

* exact: ``1.15 x (floor + accumulator read-modify-write bytes / copy bandwidth)``;
* sketch, projected (``proj_dim = 128``): ``1.10 x floor``;
* gram: ``(bytes of A read once) / (0.8 x copy bandwidth)``, with the copy-bandwidth time as
  its floor.

Timing and environment columns come from :mod:`rnb_kernels.experiments.harness`: on the CPU
the providers of one shape run interleaved round-robin, so the ratios survive a loaded machine.

Usage (with the package installed or importable)::

    python benchmarks/bench_kernels.py                          # full GPU grid
    python benchmarks/bench_kernels.py --quick --device cpu     # tiny shapes, any machine
    python benchmarks/bench_kernels.py --ops exact --layers gpt2-lm_head --m 64 --dtypes bf16

Rows are appended to ``kernels_{gpu,cpu}.csv`` in the results directory (``--out``, else
``benchmarks/results`` of the checkout, else ``./benchmark_results``); ``benchmarks/plot.py``
draws them.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

import rnb_kernels as rnb
from rnb_kernels.experiments.harness import (
    append_csv,
    copy_bandwidth,
    environment,
    markdown_table,
    median_ms_group,
    results_csv,
)
from rnb_kernels.ops._dispatch import has_impl
from rnb_kernels.ops.cpu_fold import compiled_folds, index_add_folds
from rnb_kernels.ops.sketch_hash import sketch_hash

# (K_in, K_out) of a tracked linear layer y = x Wᵀ.
LAYERS = {
    "gpt2-lm_head": (768, 50257),  # GPT-2 small output head
    "llama-2048x8192": (2048, 8192),  # LLaMA-style MLP up-projection
    "llama-4096x4096": (4096, 4096),  # LLaMA-7B-style attention projection
}
# cpu-head: the LM head of `rnb bench overhead --preset cpu` (the CPU target configuration).
LAYERS_QUICK = {"mini-head": (128, 4096), "mini-mlp": (256, 1024), "cpu-head": (256, 8192)}
TOKENS, TOKENS_QUICK = [2048, 16384, 65536], [512, 2048]
DOMAINS, DOMAINS_QUICK = [4, 16, 64, 256], [4, 16, 64]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
OPS = ["exact", "sketch", "projected", "gram"]
WGRAD_OPS = ("exact", "sketch", "projected")
PROVIDERS = ["triton", "cuda", "torch", "torch-index_add", "cublas", "loop"]
_OP_NAME = {
    "exact": "segmented_wgrad", "sketch": "domain_sketch", "projected": "domain_projection",
    "gram": "gram",
}  # fmt: skip
TARGET = {"exact": 1.15, "sketch": 1.10, "projected": 1.10, "gram": 1 / 0.8}
PROJ_DIM = 128  # domain_projection's default
IGNORED_SHARE = 0.05  # tokens with id -1 (padding, prompts)


def available_providers(op: str, device: torch.device, wanted: list[str]) -> list[str]:
    out = []
    for p in wanted:
        if p in ("triton", "cuda"):
            status = rnb.backends()[p]
            if not status.available or not has_impl(_OP_NAME[op], p):
                continue
            if p == "cuda" and device.type != "cuda":
                continue
        if p == "torch-index_add" and not (
            device.type == "cpu" and op in ("sketch", "projected") and compiled_folds()
        ):
            continue
        if p == "loop" and op in ("gram", "projected"):
            continue
        out.append(p)
    return out


def make_ids(n: int, m: int, device) -> torch.Tensor:
    ids = torch.randint(0, m, (n,), device=device)
    ids[torch.rand(n, device=device) < IGNORED_SHARE] = -1
    return ids


def wgrad_fns(op, x, dy, ids, m, state, sketch_dim) -> dict[str, Callable[[], object]]:
    """One zero-argument callable per provider for the exact or sketch op."""
    k_out, k_in = dy.shape[1], x.shape[1]

    def public(backend):
        if op == "exact":
            return lambda: rnb.ops.segmented_wgrad(x, dy, ids, m, state, backend=backend)
        if op == "projected":
            return lambda: rnb.ops.domain_projection(x, dy, ids, m, state, backend=backend)
        return lambda: rnb.ops.domain_sketch(x, dy, ids, m, state, backend=backend)

    def index_add():
        with index_add_folds():
            return public("torch")()

    def loop():
        dw = dy.T @ x
        if op == "sketch":
            bucket, sign = sketch_hash(k_out, k_in, sketch_dim, 0, 0, x.device, torch.float32)
            bucket, sign = bucket.reshape(-1), sign.reshape(-1)
        for d in range(m):
            rows = ids == d
            if not bool(rows.any()):
                continue
            tile = dy[rows].T.float() @ x[rows].float()
            if op == "exact":
                state[d] += tile
            else:
                state[d].index_add_(0, bucket, tile.reshape(-1) * sign)
        return dw

    return {
        "triton": public("triton"),
        "cuda": public("cuda"),
        "torch": public("torch"),
        "torch-index_add": index_add,
        "cublas": lambda: dy.T @ x,
        "loop": loop,
    }


def bench_wgrad(args, device, copy_bw, env) -> list[dict]:
    rows = []
    layers = LAYERS_QUICK if args.quick else LAYERS
    for layer in args.layers or layers:
        k_in, k_out = layers[layer]
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            es = torch.finfo(dtype).bits // 8
            for n in args.tokens or (TOKENS_QUICK if args.quick else TOKENS):
                x = torch.randn(n, k_in, device=device).to(dtype)
                dy = torch.randn(n, k_out, device=device).to(dtype)
                flops = 2 * n * k_out * k_in
                base_bytes = n * (k_in + k_out) * es + k_out * k_in * es
                for m in args.m or (DOMAINS_QUICK if args.quick else DOMAINS):
                    ids = make_ids(n, m, device)
                    present = int(torch.unique(ids[ids >= 0]).numel())
                    for op in [o for o in args.ops if o in WGRAD_OPS]:
                        shape = {
                            "exact": (m, k_out, k_in),
                            "sketch": (m, args.sketch_dim),
                            "projected": (m, PROJ_DIM, k_in),
                        }[op]
                        state_bytes = 4 * torch.Size(shape).numel()
                        if state_bytes > args.max_state_gb * 2**30:
                            print(f"skip {op} {layer} m={m}: state {state_bytes / 2**30:.1f} GiB")
                            continue
                        state = torch.zeros(shape, dtype=torch.float32, device=device)
                        fns = wgrad_fns(op, x, dy, ids, m, state, args.sketch_dim)
                        provs = available_providers(op, device, args.providers)
                        # The floor is timed in the same group as the providers it divides.
                        times = median_ms_group(
                            {p: fns[p] for p in dict.fromkeys([*provs, "cublas"])},
                            device,
                            rep_ms=args.rep_ms,
                        )
                        floor_ms = times["cublas"]
                        if op == "exact":
                            rmw = present * k_out * k_in * 4 * 2
                            target_ms = TARGET[op] * (floor_ms + rmw / copy_bw * 1e3)
                        else:
                            rmw = 0
                            target_ms = TARGET[op] * floor_ms
                        for prov in provs:
                            ms = times[prov]
                            rows.append(
                                {
                                    **env,
                                    "op": op, "layer": layer, "K_in": k_in, "K_out": k_out,
                                    "tokens": n, "m": m, "present": present, "dtype": dname,
                                    "provider": prov, "ms": ms,
                                    "tflops": flops / (ms / 1e3) / 1e12,
                                    "gbps": (base_bytes + rmw) / (ms / 1e3) / 1e9,
                                    "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms,
                                    "target_ms": target_ms,
                                    "target_ratio": target_ms / floor_ms,
                                    "meets_target": ms <= target_ms,
                                    "copy_gbps": copy_bw / 1e9,
                                }
                            )  # fmt: skip
                        del state
                        print(f"done {op} {layer} {dname} N={n} m={m}", flush=True)
    return rows


def bench_gram(args, device, copy_bw, env) -> list[dict]:
    rows = []
    layers = LAYERS_QUICK if args.quick else LAYERS
    for layer in args.layers or layers:
        k_in, k_out = layers[layer]
        p = k_in * k_out
        for dname in args.gram_dtypes:
            dtype = DTYPES[dname]
            es = torch.finfo(dtype).bits // 8
            for m in args.m or (DOMAINS_QUICK if args.quick else DOMAINS):
                if m * p * es > args.max_state_gb * 2**30:
                    print(f"skip gram {layer} m={m}: A is {m * p * es / 2**30:.1f} GiB")
                    continue
                a = torch.randn(m, p, device=device).to(dtype)
                nbytes = m * p * es
                floor_ms = nbytes / copy_bw * 1e3  # one read of A at copy bandwidth
                target_ms = TARGET["gram"] * floor_ms
                fns = {
                    "triton": lambda a=a: rnb.ops.gram(a, backend="triton"),
                    "cuda": lambda a=a: rnb.ops.gram(a, backend="cuda"),
                    "torch": lambda a=a: rnb.ops.gram(a, backend="torch"),
                    "cublas": lambda a=a: a @ a.T,
                }
                provs = available_providers("gram", device, args.providers)
                times = median_ms_group({p: fns[p] for p in provs}, device, rep_ms=args.rep_ms)
                for prov in provs:
                    ms = times[prov]
                    rows.append(
                        {
                            **env,
                            "op": "gram", "layer": layer, "K_in": k_in, "K_out": k_out,
                            "tokens": "", "m": m, "present": m, "dtype": dname,
                            "provider": prov, "ms": ms,
                            "tflops": 2 * m * m * p / (ms / 1e3) / 1e12,
                            "gbps": nbytes / (ms / 1e3) / 1e9,
                            "floor_ms": floor_ms, "ratio_to_floor": ms / floor_ms,
                            "target_ms": target_ms, "target_ratio": TARGET["gram"],
                            "meets_target": ms <= target_ms,
                            "copy_gbps": copy_bw / 1e9,
                        }
                    )  # fmt: skip
                del a
                print(f"done gram {layer} {dname} m={m}", flush=True)
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU-sized)")
    ap.add_argument("--ops", nargs="+", default=OPS, choices=OPS)
    ap.add_argument("--providers", nargs="+", default=PROVIDERS, choices=PROVIDERS)
    ap.add_argument("--layers", nargs="+", help="subset of layer names (default: all)")
    ap.add_argument("--tokens", nargs="+", type=int)
    ap.add_argument("--m", nargs="+", type=int)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    ap.add_argument(
        "--gram-dtypes", nargs="+", default=["fp32"], choices=list(DTYPES),
        help="gram runs over the fp32 accumulators by default",
    )  # fmt: skip
    ap.add_argument("--sketch-dim", type=int, default=None, help="default 8192 (1024 quick)")
    ap.add_argument("--rep-ms", type=float, default=None, help="timing budget per measurement")
    ap.add_argument("--max-state-gb", type=float, default=None, help="skip larger acc / A")
    ap.add_argument("--out", type=Path, help="results directory (default benchmarks/results)")
    ap.add_argument("--csv", type=Path, help="append rows to this file instead")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.sketch_dim is None:
        args.sketch_dim = 1024 if args.quick else 8192
    if args.rep_ms is None:
        args.rep_ms = 40.0 if args.quick else 100.0
    if args.max_state_gb is None:
        if torch.device(args.device).type == "cuda":
            total = torch.cuda.get_device_properties(torch.device(args.device)).total_memory
            args.max_state_gb = 0.45 * total / 2**30
        else:
            args.max_state_gb = 2.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    env = environment(device)
    copy_bw = copy_bandwidth(device, (1 << 30) if device.type == "cuda" else (1 << 26))
    where = (
        f"{env['hardware']} ({env['threads']} threads)" if device.type == "cpu" else env["hardware"]
    )
    print(f"{where}: copy bandwidth {copy_bw / 1e9:.1f} GB/s", flush=True)
    rows = []
    if set(WGRAD_OPS) & set(args.ops):
        rows += bench_wgrad(args, device, copy_bw, env)
    if "gram" in args.ops:
        rows += bench_gram(args, device, copy_bw, env)
    cols = ["op", "layer", "tokens", "m", "dtype", "provider", "ms", "tflops", "gbps",
            "ratio_to_floor", "target_ratio", "meets_target"]  # fmt: skip
    print(markdown_table(rows, cols))
    if rows and not args.no_save:
        path = append_csv(args.csv or results_csv("kernels", device, args.out), rows)
        print(f"appended {len(rows)} rows to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
