"""``flash_attention``: bidirectional (or causal) attention over packed varlen or dense batches.

Anatomy: validate -> resolve the backend once -> the ``llm2vec_fast::flash_attention_forward`` custom
op (with a fake implementation, so torch.compile and CUDA graphs see through it) whose autograd
formula is the ``llm2vec_fast::flash_attention_backward`` custom op. Both run the implementation that
``dispatch`` registered for the chosen backend. The dense layout is a view of the packed one with
equal lengths, so every backend implements only the packed layout.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..validation import (FLOAT32_MAX, FLOAT32_NORMAL_MIN, HEAD_DIMS, check_cu_seqlens, check_number,
                          check_same_device, check_same_dtype, check_tensor, dense_cu_seqlens)
from .dropout_seed import draw_seed, seed_value

OP = "flash_attention"


# ``window`` (0: none) and ``lse_grad`` come last, with defaults, so that calls written before them still work.
# ``lse_grad``: the lse output is differentiable (return_lse=True); otherwise it is a statistic for the backward.
@torch.library.custom_op("llm2vec_fast::flash_attention_forward", mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, causal: bool,
             softmax_scale: float, softcap: float, dropout_p: float, seed: Optional[Tensor],
             backend: str, window: int = 0, lse_grad: bool = False) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale,
                                                         softcap, dropout_p, seed_value(seed), window=window)


@_forward.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, backend, window=0,
      lse_grad=False):
    return q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::flash_attention_backward", mutates_args=())
def _backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, cu_seqlens: Tensor,
              max_seqlen: int, causal: bool, softmax_scale: float, softcap: float, dropout_p: float,
              seed: Optional[Tensor], backend: str, window: int = 0,
              dlse: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """``dlse`` (Hq, T) float32: the gradient of the loss with respect to the lse output, when it is used."""
    dq, dk, dv = dispatch.implementation(OP, backend).backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen,
                                                               causal, softmax_scale, softcap, dropout_p,
                                                               seed_value(seed), window=window, dlse=dlse)
    return dq, dk, dv


@_backward.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, backend,
      window=0, dlse=None):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)  # backends return contiguous


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, backend, window, lse_grad = inputs
    out, lse = output
    if not lse_grad:
        ctx.mark_non_differentiable(lse)  # a statistic for the backward, not a differentiable output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, seed)
    ctx.options = (max_seqlen, causal, softmax_scale, softcap, dropout_p)
    ctx.backend, ctx.window, ctx.lse_grad = backend, window, lse_grad


def _autograd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, seed = ctx.saved_tensors
    max_seqlen, causal, softmax_scale, softcap, dropout_p = ctx.options
    # d lse_i / d s_ij = P_ij, so dS = P * (dP - rowsum(dO * O) + dlse): every backend takes dlse off its delta.
    dlse = dlse.float() if ctx.lse_grad else None
    dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale,
                           softcap, dropout_p, seed, ctx.backend, ctx.window, dlse)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _validate(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, sliding_window):
    """Raises on bad input; returns the longest packed sequence's length when it was read."""
    packed = cu_seqlens is not None
    longest = None
    layout = "(T, H, D) with cu_seqlens" if packed else "(B, S, H, D) without cu_seqlens"
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
        if x.dim() != (3 if packed else 4):
            raise ValueError(f"{name} must be {layout}, got shape {tuple(x.shape)}")
    check_same_dtype(q=q, k=k, v=v)
    check_same_device(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    tokens = q.dim() - 2  # leading token dims: 1 (T) packed, 2 (B, S) dense
    if k.shape[:tokens] != q.shape[:tokens]:
        raise ValueError(f"k must have q's token dims {tuple(q.shape[:tokens])}, got {tuple(k.shape[:tokens])}")
    hq, head_dim = q.shape[-2], q.shape[-1]
    hkv = k.shape[-2]
    if k.shape[-1] != head_dim:
        raise ValueError(f"k must have q's head dim {head_dim}, got {k.shape[-1]}")
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head dim (q.shape[-1]) must be one of {HEAD_DIMS}, got {head_dim}")
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the query head count Hq={hq} must be a multiple of the key/value head count, got Hkv={hkv}")
    if packed:
        longest = check_cu_seqlens(cu_seqlens, q.shape[0], like=q)
        if max_seqlen is not None:
            check_number("max_seqlen", max_seqlen, low=0, integer=True)
            if longest is not None and max_seqlen < longest:
                raise ValueError(f"max_seqlen must be >= the longest sequence in cu_seqlens ({longest}), "
                                 f"got {max_seqlen}")
    elif max_seqlen is not None:
        raise ValueError(f"max_seqlen goes with cu_seqlens (packed layout); got max_seqlen={max_seqlen} "
                         f"without cu_seqlens")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if softmax_scale is not None:
        check_number("softmax_scale", softmax_scale, low=0, low_inclusive=False, high=FLOAT32_MAX)
    check_number("softcap", softcap, low=0, high=FLOAT32_MAX)
    if 0 < softcap < FLOAT32_NORMAL_MIN:  # the kernels divide by it in float32: as 0 there, NaN
        raise ValueError(f"softcap must be 0 (no cap) or >= {FLOAT32_NORMAL_MIN} (float32's smallest normal), "
                         f"got {softcap}")
    check_number("dropout_p", dropout_p, low=0, high=1, high_inclusive=False)
    if sliding_window is not None:
        check_number("sliding_window", sliding_window, low=1, integer=True)
    return longest


def flash_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Optional[Tensor] = None,
                    max_seqlen: Optional[int] = None, *, causal: bool = False, softmax_scale: Optional[float] = None,
                    softcap: float = 0.0, dropout_p: float = 0.0, sliding_window: Optional[int] = None,
                    return_lse: bool = False, backend: str = "auto"):
    """Attention without a causal mask unless ``causal=True``.

    Layouts: packed ``q`` (T, Hq, D), ``k``/``v`` (T, Hkv, D) with int32 ``cu_seqlens`` (B+1, from 0 to
    T) and ``max_seqlen``; or dense (B, S, H, D) with no cu_seqlens. Hq must be a multiple of Hkv (GQA,
    MQA); K and V are never repeated in memory. ``softmax_scale`` defaults to D**-0.5. ``softcap > 0``
    caps the scaled logits as ``softcap * tanh(s / softcap)`` (Gemma2). ``dropout_p`` drops attention
    probabilities (pass 0 in eval); the backward regenerates the forward's mask from a seed drawn from
    torch's default CPU generator (so ``torch.manual_seed`` makes it reproducible). Each backend draws
    its own mask from that seed (torch: torch's RNG; triton: philox). Zero-length sequences are
    allowed. Returns q's shape and dtype. fp32 inputs: full fp32 matrix work (no tf32) in every backend.
    ``sliding_window`` = w (an int >= 1) lets query i see key j only where |i - j| < w, on top of ``causal``
    (transformers' sliding layers, made symmetric without causality); a window no shorter than the longest
    sequence changes nothing. The cuda backend runs windowed calls on its Triton fallback.
    ``return_lse=True`` returns ``(out, lse)``: lse is each query row's softmax logsumexp (natural log, over
    the capped, scaled logits, before dropout), float32, (Hq, T) packed or (B, Hq, S) dense, flash-attn's
    ``softmax_lse`` layouts. Unlike flash-attn's, it is differentiable: a loss that uses it (merging partial
    attentions, ring attention) gets its true gradient. (The flash_attn backend's backward then runs on the
    Triton or torch backend, whose formulas take that gradient.)
    ``backend``: "auto", "torch", "triton", "cuda" or "flash_attn" (see ``llm2vec_fast.dispatch``).
    """
    longest = _validate(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, sliding_window)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__} {return_lse!r}")
    # flash-attn's dropout cannot be replayed from our seed: "auto" never picks it for dropout.
    backend = dispatch.resolve(OP, backend, q.device, cannot=("flash_attn",) if dropout_p > 0 else ())
    dense_shape = None
    if cu_seqlens is None:  # dense (B, S, H, D) is the packed layout with B equal lengths
        dense_shape = q.shape
        batch, seqlen = q.shape[:2]
        q, k, v = (x.reshape(batch * seqlen, *x.shape[2:]) for x in (q, k, v))
        cu_seqlens = torch.arange(batch + 1, device=q.device, dtype=torch.int32) * seqlen
        max_seqlen = seqlen
    else:
        if max_seqlen is None and longest is None:
            raise ValueError("max_seqlen must be given with cu_seqlens under torch.compile (it cannot be read "
                             "from the tensor while tracing), got None")
        # The true longest where known: a loose max_seqlen (a bound, as flash-attn takes it) would size the
        # grids and the torch backend's (B, H, max_seqlen, max_seqlen) scores by it.
        max_seqlen = longest if longest is not None else min(int(max_seqlen), q.shape[0])
        cu_seqlens = dense_cu_seqlens(cu_seqlens)
    scale = float(softmax_scale) if softmax_scale is not None else q.shape[-1] ** -0.5
    seed = draw_seed(dropout_p)
    # A window that reaches every key of the longest sequence is no window: 0 keeps the unwindowed kernels.
    window = int(sliding_window) if sliding_window is not None and sliding_window < max_seqlen else 0
    out, lse = _forward(q, k, v, cu_seqlens, int(max_seqlen), causal, scale, float(softcap), float(dropout_p), seed,
                        backend, window, return_lse)
    if dense_shape is not None:  # back to (B, S, Hq, D), and lse (Hq, B*S) to (B, Hq, S)
        out = out.reshape(dense_shape)
        lse = lse.reshape(lse.shape[0], dense_shape[0], dense_shape[1]).transpose(0, 1)
    return (out, lse) if return_lse else out
