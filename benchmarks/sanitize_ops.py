"""Small calls of every GPU kernel, for ``compute-sanitizer`` (memcheck, racecheck, ...).

Each op runs on both GPU backends (where it has a kernel) and every input dtype, on shapes
that reach the kernels' edge paths: rows not a multiple of a tile, misaligned and 16-byte
aligned rows, absent domains, ``-1`` rows, a bias column, a projection's ``row_offset``. Every
result is also compared with the float64 reference, so a run that the sanitizer passes has
computed the right thing too. Exits non-zero on any mismatch.

Usage (on a machine with a GPU and ``rnb_kernels._C`` built)::

    compute-sanitizer --tool memcheck --error-exitcode 9 python benchmarks/sanitize_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 9 python benchmarks/sanitize_ops.py \\
        --backends cuda
"""

from __future__ import annotations

import argparse
import sys

import torch

import rnb_kernels as rnb
from rnb_kernels.ops import domain_projection, domain_sketch, gram, segmented_wgrad
from rnb_kernels.ops._dispatch import has_impl
from rnb_kernels.ops.reference import (
    domain_projection_ref,
    domain_sketch_ref,
    gram_ref,
    segmented_wgrad_ref,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (N, K_in, K_out, m): odd sizes, 16-byte aligned rows, one domain, many absent domains.
SHAPES = [(37, 33, 70, 3), (256, 128, 256, 5), (129, 64, 1000, 17), (5, 8, 16, 1)]
GRAM = [(1, 7), (5, 4099), (65, 1000)]


def _close(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error relative to ``max(|ref|, 1)``."""
    ref = ref.double()
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0)
    return float((out.double() - ref).abs().max()) / scale if ref.numel() else 0.0


def run(backends: list[str], dtypes: list[str], dev: str = "cuda") -> list[str]:
    fails: list[str] = []
    gen = torch.Generator(device=dev).manual_seed(0)

    def check(what: str, err: float, tol: float) -> None:
        status = "ok" if err <= tol else "MISMATCH"
        print(f"{status:8s} {what}: max rel err {err:.2e} (tol {tol:.0e})", flush=True)
        if err > tol:
            fails.append(what)

    for backend in backends:
        for dname in dtypes:
            dt = DTYPES[dname]
            tol = 2e-2 if dt != torch.float32 else 1e-4
            for n, k_in, k_out, m in SHAPES:
                x = torch.randn(n, k_in, device=dev, generator=gen).to(dt)
                dy = torch.randn(n, k_out, device=dev, generator=gen).to(dt)
                ids = torch.randint(-1, m, (n,), device=dev, generator=gen)
                tag = f"{backend} {dname} N{n} Kin{k_in} Kout{k_out} m{m}"
                if has_impl("segmented_wgrad", backend):
                    acc = torch.zeros(m, k_out, k_in, device=dev)
                    bias_acc = torch.zeros(m, k_out, device=dev)
                    dw, _ = segmented_wgrad(x, dy, ids, m, acc, backend=backend, bias_acc=bias_acc)
                    rdw, racc = segmented_wgrad_ref(x, dy, ids, m)
                    check(f"segmented_wgrad {tag} dW", _close(dw, rdw), tol)
                    check(f"segmented_wgrad {tag} acc", _close(acc, racc), 1e-4)
                if has_impl("domain_sketch", backend):
                    k = 257
                    sk = torch.zeros(m, k, device=dev)
                    domain_sketch(
                        x, dy, ids, m, sketch=sk, seed=3, layer=1, backend=backend,
                        bias=True,
                    )  # fmt: skip
                    _, ref = domain_sketch_ref(x, dy, ids, m, k, seed=3, layer=1, bias=True)
                    check(f"domain_sketch {tag}", _close(sk, ref), 1e-4)
                if has_impl("domain_projection", backend):
                    pr = torch.zeros(m, 16, k_in + 1, device=dev)
                    domain_projection(
                        x, dy, ids, m, proj=pr, proj_dim=16, seed=5, layer=2,
                        row_offset=77, backend=backend, bias=True,
                    )  # fmt: skip
                    _, ref = domain_projection_ref(
                        x, dy, ids, m, proj_dim=16, seed=5, layer=2, row_offset=77, bias=True
                    )
                    check(f"domain_projection {tag}", _close(pr, ref), 1e-4)
            if has_impl("gram", backend):
                for m, p in GRAM:
                    a = torch.randn(m, p, device=dev, generator=gen).to(dt)
                    b = torch.randn(3, p, device=dev, generator=gen).to(dt)
                    tag = f"{backend} {dname} m{m} P{p}"
                    check(f"gram {tag}", _close(gram(a, backend=backend), gram_ref(a)), 1e-5)
                    check(
                        f"gram rows {tag}",
                        _close(gram(a, b, backend=backend), gram_ref(a, b)),
                        1e-5,
                    )
    if dev == "cuda":
        torch.cuda.synchronize()
    return fails


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", nargs="+", default=["cuda", "triton"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    # cpu: a dry run of this script (Triton under TRITON_INTERPRET=1), nothing to sanitize.
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("sanitize_ops: needs a CUDA device")
        return 2
    usable = []
    for b in args.backends:
        st = rnb.backends()[b]
        if st.available:
            usable.append(b)
        else:
            print(f"skipping backend {b}: {st.reason}")
    fails = run(usable, args.dtypes, args.device)
    print(f"sanitize_ops: {len(fails)} mismatches over backends {usable}")
    return 1 if fails or not usable else 0


if __name__ == "__main__":
    sys.exit(main())
