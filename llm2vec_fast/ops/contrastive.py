"""``contrastive_loss``: in-batch InfoNCE over cosine scores with hard negatives, never storing B x N.

Anatomy as in ``ops/attention.py``. The custom op ``llm2vec_fast::infonce_forward`` computes one
direction (anchors against candidates, label i -> candidate label_offset + i) and returns per-anchor
losses and logsumexps; ``llm2vec_fast::infonce_backward`` recomputes score tiles for the gradient.
``gather=True`` under torch.distributed all-gathers the candidates (and, for the symmetric term, the
queries) with gradient; each rank differentiates its own anchors' share of the global loss.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..distributed import gather_rows, global_value, is_distributed
from ..validation import FLOAT32_MAX, check_number, check_same_device, check_same_dtype, check_tensor

OP = "contrastive_loss"


@torch.library.custom_op("llm2vec_fast::infonce_forward", mutates_args=())
def _forward(anchors: Tensor, candidates: Tensor, label_offset: int, scale: float,
             backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).forward(anchors, candidates, label_offset, scale)


@_forward.register_fake
def _(anchors, candidates, label_offset, scale, backend):
    rows = anchors.shape[0]
    return anchors.new_empty((rows,), dtype=torch.float32), anchors.new_empty((rows,), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::infonce_backward", mutates_args=())
def _backward(grad_rows: Tensor, anchors: Tensor, candidates: Tensor, lse: Tensor, label_offset: int,
              scale: float, backend: str) -> Tuple[Tensor, Tensor]:
    grad_anchors, grad_candidates = dispatch.implementation(OP, backend).backward(
        grad_rows, anchors, candidates, lse, label_offset, scale)
    return grad_anchors, grad_candidates


@_backward.register_fake
def _(grad_rows, anchors, candidates, lse, label_offset, scale, backend):
    return anchors.new_empty(anchors.shape), candidates.new_empty(candidates.shape)


def _setup_context(ctx, inputs, output):
    anchors, candidates, label_offset, scale, backend = inputs
    ctx.mark_non_differentiable(output[1])  # lse: a statistic for the backward
    ctx.save_for_backward(anchors, candidates, output[1])
    ctx.options = (label_offset, scale, backend)


def _autograd_backward(ctx, grad_rows, grad_lse):
    anchors, candidates, lse = ctx.saved_tensors
    grad_anchors, grad_candidates = _backward(grad_rows.contiguous(), anchors, candidates, lse, *ctx.options)
    return grad_anchors, grad_candidates, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _validate(q, d_pos, d_neg, scale, symmetric, gather):
    check_tensor("q", q, ndim=(2,))
    check_tensor("d_pos", d_pos, ndim=(2,))
    if d_neg is not None:
        check_tensor("d_neg", d_neg, ndim=(2,))
    check_same_dtype(q=q, d_pos=d_pos, d_neg=d_neg)
    check_same_device(q=q, d_pos=d_pos, d_neg=d_neg)
    if d_pos.shape != q.shape:
        raise ValueError(f"d_pos must have q's shape {tuple(q.shape)} (one positive per query), got "
                         f"{tuple(d_pos.shape)}")
    if d_neg is not None and d_neg.shape[1] != q.shape[1]:
        raise ValueError(f"d_neg must have q's embedding dim {q.shape[1]}, got shape {tuple(d_neg.shape)}")
    check_number("scale", scale, low=0, low_inclusive=False, high=FLOAT32_MAX)
    for name, flag in (("symmetric", symmetric), ("gather", gather)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")


def _direction(anchors, candidates, label_offset, total_anchors, scale, backend):
    """This rank's share of mean_i CE(scale * cos(anchor_i, candidates), label_offset + i)."""
    row_loss, _ = _forward(anchors, candidates, label_offset, float(scale), backend)
    return row_loss.sum() / total_anchors


def contrastive_loss(q: Tensor, d_pos: Tensor, d_neg: Optional[Tensor] = None, *, scale: float = 20.0,
                     symmetric: bool = False, gather: bool = True, backend: str = "auto") -> Tensor:
    """In-batch contrastive (InfoNCE) loss with cosine scores; returns a float32 scalar.

    With d = [d_pos; d_neg] (d_neg may have any number of rows, or be None):
    ``s[i, j] = scale * cos(q_i, d_j)`` and ``loss = mean_i CE(s[i, :], label i)``. ``symmetric=True``
    averages that with the document->query loss ``mean_i CE(scale * cos(d_pos_i, q_:), label i)``.
    The B x N score matrix is never stored. Under torch.distributed with ``gather=True``, q, d_pos and
    d_neg are all-gathered with gradient (row counts may differ across ranks): every rank returns the
    loss of the concatenated batch, and each input's gradient equals that of one process holding it.
    Defaults follow llm2vec: scale 20 (SimCSE, temperature 0.05); its supervised recipe uses 50.
    """
    _validate(q, d_pos, d_neg, scale, symmetric, gather)
    backend = dispatch.resolve(OP, backend, q.device)
    if gather:
        if d_neg is None and is_distributed():  # every rank must join the same collectives
            d_neg = d_pos.new_empty((0, d_pos.shape[1]))
        d_pos_all, offset, total = gather_rows(d_pos)
        d_neg_all = gather_rows(d_neg)[0] if d_neg is not None else None
    else:
        d_pos_all, offset, total = d_pos, 0, d_pos.shape[0]
        d_neg_all = d_neg
    if total == 0:
        raise ValueError("q must have at least one row (over all ranks), got 0")
    candidates = d_pos_all if d_neg_all is None or d_neg_all.shape[0] == 0 else torch.cat([d_pos_all, d_neg_all])
    loss = _direction(q, candidates, offset, total, scale, backend)
    if symmetric:
        q_all = gather_rows(q)[0] if gather else q
        loss = 0.5 * (loss + _direction(d_pos, q_all, offset, total, scale, backend))
    return global_value(loss) if gather else loss
