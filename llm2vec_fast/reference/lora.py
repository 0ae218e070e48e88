"""Reference LoRA term of a linear without gradients: peft's expression, which the fused kernels of
``kernels/lora.py`` (used by the lean layers when encoding with an unmerged adapter) are tested against.

    out = (result + B(A(x.to(A's dtype))) * scaling).to(result's dtype)

with ``A`` (r, in) and ``B`` (out, r) the adapter's weights: the products and their sums in the adapter's dtype,
the sum with the result in the promoted dtype, rounded once to the result's dtype.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def lora_down(x: Tensor, a: Tensor) -> Tensor:
    """h = x @ a^T, in a's dtype (x cast to it first, as peft casts it)."""
    return F.linear(x.to(a.dtype), a)


def lora_add(result: Tensor, x: Tensor, a: Tensor, b: Tensor, scale: float) -> Tensor:
    """peft's ``result + lora_B(lora_A(x)) * scaling`` without dropout, in result's dtype (a new tensor)."""
    return (result + F.linear(lora_down(x, a), b) * scale).to(result.dtype)
