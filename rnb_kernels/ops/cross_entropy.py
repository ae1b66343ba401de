"""Row-wise softmax cross-entropy on one chunk of logits: the loss and, in place, its gradient.

These are the two per-chunk steps of :func:`rnb_kernels.integrations.fused_ce.
fused_linear_cross_entropy`, which never holds more than one ``[chunk, V]`` block of logits:

* :func:`cross_entropy_rows`: ``loss_n = lse_n - z_{n, t_n}`` and ``lse_n = logsumexp(z_n)``
  (both float32, whatever the logits' dtype);
* :func:`cross_entropy_rows_grad_`: overwrites the logits with ``dz_n = scale_n (softmax(z_n) -
  onehot(t_n))``, using the ``lse`` saved by the forward (one read and one write of the chunk).

Rows whose target is ``ignore_index`` get loss 0 and gradient 0. Backends: ``"torch"`` and
``"triton"`` (one program per row, streaming over ``V`` in fp32 registers).
"""

from __future__ import annotations

import torch

from . import _validate as V
from ._dispatch import get_impl, resolve_backend

__all__ = ["cross_entropy_rows", "cross_entropy_rows_grad_"]


def cross_entropy_rows_torch(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()
    lse = torch.logsumexp(z, dim=1)
    valid = targets != ignore_index
    picked = z.gather(1, torch.where(valid, targets, 0)[:, None])[:, 0]
    return torch.where(valid, lse - picked, 0.0), lse


def cross_entropy_rows_grad_torch(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
) -> None:
    valid = targets != ignore_index
    g = torch.exp(logits.float() - lse[:, None])
    g.scatter_add_(1, torch.where(valid, targets, 0)[:, None], -valid.float()[:, None])
    g.mul_(torch.where(valid, scale, 0.0)[:, None])
    logits.copy_(g)


def _check(logits, targets, name_lse=None, lse=None, scale=None) -> None:
    V.check_tensor(logits, "logits", ndim=2, dtypes=V.FLOAT_DTYPES)
    V.check_tensor(targets, "targets", ndim=1, dtypes=V.ID_DTYPES)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} entries but logits has {logits.shape[0]} rows"
        )
    V.check_same_device(logits, "logits", targets=targets)
    for name, t in ((name_lse, lse), ("scale", scale)):
        if t is None:
            continue
        V.check_tensor(t, name, ndim=1, dtypes=(torch.float32,))
        if t.shape[0] != logits.shape[0]:
            raise ValueError(f"{name} has {t.shape[0]} entries but logits has {logits.shape[0]}")
        V.check_same_device(logits, "logits", **{name: t})


@torch.library.custom_op("rnb::cross_entropy_rows", mutates_args=())
def _ce_rows_op(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    return get_impl("cross_entropy_rows", backend)(logits, targets, ignore_index)


@_ce_rows_op.register_fake
def _(logits, targets, ignore_index, backend):
    n = logits.shape[0]
    return logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("rnb::cross_entropy_rows_grad_", mutates_args=("logits",))
def _ce_grad_op(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    backend: str,
) -> None:
    get_impl("cross_entropy_rows_grad_", backend)(logits, targets, lse, scale, ignore_index)


@_ce_grad_op.register_fake
def _(logits, targets, lse, scale, ignore_index, backend):
    return None


def cross_entropy_rows(
    logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy and log-sum-exp of one chunk of logits.

    Args:
        logits: ``[n, V]`` float16 / bfloat16 / float32 / float64 (float64: torch backend).
        targets: int32/int64 ``[n]`` in ``[0, V)`` or ``ignore_index`` (values not checked
            here: :func:`~rnb_kernels.integrations.fused_ce.fused_linear_cross_entropy` checks
            them once per call).
        ignore_index: target value of rows that get loss 0.
        backend: ``"auto"`` (triton on GPU tensors when installed, else torch), ``"torch"``,
            ``"triton"``.

    Returns:
        ``(loss, lse)``: float32 ``[n]`` each; ``loss`` is 0 on ignored rows.

    Example:
        >>> z, t = torch.tensor([[0.0, 1.0], [2.0, 0.0]]), torch.tensor([1, -100])
        >>> loss, lse = cross_entropy_rows(z, t)
        >>> torch.allclose(loss, torch.tensor([torch.log1p(torch.exp(torch.tensor(-1.0))), 0.0]))
        True
    """
    _check(logits, targets)
    V.check_int(ignore_index, "ignore_index")
    be = resolve_backend("cross_entropy_rows", backend, logits.device)
    if be != "torch" and logits.dtype == torch.float64:
        raise TypeError(f"logits: float64 is supported by backend='torch' only, not {be!r}")
    return _ce_rows_op(logits, targets, ignore_index, be)


def cross_entropy_rows_grad_(
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor:
    """Overwrite ``logits`` with the gradient of ``Σ_n scale_n · loss_n`` with respect to them.

    ``dz[n, v] = scale_n · (exp(z[n, v] - lse_n) - [v == t_n])``, computed in float32 and stored
    in the logits' dtype; ignored rows become 0.

    Args:
        logits: ``[n, V]`` contiguous rows (``stride(1) == 1``), overwritten.
        targets: int32/int64 ``[n]``.
        lse: float32 ``[n]`` from :func:`cross_entropy_rows` on the same logits.
        scale: float32 ``[n]`` per-row weight (``grad_output``, divided by the number of
            counted rows for a mean).
        ignore_index, backend: as in :func:`cross_entropy_rows`.

    Returns:
        ``logits`` (now holding the gradient).

    Example:
        >>> z = torch.randn(3, 5, requires_grad=True)
        >>> t = torch.tensor([0, 4, 2])
        >>> torch.nn.functional.cross_entropy(z, t, reduction="sum").backward()
        >>> _, lse = cross_entropy_rows(z.detach(), t)
        >>> dz = cross_entropy_rows_grad_(z.detach().clone(), t, lse, torch.ones(3))
        >>> torch.allclose(dz, z.grad, atol=1e-6)
        True
    """
    _check(logits, targets, "lse", lse, scale)
    V.check_int(ignore_index, "ignore_index")
    if logits.stride(1) != 1 and logits.shape[1] > 1:
        raise ValueError("logits must have contiguous rows (stride(1) == 1); it is overwritten")
    be = resolve_backend("cross_entropy_rows_grad_", backend, logits.device)
    if be != "torch" and logits.dtype == torch.float64:
        raise TypeError(f"logits: float64 is supported by backend='torch' only, not {be!r}")
    _ce_grad_op(logits, targets, lse, scale, ignore_index, be)
    return logits
