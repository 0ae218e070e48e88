"""``lora_linear``: a linear plus the LoRA term of its adapter, peft's forward, with the rank-r side fused.

Anatomy as in ``ops/attention.py``: validate -> resolve the backend once -> the
``llm2vec_fast::lora_linear_forward`` custom op (fake implementation included), differentiated by the
``llm2vec_fast::lora_linear_backward`` custom op (gradients of x, A and B; the base weight's and bias's, when
they train, are the plain matmul and sum, taken here). Every backend sees x as given and returns h, the branch's
(T, r) float32 input to B, which the backward keeps with x (no dropout mask, no copy of x).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..validation import (FLOAT32_MAX, check_last_dim, check_number, check_same_device, check_same_dtype,
                          check_tensor)
from .dropout_seed import draw_seed, seed_value

OP = "lora_linear"


@torch.library.custom_op("llm2vec_fast::lora_linear_forward", mutates_args=())
def _forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_a: Tensor, lora_b: Tensor, scale: float,
             dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).forward(x, weight, bias, lora_a, lora_b, scale, dropout_p,
                                                        seed_value(seed))


@_forward.register_fake
def _(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend):
    rows = x.numel() // x.shape[-1]
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, lora_a.shape[0]), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::lora_linear_backward", mutates_args=())
def _backward(grad: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, h: Tensor, scale: float,
              dropout_p: float, seed: Optional[Tensor], backend: str, need_dx: bool) -> Tuple[Tensor, Tensor, Tensor]:
    return dispatch.implementation(OP, backend).backward(grad, x, weight, lora_a, lora_b, h, scale, dropout_p,
                                                         seed_value(seed), need_dx=need_dx)


@_backward.register_fake
def _(grad, x, weight, lora_a, lora_b, h, scale, dropout_p, seed, backend, need_dx):
    return x.new_empty(x.shape if need_dx else (0,)), lora_a.new_empty(lora_a.shape), lora_b.new_empty(lora_b.shape)


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scale, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1], seed)
    ctx.options = (scale, dropout_p, backend)


def _autograd_backward(ctx, grad, _grad_h):
    x, weight, lora_a, lora_b, h, seed = ctx.saved_tensors
    scale, dropout_p, backend = ctx.options
    grad = grad.contiguous()
    need_dx = ctx.needs_input_grad[0]  # not for a first layer's input: no (T, in) product, no pass over dx
    grad_x, grad_a, grad_b = _backward(grad, x, weight, lora_a, lora_b, h, scale, dropout_p, seed, backend, need_dx)
    grad_x = grad_x if need_dx else None
    grad_weight = grad_bias = None
    rows = grad.reshape(-1, grad.shape[-1])
    if ctx.needs_input_grad[1]:  # the base weight trains (it is frozen under LoRA): F.linear's gradient
        grad_weight = rows.t().mm(x.reshape(-1, x.shape[-1]))
    if ctx.needs_input_grad[2]:
        grad_bias = rows.sum(0)
    return grad_x, grad_weight, grad_bias, grad_a, grad_b, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p) -> None:
    check_tensor("x", x)
    check_last_dim("x", x, "in_features")
    check_tensor("weight", weight, ndim=(2,))
    check_tensor("lora_a", lora_a, ndim=(2,))
    check_tensor("lora_b", lora_b, ndim=(2,))
    if bias is not None:
        check_tensor("bias", bias, ndim=(1,))
    check_same_dtype(x=x, weight=weight, bias=bias)
    check_same_dtype(lora_a=lora_a, lora_b=lora_b)
    check_same_device(x=x, weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)
    out_features, in_features = weight.shape
    rank = lora_a.shape[0]
    if in_features != x.shape[-1]:
        raise ValueError(f"weight must be (out_features, {x.shape[-1]}) for x's last dim {x.shape[-1]}, got "
                         f"{tuple(weight.shape)}")
    if out_features == 0:
        raise ValueError(f"weight must be (out_features >= 1, {in_features}), got {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != out_features:
        raise ValueError(f"bias must be ({out_features},), got {tuple(bias.shape)}")
    if rank < 1 or lora_a.shape[1] != in_features:
        raise ValueError(f"lora_a must be (rank >= 1, {in_features}), got {tuple(lora_a.shape)}")
    if tuple(lora_b.shape) != (out_features, rank):
        raise ValueError(f"lora_b must be ({out_features}, {rank}), got {tuple(lora_b.shape)}")
    check_number("scaling", scaling, low=-FLOAT32_MAX, high=FLOAT32_MAX)
    check_number("dropout_p", dropout_p, low=0.0, high=1.0, high_inclusive=False)


def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scaling: float,
                bias: Optional[Tensor] = None, dropout_p: float = 0.0, *, backend: str = "auto") -> Tensor:
    """A linear with a LoRA adapter, as peft's ``lora.Linear`` computes it:
    ``(x @ weight^T + bias + scaling * dropout(x.to(lora_a's dtype)) @ lora_a^T @ lora_b^T).to(x's dtype)``.

    ``x`` (..., in); ``weight`` (out, in) and ``bias`` (out,) in x's dtype; ``lora_a`` (r, in) and ``lora_b``
    (out, r) in the adapter's dtype (float32 under peft's autocast, or x's). The branch's sum with the base output
    is taken in the promoted dtype and rounded once, as peft rounds it. ``dropout_p`` drops elements of the
    branch's input (pass 0 in eval); its mask is drawn from a seed taken from torch's default CPU generator (so
    ``torch.manual_seed`` and checkpointing's RNG replay reproduce it), and each backend draws its own mask from
    that seed (torch: torch's RNG; triton: philox, regenerated in the backward rather than kept).

    Differentiable in x, lora_a, lora_b, and weight and bias where they require grad (x's gradient is not computed
    where x requires none: a first layer's input). Kept for the backward:
    x and the branch's (T, r) float32 middle, not x's cast copy, the mask or x after dropout. The triton backend
    adds the branch in place into the base linear's output and into its gradient of x (each element read and
    written once), in float32 products; ranks above ``llm2vec_fast.kernels.lora.MAX_RANK`` (64) run the torch
    reference. ``backend``: "auto", "torch" or "triton" (see ``llm2vec_fast.dispatch``).
    """
    _validate(x, weight, bias, lora_a, lora_b, scaling, dropout_p)
    backend = dispatch.resolve(OP, backend, x.device)
    out, _ = _forward(x, weight, bias, lora_a, lora_b, float(scaling), float(dropout_p), draw_seed(dropout_p),
                      backend)
    return out
