"""Triton ``domain_sketch``: the weight-gradient GEMM with each domain's tile count-sketched.

This is :mod:`.segmented_wgrad`'s kernel specialised with ``SKETCH=True``: the same
domain-grouped main loop (rows gathered through a stable argsort, one fp32 segment tile in
registers, ``dW`` accumulated alongside), but at each domain boundary the segment tile is
folded into ``sketch[d]`` instead of a dense accumulator:

* element ``(i, j)`` goes to the bucket and sign of :mod:`rnb_kernels.ops.sketch_hash`, evaluated in
  wrapping ``tl.uint32`` arithmetic (bit-identical to the torch backend; the row half of the
  hash is computed once per program, the per-element half only at flushes);
* buckets are scattered across the whole ``[k]`` row, so several programs hit the same bucket:
  the fold is a relaxed ``tl.atomic_add`` (fp32 sums in nondeterministic order; within fp32
  tolerance of the float64 reference, not bit-reproducible).

Cost beyond the GEMM: ``K_out * K_in`` hash evaluations and atomics per present domain; no
``[m, K_out, K_in]`` memory at all.
"""

from __future__ import annotations

import torch
import triton

from ..sketch_hash import key_base
from .segmented_wgrad import _gpu_configs, _segmented_wgrad_kernel, launch_segmented

# One main loop for both variants; ``SKETCH`` is a constexpr, so each compiles only its flush.
_domain_sketch_kernel = _segmented_wgrad_kernel

# The sketch is small ([m, k] fp32), so autotuning can snapshot and restore it between trials.
_domain_sketch_tuned = triton.autotune(
    configs=_gpu_configs(), key=["K_OUT", "K_IN"], restore_value=["out_ptr"]
)(_domain_sketch_kernel)


def domain_sketch_triton(
    x: torch.Tensor,
    dy: torch.Tensor,
    domain_ids: torch.Tensor,
    num_domains: int,
    sketch: torch.Tensor,
    seed: int,
    layer: int,
    row_offset: int = 0,
) -> torch.Tensor:
    """Triton backend of :func:`rnb_kernels.ops.domain_sketch` (inputs already validated).

    Args:
        x: ``[N, K_in]`` float32 / float16 / bfloat16, any strides.
        dy: ``[N, K_out]``, same dtype and device.
        domain_ids: int32/int64 ``[N]`` in ``[-1, num_domains)``.
        num_domains: ``m``.
        sketch: float32 contiguous ``[m, k]``; ``sketch[d, bucket(i, j)] += sign(i, j) *
            (Σ_{n∈d} dy_nᵀ x_n)[i, j]`` in place.
        seed, layer: hash key in ``[0, 2**32)``.
        row_offset: global index of row 0 (a row shard of a larger weight); the kernel hashes
            row ``i`` as ``row_offset + i`` (``ROW_OFFSET``).

    Returns:
        ``dW = dyᵀ x`` over all rows, ``[K_out, K_in]`` in ``x.dtype``.

    Example (CPU, ``TRITON_INTERPRET=1`` set before Triton is imported):
        >>> from rnb_kernels.ops.reference import domain_sketch_ref
        >>> x, dy, ids = torch.randn(6, 5), torch.randn(6, 4), torch.tensor([0, 1, 1, -1, 0, 1])
        >>> s = torch.zeros(2, 16)
        >>> dw = domain_sketch_triton(x, dy, ids, 2, s, seed=3, layer=1)
        >>> torch.allclose(s.double(), domain_sketch_ref(x, dy, ids, 2, 16, 3, 1)[1], atol=1e-5)
        True
    """
    return launch_segmented(
        x,
        dy,
        domain_ids,
        num_domains,
        sketch,
        sketch=True,
        key_base=key_base(seed, layer),
        row_offset=row_offset,
        tuned=_domain_sketch_tuned,
    )
