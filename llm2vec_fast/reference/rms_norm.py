"""Reference RMSNorm, forward and backward, in both casting modes of the model families.

For a row x of D values: rstd = 1 / sqrt(mean(x^2) + eps) and n = x * rstd, in float32. Then
- ``casting_mode="llama"`` (Llama, Mistral, Qwen2/3, Phi-3): y = (offset + w) * round(n), where round
  casts n to x's dtype before the weight multiplies it (transformers' ``weight * n.to(input_dtype)``);
- ``casting_mode="gemma"`` (Gemma 1/2/3, whose weight is stored as w - 1, offset 1): y = n * (offset + w)
  all in float32, rounded once.
y has x's dtype. The product is taken in float32 and rounded once: for offset 0 and a weight in x's dtype
that is the very product transformers' forward computes, bit for bit.

Backward (the rounding is the identity for the gradient, as autograd treats a cast):
    dw = sum over rows of dy * round(n) (llama) or dy * n (gemma),
    g = dy * (offset + w),   dx = rstd * (g - n * mean(g * n)).
"""
from __future__ import annotations

import torch
from torch import Tensor

CASTING_MODES = ("llama", "gemma")


def _normalized(x: Tensor, eps: float):
    x32 = x.float()
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return x32 * rstd, rstd


def _weighted(normed: Tensor, dtype: torch.dtype, casting_mode: str) -> Tensor:
    """n as the weight sees it: rounded to x's dtype first in llama mode."""
    return normed.to(dtype).float() if casting_mode == "llama" else normed


def rms_norm_forward(x: Tensor, weight: Tensor, eps: float, offset: float, casting_mode: str):
    """x (N, D), weight (D,) -> (y (N, D) in x's dtype, rstd (N,) float32)."""
    normed, rstd = _normalized(x, eps)
    y = (_weighted(normed, x.dtype, casting_mode) * (weight.float() + offset)).to(x.dtype)
    return y, rstd.squeeze(-1)


def rms_norm_backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, eps: float, offset: float,
                      casting_mode: str):
    """(dx like x, dw like weight), by the formulas in the module docstring (rstd as the forward saved it)."""
    rstd = rstd.unsqueeze(-1)
    normed = x.float() * rstd
    grad = grad_y.float()
    grad_weight = (grad * _weighted(normed, x.dtype, casting_mode)).sum(0)
    grad_normed = grad * (weight.float() + offset)
    grad_x = rstd * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    return grad_x.to(x.dtype), grad_weight.to(weight.dtype)
