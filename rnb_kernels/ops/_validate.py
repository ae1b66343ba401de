"""Argument checks shared by every public op.

Two kinds of check live here. Metadata checks (types, shapes, dtypes, devices) work on fake
tensors too, so the public wrappers run them before entering the custom op and they survive
``torch.compile``. Value checks (id range, finiteness) need the data, so they run inside the op
body, still before any accumulator is touched.
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
ID_DTYPES = (torch.int32, torch.int64)


def check_tensor(t, name: str, *, ndim: int | None = None, dtypes=None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    return t


def check_int(v, name: str, *, low: int | None = None, high: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if low is not None and v < low:
        raise ValueError(f"{name} must be >= {low}, got {v}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {v}")
    return v


def check_same_device(ref: torch.Tensor, ref_name: str, **others: torch.Tensor) -> None:
    for name, t in others.items():
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def check_wgrad_inputs(x, dy, domain_ids, num_domains) -> None:
    """Metadata checks for ``x [N, K_in]``, ``dy [N, K_out]``, ``domain_ids [N]``."""
    check_tensor(x, "x", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(dy, "dy", ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(domain_ids, "domain_ids", ndim=1, dtypes=ID_DTYPES)
    check_int(num_domains, "num_domains", low=1)
    if dy.dtype != x.dtype:
        raise TypeError(f"dy has dtype {dy.dtype} but x has {x.dtype}; they must match")
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"dy has {dy.shape[0]} rows but x has {x.shape[0]}; they must match")
    if domain_ids.shape[0] != x.shape[0]:
        raise ValueError(
            f"domain_ids has {domain_ids.shape[0]} entries but x has {x.shape[0]} rows"
        )
    check_same_device(x, "x", dy=dy, domain_ids=domain_ids)


def check_accumulator(acc, name: str, shape: tuple[int, ...], like: torch.Tensor) -> None:
    """An in-place fp32 accumulator: exact shape, float32, contiguous, on ``like``'s device."""
    check_tensor(acc, name, dtypes=(torch.float32,))
    if tuple(acc.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(acc.shape)}")
    if not acc.is_contiguous():
        raise ValueError(f"{name} must be contiguous (it is updated in place)")
    check_same_device(like, "x", **{name: acc})


def check_id_values(domain_ids: torch.Tensor, num_domains: int) -> None:
    """Ids must lie in [-1, num_domains). Costs one reduction (and a sync on GPU)."""
    if domain_ids.numel() == 0:
        return
    lo, hi = torch.aminmax(domain_ids)
    lo, hi = int(lo), int(hi)
    if lo < -1 or hi >= num_domains:
        raise ValueError(
            f"domain_ids must lie in [-1, num_domains={num_domains}), found values in [{lo}, {hi}]"
        )


def check_finite_tensor(name: str, t: torch.Tensor) -> None:
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or Inf")


def check_distinct_index(index: torch.Tensor, name: str, size: int) -> None:
    """``index`` (int64 ``[h]``) holds distinct values in ``[0, size)`` (a value check)."""
    if index.numel():
        lo, hi = torch.aminmax(index)
        if int(lo) < 0 or int(hi) >= size or index.unique().numel() != index.numel():
            raise ValueError(f"{name} must hold distinct rows in [0, {size})")


def check_values(x, dy, domain_ids, num_domains: int, check_ids: bool, check_finite: bool) -> None:
    """The value checks of the segmented ops, run inside the op before any state is written."""
    if check_ids:
        check_id_values(domain_ids, num_domains)
    if check_finite:
        check_finite_tensor("x", x)
        check_finite_tensor("dy", dy)
