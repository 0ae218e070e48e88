"""``rms_norm``: the decoder families' RMSNorm in one pass (a fused kernel where transformers runs several).

Anatomy as in ``ops/attention.py``: validate -> resolve the backend once -> the
``llm2vec_fast::rms_norm_forward`` custom op (fake implementation included), differentiated by the
``llm2vec_fast::rms_norm_backward`` custom op. Every backend sees rows: x as (N, D).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..reference.rms_norm import CASTING_MODES
from ..validation import (FLOAT32_MAX, FLOAT32_TINY, check_choice, check_last_dim, check_number,
                          check_same_device, check_tensor)

OP = "rms_norm"


@torch.library.custom_op("llm2vec_fast::rms_norm_forward", mutates_args=())
def _forward(x: Tensor, weight: Tensor, eps: float, offset: float, casting_mode: str,
             backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).forward(x, weight, eps, offset, casting_mode)


@_forward.register_fake
def _(x, weight, eps, offset, casting_mode, backend):
    return x.new_empty(x.shape), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::rms_norm_backward", mutates_args=())
def _backward(grad_y: Tensor, x: Tensor, weight: Tensor, rstd: Tensor, eps: float, offset: float, casting_mode: str,
              backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).backward(grad_y, x, weight, rstd, eps, offset, casting_mode)


@_backward.register_fake
def _(grad_y, x, weight, rstd, eps, offset, casting_mode, backend):
    return x.new_empty(x.shape), weight.new_empty(weight.shape)


def _setup_context(ctx, inputs, output):
    x, weight, eps, offset, casting_mode, backend = inputs
    ctx.mark_non_differentiable(output[1])  # rstd: a statistic for the backward
    ctx.save_for_backward(x, weight, output[1])
    ctx.options = (eps, offset, casting_mode, backend)


def _autograd_backward(ctx, grad_y, grad_rstd):
    x, weight, rstd = ctx.saved_tensors
    grad_x, grad_weight = _backward(grad_y.contiguous(), x, weight, rstd, *ctx.options)
    return grad_x, grad_weight, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, offset: float = 0.0, casting_mode: str = "llama",
             backend: str = "auto") -> Tensor:
    """RMSNorm over the last dim of ``x`` (any leading shape) with ``weight`` (D,): x's shape and dtype.

    rstd = 1 / sqrt(mean(x^2) + eps) in float32, n = x * rstd, and (the names are Liger-Kernel's):
    - ``casting_mode="llama"`` (Llama, Mistral, Qwen2/3, Phi-3): (offset + weight) * n.to(x.dtype);
    - ``casting_mode="gemma"`` (Gemma 1/2/3, with ``offset=1.0``): (n * (offset + weight.float())).to(x.dtype).
    Each equals transformers' module of that family (offset 0 for llama, 1 for gemma) to the rounding of
    the mean of squares. Differentiable in x and weight.
    """
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=(1,))
    check_last_dim("x", x, "D")  # D: the normalised dim
    if weight.shape[0] != x.shape[-1]:
        raise ValueError(f"weight must have x.shape[-1] = {x.shape[-1]} elements, got shape {tuple(weight.shape)}")
    check_same_device(x=x, weight=weight)
    check_number("eps", eps, low=FLOAT32_TINY, high=FLOAT32_MAX)  # used in float32: must not round to 0 or inf
    check_number("offset", offset, low=-FLOAT32_MAX, high=FLOAT32_MAX)
    check_choice("casting_mode", casting_mode, CASTING_MODES)
    backend = dispatch.resolve(OP, backend, x.device)
    rows = x.reshape(-1, x.shape[-1])
    y, _ = _forward(rows, weight, float(eps), float(offset), casting_mode, backend)
    return y.reshape(x.shape)
