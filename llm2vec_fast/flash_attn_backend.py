"""``backend="flash_attn"`` for ``flash_attention``: the optional flash-attn package's varlen kernels.

Registered only when ``flash_attn`` is importable (CUDA). It follows the same forward/backward
contract as the other backends. flash-attn draws its dropout mask from its own RNG state, which our
seed cannot replay, so this backend accepts ``dropout_p == 0`` only (use ``"triton"`` for dropout).
The private functions' keyword names changed across flash-attn 2.x releases, so arguments are passed
by the names the installed version declares. Its backward drops the gradient of the lse output, so a
backward that needs it (``flash_attention(..., return_lse=True)``) runs on ``dispatch.fallback``.
"""
import inspect

import torch

from . import dispatch


def _interface():
    from flash_attn import flash_attn_interface

    return flash_attn_interface


def _call(fn, **named):
    """Calls a flash-attn private function with the arguments its signature knows, by name."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:  # flash-attn < 2.6: one tuple
        named["window_size"] = (named.get("window_size_left", -1), named.get("window_size_right", -1))
    return fn(**{name: value for name, value in named.items() if name in params})


def _check_dropout(dropout_p):
    if dropout_p > 0:
        raise ValueError(f"backend='flash_attn' supports dropout_p=0 only (its dropout RNG cannot be replayed "
                         f"from llm2vec_fast's seed), got dropout_p={dropout_p}; use backend='triton' or 'torch'")


def _window_sizes(causal, window):
    """flash-attn's (left, right) window for |i - j| < window (and j <= i when causal); -1: unbounded."""
    if not window:
        return -1, -1
    return window - 1, 0 if causal else window - 1


def forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, window=0):
    _check_dropout(dropout_p)
    left, right = _window_sizes(causal, window)
    result = _call(_interface()._flash_attn_varlen_forward, q=q, k=k, v=v, cu_seqlens_q=cu_seqlens,
                   cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, dropout_p=0.0,
                   softmax_scale=softmax_scale, causal=causal, window_size_left=left, window_size_right=right,
                   softcap=softcap, alibi_slopes=None, return_softmax=False)
    out, lse = result[0], result[1]
    return out, lse.float()


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed,
             window=0, dlse=None):
    _check_dropout(dropout_p)
    if dlse is not None:  # flash-attn's backward drops the lse gradient: the Triton (or torch) one takes it
        return dispatch.fallback("flash_attention").backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal,
                                                             softmax_scale, softcap, dropout_p, seed, window=window,
                                                             dlse=dlse)
    left, right = _window_sizes(causal, window)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _call(_interface()._flash_attn_varlen_backward, dout=dout, q=q, k=k, v=v, out=out, softmax_lse=lse, dq=dq,
          dk=dk, dv=dv, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens, max_seqlen_q=max_seqlen,
          max_seqlen_k=max_seqlen, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, window_size_left=left,
          window_size_right=right, softcap=softcap, alibi_slopes=None, deterministic=True, rng_state=None)
    return dq, dk, dv
