"""dtype -> tolerance table, used by every kernel test (one place to read and to change).

Outputs are compared with the float64 reference computed on the *same* (already rounded)
inputs, so what is left is accumulation error and the rounding of the output itself. Errors
are measured relative to the scale of the reference, ``max(|ref|, 1)``.
"""

from __future__ import annotations

import torch

# dtype of the output -> (rtol, atol as a fraction of the reference's scale)
TOL: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
# fp32 accumulators of per-domain sums: products of 16-bit inputs are exact in fp32, so the
# accumulators meet fp32 tolerance whatever the input dtype.
ACC_DTYPE = torch.float32


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    """Assert ``out`` matches the float64 ``ref`` within ``TOL[dtype]`` (scaled)."""
    rtol, atol = TOL[dtype]
    # On the host: brute-force references are built on the CPU while GPU backends answer on the
    # device, and the comparison is about values, not placement.
    ref = ref.detach().to("cpu", torch.float64)
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0)
    torch.testing.assert_close(
        out.detach().to("cpu", torch.float64), ref, rtol=rtol, atol=atol * scale,
        msg=lambda m: f"{what}: {m}",
    )  # fmt: skip


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so a kernel that skips a write cannot pass."""
    return t.fill_(float("nan"))


# Unit roundoff of the arithmetic a result is accumulated in.
EPS = {torch.float64: 2.0**-53, torch.float32: 2.0**-24}


def exact_products(a: torch.Tensor, b: torch.Tensor | None = None):
    """``A Bᵀ`` and ``|A| |B|ᵀ`` in x87 extended precision (64-bit mantissa, numpy longdouble):
    a reference ~2000x more accurate than float64, so float64 results can be held to float64
    tolerance. ``a [m, P]``, ``b [r, P]`` (default ``a``); returns two float64 ``[m, r]``."""
    import numpy as np

    a_ = a.detach().double().cpu().numpy().astype(np.longdouble)
    b_ = a_ if b is None else b.detach().double().cpu().numpy().astype(np.longdouble)
    prod = a_ @ b_.T
    mag = np.abs(a_) @ np.abs(b_).T
    return torch.from_numpy(prod.astype(np.float64)), torch.from_numpy(mag.astype(np.float64))


def assert_dot_close(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype, what: str = ""
) -> None:
    """Per-entry bound on a Gram-type product ``out ≈ A Bᵀ`` accumulated in ``acc``:

    ``|out_ij - (A Bᵀ)_ij| <= c · sqrt(P) · eps(acc) · (|A| |B|ᵀ)_ij``

    i.e. each entry against its own magnitude (the classical dot-product error bound with the
    statistical sqrt(P) growth and a safety factor c = 8), never against the diagonal or the
    largest entry of the matrix, so a small off-diagonal entry is held to its own precision.
    """
    ref, mag = exact_products(a, b)
    out = out.detach().double().cpu().reshape(ref.shape)
    p = a.shape[1]
    bound = 8.0 * max(p, 1) ** 0.5 * EPS[acc] * mag + 1e-300
    err = (out - ref).abs()
    worst = float((err / bound).max()) if err.numel() else 0.0
    assert worst <= 1.0, (
        f"{what}: entry error up to {worst:.3g}x the {acc} per-entry bound "
        f"(max abs error {float(err.max()):.3g})"
    )
