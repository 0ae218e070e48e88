"""``pool``: sequence embeddings from last hidden states, straight from the packed or padded layout.

Anatomy as in ``ops/attention.py``: validate -> resolve -> ``llm2vec_fast::pool_forward`` custom op,
differentiated by the ``llm2vec_fast::pool_backward`` custom op.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import dispatch
from ..validation import check_choice, check_cu_seqlens, check_mask, check_tensor, dense_cu_seqlens

OP = "pool"
MODES = ("mean", "weighted_mean", "last_token", "eos_token", "bos_token")
_ALIASES = {"eos_token": "last_token"}


@torch.library.custom_op("llm2vec_fast::pool_forward", mutates_args=())
def _forward(hidden: Tensor, cu_seqlens: Optional[Tensor], attention_mask: Optional[Tensor],
             embed_mask: Optional[Tensor], mode: str, normalize: bool, backend: str) -> Tensor:
    return dispatch.implementation(OP, backend).forward(hidden, cu_seqlens, attention_mask, embed_mask, mode,
                                                         normalize)


@_forward.register_fake
def _(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize, backend):
    batch = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else hidden.shape[0]
    return hidden.new_empty((batch, hidden.shape[-1]), dtype=torch.float32)


@torch.library.custom_op("llm2vec_fast::pool_backward", mutates_args=())
def _backward(grad_out: Tensor, hidden: Tensor, cu_seqlens: Optional[Tensor], attention_mask: Optional[Tensor],
              embed_mask: Optional[Tensor], mode: str, normalize: bool, backend: str) -> Tensor:
    return dispatch.implementation(OP, backend).backward(grad_out, hidden, cu_seqlens, attention_mask, embed_mask,
                                                          mode, normalize)


@_backward.register_fake
def _(grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize, backend):
    return hidden.new_empty(hidden.shape)  # every backend returns a contiguous gradient


def _setup_context(ctx, inputs, output):
    hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize, backend = inputs
    ctx.save_for_backward(hidden, cu_seqlens, attention_mask, embed_mask)
    ctx.options = (mode, normalize, backend)


def _autograd_backward(ctx, grad_out):
    hidden, cu_seqlens, attention_mask, embed_mask = ctx.saved_tensors
    grad = _backward(grad_out.contiguous(), hidden, cu_seqlens, attention_mask, embed_mask, *ctx.options)
    return grad, None, None, None, None, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def _validate(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    check_tensor("hidden", hidden, ndim=(2, 3))
    if cu_seqlens is not None:
        if hidden.dim() != 2:
            raise ValueError(f"hidden must be packed (T, D) when cu_seqlens is given, got shape {tuple(hidden.shape)}")
        if attention_mask is not None:
            raise ValueError("attention_mask goes with the padded (B, S, D) layout; with cu_seqlens every token is "
                             "real, so pass attention_mask=None")
        check_cu_seqlens(cu_seqlens, hidden.shape[0], like=hidden)
    else:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be padded (B, S, D) without cu_seqlens, or packed (T, D) with "
                             f"cu_seqlens; got shape {tuple(hidden.shape)} and cu_seqlens=None")
        if attention_mask is not None:
            check_mask("attention_mask", attention_mask, hidden.shape[:2], hidden)
    if embed_mask is not None:
        check_mask("embed_mask", embed_mask, hidden.shape[:-1], hidden)
    check_choice("mode", mode, MODES)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")


def pool(hidden: Tensor, *, cu_seqlens: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
         embed_mask: Optional[Tensor] = None, mode: str = "mean", normalize: bool = False,
         backend: str = "auto") -> Tensor:
    """Pools each sequence's hidden states into one float32 vector: returns (B, D) float32.

    Layouts: packed ``hidden`` (T, D) with ``cu_seqlens``; or padded (B, S, D) with a 0/1
    ``attention_mask`` (B, S), padding on either side (no mask: every token is real).
    ``embed_mask`` (same layout as the tokens) marks the tokens to pool, e.g. the text without its
    instruction (llm2vec's ``skip_instruction``); absent, every real token is pooled.
    Modes: ``mean``; ``weighted_mean`` (weights 1..n over the pooled tokens in order, normalised to
    sum 1); ``last_token`` (alias ``eos_token``) and ``bos_token``: the sequence's last / first real
    token (embed_mask does not apply to these two). A sequence with nothing to pool gives zeros.
    ``normalize=True`` L2-normalises each output row.
    """
    _validate(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize)
    backend = dispatch.resolve(OP, backend, hidden.device)
    if cu_seqlens is not None:
        cu_seqlens = dense_cu_seqlens(cu_seqlens)
    return _forward(hidden, cu_seqlens, attention_mask, embed_mask, _ALIASES.get(mode, mode), normalize, backend)
