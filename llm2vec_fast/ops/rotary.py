"""``rotary_embedding``: RoPE of q and k in one pass (transformers' ``apply_rotary_pos_emb`` runs about ten).

Anatomy as in ``ops/attention.py``: validate -> resolve the backend once -> the
``llm2vec_fast::rotary_embedding_forward`` custom op (fake implementation included), differentiated by the
``llm2vec_fast::rotary_embedding_backward`` custom op; ``inplace=True`` runs
``llm2vec_fast::rotary_embedding_inplace``, which rotates q and k where they lie (inference). Every backend sees
token rows: q (T, Hq, D), k (T, Hkv, D), cos and sin (T, R); see ``reference/rotary.py`` for the formulas.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..validation import check_same_device, check_same_dtype, check_tensor, check_writable

OP = "rotary_embedding"


@torch.library.custom_op("llm2vec_fast::rotary_embedding_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).forward(q, k, cos, sin)


@_forward.register_fake
def _(q, k, cos, sin, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape)


@torch.library.custom_op("llm2vec_fast::rotary_embedding_inplace", mutates_args=("q", "k"))
def _forward_inplace(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, backend: str) -> None:
    dispatch.implementation(OP, backend).forward(q, k, cos, sin, out_q=q, out_k=k)


@torch.library.custom_op("llm2vec_fast::rotary_embedding_backward", mutates_args=())
def _backward(grad_q: Tensor, grad_k: Tensor, cos: Tensor, sin: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).backward(grad_q, grad_k, cos, sin)


@_backward.register_fake
def _(grad_q, grad_k, cos, sin, backend):
    return grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)


def _setup_context(ctx, inputs, output):
    q, k, cos, sin, backend = inputs
    ctx.save_for_backward(cos, sin)  # the rotation is linear: its backward needs the angles only
    ctx.backend = backend


def _autograd_backward(ctx, grad_q, grad_k):
    cos, sin = ctx.saved_tensors
    grad_q, grad_k = _backward(grad_q.contiguous(), grad_k.contiguous(), cos, sin, ctx.backend)
    return grad_q, grad_k, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _check_shapes(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> None:
    if q.dim() < 3:
        raise ValueError(f"q must be (..., Hq, D) with at least one token dim, got shape {tuple(q.shape)}")
    tokens, dim = q.shape[:-2], q.shape[-1]
    if k.dim() != q.dim() or k.shape[:-2] != tokens or k.shape[-1] != dim:
        raise ValueError(f"k must be (..., Hkv, D) with q's token dims {tuple(tokens)} and D = {dim}, got shape "
                         f"{tuple(k.shape)}")
    if cos.shape[:-1] != tokens or cos.dim() != q.dim() - 1:
        raise ValueError(f"cos must be (..., R) with q's token dims {tuple(tokens)}, got shape {tuple(cos.shape)}")
    if sin.shape != cos.shape:
        raise ValueError(f"sin must have cos's shape {tuple(cos.shape)}, got {tuple(sin.shape)}")
    if q.shape[-2] == 0 or k.shape[-2] == 0:
        raise ValueError(f"q and k must have at least one head each, got shapes {tuple(q.shape)} and "
                         f"{tuple(k.shape)}")
    width = cos.shape[-1]
    if width % 2 or not 0 < width <= dim:
        raise ValueError(f"cos and sin must have an even width R with 0 < R <= D = {dim} (the rotated dims), got "
                         f"R = {width}")


def _token_rows(name: str, x: Tensor, heads: int, inplace: bool) -> Tensor:
    """x as (T, H, D) with a unit-stride last dim: a view (inplace: or ValueError), else a copy where needed."""
    if inplace:
        try:
            rows = x.view(-1, heads, x.shape[-1])
        except RuntimeError:
            rows = None
        if rows is None or x.stride(-1) != 1:
            raise ValueError(f"inplace=True needs {name}'s token dims to merge into one and a unit-stride last dim "
                             f"(it is written in place), got shape {tuple(x.shape)} and strides {x.stride()}")
        return rows
    rows = x.reshape(-1, heads, x.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def rotary_embedding(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, *, inplace: bool = False,
                     backend: str = "auto") -> Tuple[Tensor, Tensor]:
    """(q, k) rotated by the angles (cos, sin), as transformers' ``apply_rotary_pos_emb(q, k, cos, sin)``
    computes it in their dtype (each product rounded, then the sum), in token-major layout:

    - q (..., Hq, D) and k (..., Hkv, D), the same token dims ``...`` (T packed, or B, S);
    - cos and sin (..., R) for those tokens (what a family's rotary embedding returns), R even and at most D:
      the first R dims of each head are rotated (``rotate_half`` over them), the rest pass through (Phi-3's
      partial rotary). All four share one dtype and device.

    Differentiable in q and k (the backward keeps only cos and sin; cos and sin get no gradient, and must not
    require one). ``inplace=True`` rotates q and k where they lie and returns them (no gradients).
    """
    for name, x in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_tensor(name, x)
    _check_shapes(q, k, cos, sin)
    check_same_dtype(q=q, k=k, cos=cos, sin=sin)
    check_same_device(q=q, k=k, cos=cos, sin=sin)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} {inplace!r}")
    grad = torch.is_grad_enabled()
    if grad and (cos.requires_grad or sin.requires_grad):
        raise ValueError("cos and sin get no gradient from rotary_embedding: they must not require grad (compute "
                         "them under torch.no_grad(), or detach them)")
    if inplace and grad and (q.requires_grad or k.requires_grad):
        raise ValueError("inplace=True computes no gradients: q and k must not require grad while grad mode is on "
                         "(use inplace=False for training)")
    backend = dispatch.resolve(OP, backend, q.device)
    q_rows = _token_rows("q", q, q.shape[-2], inplace)
    k_rows = _token_rows("k", k, k.shape[-2], inplace)
    width = cos.shape[-1]
    cos_rows, sin_rows = (t.reshape(-1, width) for t in (cos, sin))
    cos_rows, sin_rows = (t if t.stride(-1) == 1 else t.contiguous() for t in (cos_rows, sin_rows))
    if inplace:
        check_writable({"q": q_rows, "k": k_rows}, {"cos": cos_rows, "sin": sin_rows})
        _forward_inplace(q_rows, k_rows, cos_rows, sin_rows, backend)
        return q, k
    rotated_q, rotated_k = _forward(q_rows, k_rows, cos_rows, sin_rows, backend)
    return rotated_q.view(q.shape), rotated_k.view(k.shape)
