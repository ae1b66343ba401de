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
    ref = ref.to(torch.float64)
    scale = max(float(ref.abs().max()) if ref.numel() else 0.0, 1.0)
    torch.testing.assert_close(
        out.to(torch.float64), ref, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}"
    )


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so a kernel that skips a write cannot pass."""
    return t.fill_(float("nan"))
