"""Reference rotary position embedding (RoPE) of q and k, as transformers' ``apply_rotary_pos_emb`` computes it.

Layout (what every backend receives): q (T, Hq, D) and k (T, Hkv, D) with a unit-stride last dim (token and
head strides free: the halves of a fused qkv projection are read where they lie); cos and sin (T, R), R even
and at most D, rows of unit stride. The first R dims of every head are rotated, the rest pass through (Phi-3's
partial rotary). With h = R / 2, for column j < R:

    partner p = j + h (j < h) or j - h (j >= h),  sign = -1 (j < h) or +1 (j >= h)   (rotate_half(x)[j] = sign x[p])
    forward:   y[j]  = round(round(x[j] cos[j]) + round(sign x[p] sin[j]))
    backward: dx[j]  = round(round(g[j] cos[j]) - round(sign g[p] sin[p]))

where round is the rounding to the input dtype. The forward rounds as transformers' ``q * cos + rotate_half(q)
* sin`` does in that dtype (each product, then the sum), bit for bit; the backward as autograd does through that
expression (each product, then the sum of the two contributions). With transformers' cos and sin (two copies of
the same R / 2 frequencies) sin[p] = sin[j], and the backward is the forward rotation by the opposite angle.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def rotate_half(x: Tensor) -> Tensor:
    """(-x2, x1) for the halves x1, x2 of the last dim."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x rotated by (cos, sin) over its first R dims, rounded as transformers rounds it."""
    width = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # (T, 1, R): the same angles for every head
    rotated = x[..., :width] * cos + rotate_half(x[..., :width]) * sin
    return rotated if width == x.shape[-1] else torch.cat((rotated, x[..., width:]), dim=-1)


def _unrotate(grad: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The gradient of :func:`_rotate` with respect to x, as autograd rounds it through that expression."""
    width = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    head = grad[..., :width]
    by_sin_first, by_sin_second = (head * sin).chunk(2, dim=-1)
    # rotate_half's transpose: d x1 gets (g sin)2, d x2 gets -(g sin)1
    turned = head * cos + torch.cat((by_sin_second, -by_sin_first), dim=-1)
    return turned if width == grad.shape[-1] else torch.cat((turned, grad[..., width:]), dim=-1)


def rotary_forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, out_q: Optional[Tensor] = None,
                   out_k: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(q, k) rotated; written into ``out_q`` / ``out_k`` when given (which may be q and k themselves)."""
    rotated_q, rotated_k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if out_q is not None:
        rotated_q = out_q.copy_(rotated_q)
    if out_k is not None:
        rotated_k = out_k.copy_(rotated_k)
    return rotated_q, rotated_k


def rotary_backward(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
    """(d q, d k), contiguous, in the gradients' dtypes."""
    return _unrotate(grad_q, cos, sin).contiguous(), _unrotate(grad_k, cos, sin).contiguous()
