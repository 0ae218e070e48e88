"""Reference LoRA linear: peft's expression, the torch backend of ``lora_linear`` and the formula the kernels of
``kernels/lora.py`` are tested against.

    out = (x @ W^T + bias + B(A(dropout(x.to(A's dtype)))) * scaling).to(x's dtype)

with ``A`` (r, in) and ``B`` (out, r) the adapter's weights: the branch in the adapter's dtype, the sum in the
promoted dtype, rounded once to x's dtype. The backward is written out as autograd runs peft's graph:
gs = g.to(A's dtype) * scaling; dB = gs^T h; dh = gs B; dA = dh^T dropout(x); the branch's dx =
(mask * (dh A) / (1 - p)) rounded to x's dtype, added to the base linear's g W. The dropout mask is torch's RNG
seeded with ``seed`` (or ``keep``, given: a kernel's mask, for tests).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .attention import dropout_keep_mask


def _dropped(x: Tensor, dtype: torch.dtype, dropout_p: float, seed: int, keep: Optional[Tensor]) -> Tensor:
    """dropout(x.to(dtype)) as (T, in) rows, as torch's dropout scales the kept values."""
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    if dropout_p == 0:
        return rows
    if keep is None:
        keep = dropout_keep_mask(rows.shape, dropout_p, seed, rows.device)
    return rows * (keep.to(dtype) * (1.0 / (1.0 - dropout_p)))


def lora_linear_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor,
                        scale: float, dropout_p: float = 0.0, seed: int = 0, keep: Optional[Tensor] = None):
    """(out, h): out as peft computes it, h = dropout(x) @ A^T (T, r) widened to float32 (kept for the backward;
    float64 stays float64)."""
    h = F.linear(_dropped(x, lora_a.dtype, dropout_p, seed, keep), lora_a)
    out = _add_branch(F.linear(x, weight, bias), h, lora_b, scale)
    return out, h.to(torch.promote_types(h.dtype, torch.float32))


def lora_linear_backward(grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, h: Tensor,
                         scale: float, dropout_p: float = 0.0, seed: int = 0, keep: Optional[Tensor] = None,
                         need_dx: bool = True):
    """(dx, dA, dB) of :func:`lora_linear_forward`'s out; dx is an empty tensor unless ``need_dx``."""
    g = grad.reshape(-1, grad.shape[-1])
    dtype = lora_a.dtype
    if dropout_p > 0 and keep is None:  # the forward's mask, drawn once for both of its uses here
        keep = dropout_keep_mask((g.shape[0], x.shape[-1]), dropout_p, seed, g.device)
    scaled = g.to(dtype) * scale
    grad_b = scaled.t().mm(h.to(dtype))
    dh = scaled.mm(lora_b)
    grad_a = dh.t().mm(_dropped(x, dtype, dropout_p, seed, keep))
    if not need_dx:
        return x.new_empty(0), grad_a, grad_b
    branch = dh.mm(lora_a)
    if dropout_p > 0:  # dropout's backward: the same mask and scale
        branch = branch * (keep.to(dtype) * (1.0 / (1.0 - dropout_p)))
    dx = g.mm(weight) + branch.to(x.dtype)
    return dx.view(x.shape), grad_a, grad_b


def lora_down(x: Tensor, a: Tensor) -> Tensor:
    """h = x @ a^T, in a's dtype (x cast to it first, as peft casts it)."""
    return F.linear(x.to(a.dtype), a)


def _add_branch(result: Tensor, h: Tensor, b: Tensor, scale: float) -> Tensor:
    """``(result + lora_B(h) * scaling).to(result's dtype)``, h as (T, r) rows: the sum in the promoted dtype,
    rounded once (a new tensor)."""
    return (result + (F.linear(h, b) * scale).view(result.shape)).to(result.dtype)


def lora_add(result: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """peft's ``result + lora_B(lora_A(x)) * scaling`` without dropout, in result's dtype (a new tensor)."""
    return _add_branch(result, lora_down(x, a), b, scale)
