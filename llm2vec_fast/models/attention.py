"""The ``"llm2vec_fast"`` attention implementation for transformers 5 models.

Importing this module registers, under the name :data:`ATTN_IMPLEMENTATION`:
- :func:`llm2vec_fast_attention` in transformers' ``AttentionInterface`` (what the attention
  modules call), running :func:`llm2vec_fast.flash_attention`;
- :func:`padding_mask` in ``AttentionMaskInterface`` (what the model's mask builders call): it
  hands the 2D padding mask through (None without padding), since the kernel takes lengths, not a
  dense mask.

The attention function takes the inputs the families' attention modules pass to every
implementation (``query`` (B, Hq, S, D), ``key``/``value`` (B, Hkv, S, D), ``attention_mask``,
``dropout``, ``scaling``, ``sliding_window``, ``softcap``) and picks a layout:
- packed: ``cu_seq_lens_q`` / ``max_length_q`` in the kwargs (transformers' padding-free
  convention; B must be 1), or a single row whose ``position_ids`` restart;
- padded: a 2D (B, S) padding mask; the real tokens are gathered, attended as a packed batch and
  scattered back (padding rows come back as zeros);
- dense: no mask, B equal-length sequences.
A 4D mask is rejected: the kernel cannot take an arbitrary mask (use "eager" or "sdpa" for those).

Causality is the module's ``is_causal`` (or an ``is_causal`` kwarg), so a model that was not made
bidirectional stays causal. Dropout is what the module passes (its ``attention_dropout`` in training,
0 in eval). The kernel backend is ``"auto"`` unless :func:`set_attention_backend` chose another.

Sliding windows: a layer with ``sliding_window=w`` lets query i see key j only where |i - j| < w
(and j <= i when causal): the causal window made symmetric, and what transformers' flash-attention
path does for non-causal windows. The kernels take the window (``flash_attention(sliding_window=w)``,
visiting only the tiles it reaches); the torch backend runs :func:`windowed_attention` (plain PyTorch,
banded: O(S * w) memory, where its reference would pad to (S, S)). For sequences of at most w tokens the
window changes nothing and is dropped.

Batch invariance: attention computes each sequence on its own (the kernels by construction; the
torch reference backend is called one sequence at a time, since it pads to the batch's longest).
"""
from __future__ import annotations

import weakref
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface

from .. import dispatch
from ..ops import flash_attention
from ..reference.attention import uses_cpu_flash, window_keeps
from ..validation import cu_seqlens_values, register_cu_seqlens

ATTN_IMPLEMENTATION = "llm2vec_fast"
BACKEND_ATTRIBUTE = "llm2vec_fast_backend"  # set on attention modules by set_attention_backend
WINDOW_QUERY_BLOCK = 1024  # queries per block in windowed_attention (bounds its memory)


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                 mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """AttentionMaskInterface entry: the (B, S) bool padding mask, or None when nothing is padding."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2 or attention_mask.shape[-1] != kv_length or q_length != kv_length:
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" encodes whole sequences (no KV cache): it '
                         f"needs a (B, S) padding mask with S = query length = key length, got mask shape "
                         f"{tuple(attention_mask.shape)}, q_length={q_length}, kv_length={kv_length}")
    attention_mask = attention_mask.to(torch.bool)
    # A private copy: attention caches its unpadding per mask object (see _unpadding).
    return None if bool(attention_mask.all()) else attention_mask.clone()


def set_attention_backend(model: torch.nn.Module, backend: str) -> torch.nn.Module:
    """Makes every attention module of ``model`` run flash_attention with ``backend`` ("auto", "torch",
    "triton", "cuda", "flash_attn"); applies to ``attn_implementation="llm2vec_fast"`` only."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    found = False
    for module in model.modules():
        if _is_attention_module(module):
            setattr(module, BACKEND_ATTRIBUTE, backend)
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no attention modules (modules with is_causal and "
                         f"num_key_value_groups)")
    return model


def _is_attention_module(module: torch.nn.Module) -> bool:
    return isinstance(getattr(module, "is_causal", None), bool) and hasattr(module, "num_key_value_groups")


def windowed_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, window: int, *, causal: bool,
                       softmax_scale: float, softcap: float, dropout_p: float) -> Tensor:
    """Packed attention restricted to |i - j| < window (and j <= i when causal), in plain PyTorch.

    q (T, Hq, D), k/v (T, Hkv, D). Queries go in blocks of :data:`WINDOW_QUERY_BLOCK`, each against
    only the keys its window reaches, so memory stays O(block * (block + 2 * window)). Logits and
    softmax in float32; differentiable by autograd.
    """
    total, hq, head_dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    bounds = cu_seqlens_values(cu_seqlens)  # no device read for a batch packed on the host
    pieces: List[Tensor] = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        for q_start in range(start, end, WINDOW_QUERY_BLOCK):
            q_end = min(q_start + WINDOW_QUERY_BLOCK, end)
            k_start = max(start, q_start - window + 1)
            k_end = q_end if causal else min(end, q_end + window - 1)
            qb = q[q_start:q_end].float().reshape(q_end - q_start, hkv, group, head_dim).permute(1, 2, 0, 3)
            kb = k[k_start:k_end].float().permute(1, 0, 2)  # (Hkv, Lk, D)
            vb = v[k_start:k_end].float().permute(1, 0, 2)
            logits = torch.matmul(qb, kb[:, None].transpose(-1, -2)) * softmax_scale  # (Hkv, G, Lq, Lk)
            if softcap > 0:
                logits = softcap * torch.tanh(logits / softcap)
            rows = torch.arange(q_start, q_end, device=q.device)[:, None]
            cols = torch.arange(k_start, k_end, device=q.device)[None, :]
            keep = window_keeps(rows, cols, window)
            if causal:
                keep = keep & (cols <= rows)
            probs = torch.softmax(logits.masked_fill(~keep, float("-inf")), dim=-1)
            if dropout_p > 0:
                probs = F.dropout(probs, p=dropout_p, training=True)
            out = torch.matmul(probs, vb[:, None])  # (Hkv, G, Lq, D)
            pieces.append(out.permute(2, 0, 1, 3).reshape(q_end - q_start, hq, head_dim).to(q.dtype))
    if not pieces:
        return q.new_zeros(q.shape)
    return torch.cat(pieces, dim=0)


def _attend_packed(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int, *, causal: bool,
                   scale: float, softcap: float, dropout_p: float, window: Optional[int], backend: str) -> Tensor:
    resolved = dispatch.resolve("flash_attention", backend, q.device)
    if window is not None and max_seqlen <= window:
        window = None  # the window reaches every key
    if window is not None and resolved == "torch":
        # The torch reference pads and materialises (S, S) scores: the banded version keeps memory O(S * w).
        return windowed_attention(q, k, v, cu_seqlens, window, causal=causal, softmax_scale=scale,
                                  softcap=softcap, dropout_p=dropout_p)
    options = dict(causal=causal, softmax_scale=scale, softcap=softcap, dropout_p=dropout_p, sliding_window=window,
                   backend=backend)
    if (cu_seqlens.numel() > 2 and resolved == "torch"
            and not uses_cpu_flash(q.device, softcap, dropout_p)):
        # The reference pads every sequence to max_seqlen, and its reductions' rounding depends on that
        # padded length; one sequence at a time keeps each result independent of the rest of the batch.
        # (Its CPU flash path already runs sequence by sequence.)
        bounds = cu_seqlens_values(cu_seqlens)  # no device read for a batch packed on the host
        spans = [(s, e) for s, e in zip(bounds[:-1], bounds[1:]) if e > s]
        if not spans:
            return q.new_zeros(q.shape)
        # Every sequence's own cu_seqlens [0, n], copied in one go and registered (their values are known
        # here), so that neither the copy nor flash_attention's check waits for the device.
        host = torch.tensor([[0, e - s] for s, e in spans], dtype=torch.int32)
        each = host.pin_memory() if q.device.type == "cuda" else host
        each = each.to(q.device, non_blocking=True)
        pieces = []
        for row, (s, e) in enumerate(spans):
            own = each[row]  # one view object: the check finds it by identity
            register_cu_seqlens(own, (0, e - s))
            pieces.append(flash_attention(q[s:e], k[s:e], v[s:e], own, e - s, **options))
        return torch.cat(pieces)
    return flash_attention(q, k, v, cu_seqlens, max_seqlen, **options)


_RECENT_UNPADDINGS: List[Tuple[weakref.ref, Optional[int], Tuple[Tensor, Tensor, int]]] = []


def _unpadding(mask: Tensor, device) -> Tuple[Tensor, Tensor, int]:
    """(indices of the real tokens in the flat batch, cu_seqlens, max_seqlen) of a (B, S) padding mask.

    Every layer of one forward gets one of a few mask objects (private copies made by :func:`padding_mask`,
    one per layer type), so the results for the last few objects are kept: the host syncs happen once per
    forward and layer type, not per layer.
    """
    global _RECENT_UNPADDINGS
    version = None if mask.is_inference() else mask._version  # inference tensors have no version counter
    for ref, seen_version, result in _RECENT_UNPADDINGS:
        if ref() is mask and seen_version == version:
            return result
    real = mask.to(device=device, dtype=torch.bool)
    lengths = real.sum(dim=1, dtype=torch.int32)
    cu_seqlens = F.pad(torch.cumsum(lengths, dim=0, dtype=torch.int32), (1, 0))
    result = (real.reshape(-1).nonzero().squeeze(1), cu_seqlens, int(lengths.max()))
    alive = [entry for entry in _RECENT_UNPADDINGS if entry[0]() is not None and entry[0]() is not mask]
    _RECENT_UNPADDINGS = [(weakref.ref(mask), version, result)] + alive[:3]
    return result


def _cu_seqlens_from_positions(position_ids: Tensor) -> Optional[Tuple[Tensor, int]]:
    """For one row of packed sequences (positions restarting), (cu_seqlens, max_seqlen); else None."""
    pos = position_ids.reshape(-1)
    if pos.numel() < 2:
        return None
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[1:] = pos[1:] != pos[:-1] + 1
    if int(starts.sum()) == 1:
        return None
    begin = starts.nonzero().squeeze(1)
    cu_seqlens = torch.cat([begin, begin.new_tensor([pos.numel()])]).to(torch.int32)
    return cu_seqlens, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())


def llm2vec_fast_attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                           attention_mask: Optional[Tensor], dropout: float = 0.0, scaling: Optional[float] = None,
                           sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                           is_causal: Optional[bool] = None, **kwargs) -> Tuple[Tensor, None]:
    """AttentionInterface entry (see the module docstring). Returns ((B, S, Hq, D), None)."""
    if kwargs.get("output_attentions", False):
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" never forms attention weights; use "eager" '
                         f"for output_attentions=True")
    if attention_mask is not None and (not isinstance(attention_mask, Tensor) or attention_mask.dim() != 2):
        shape = tuple(attention_mask.shape) if hasattr(attention_mask, "shape") else type(attention_mask).__name__
        raise ValueError(f'attn_implementation="{ATTN_IMPLEMENTATION}" takes the (B, S) padding mask (or packed '
                         f"cu_seq_lens_q), not a prepared mask of shape {shape}; use \"eager\" or \"sdpa\" for custom "
                         f"4D masks")
    batch, _, seqlen, head_dim = query.shape
    options = dict(
        causal=bool(is_causal if is_causal is not None else getattr(module, "is_causal", True)),
        scale=float(scaling) if scaling is not None else head_dim ** -0.5,
        softcap=float(softcap or 0.0),
        dropout_p=float(dropout or 0.0),
        window=int(sliding_window) if sliding_window else None,
        backend=getattr(module, BACKEND_ATTRIBUTE, "auto"),
    )
    # Under autocast, RoPE may leave q/k in float32 while v is in the autocast dtype: attend in that dtype.
    dtype = torch.get_autocast_dtype(query.device.type) if torch.is_autocast_enabled(query.device.type) else None
    dtype = dtype or value.dtype
    # (B, H, S, D) -> (B, S, H, D): a free view when the projections were laid out (B, S, H, D).
    q, k, v = (x.transpose(1, 2).to(dtype).contiguous() for x in (query, key, value))
    hq = q.shape[2]

    cu_seqlens = kwargs.get("cu_seq_lens_q")
    position_ids = kwargs.get("position_ids")
    if cu_seqlens is None and attention_mask is None and batch == 1 and isinstance(position_ids, Tensor):
        found = _cu_seqlens_from_positions(position_ids)
        if found is not None:
            cu_seqlens, kwargs["max_length_q"] = found
    if cu_seqlens is not None:  # packed: one row of T tokens
        if batch != 1 or attention_mask is not None:
            raise ValueError(f"packed inputs (cu_seq_lens_q) must be one row (B=1) without an attention mask, got "
                             f"B={batch} and mask {'given' if attention_mask is not None else 'None'}")
        max_seqlen = kwargs.get("max_length_q")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
        max_seqlen = int(max_seqlen) if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
        out = _attend_packed(q[0], k[0], v[0], cu_seqlens, max_seqlen, **options)
        return out.unsqueeze(0), None

    if attention_mask is None:  # dense: B sequences of S tokens
        flat = [x.reshape(batch * seqlen, *x.shape[2:]) for x in (q, k, v)]
        cu_seqlens = torch.arange(0, (batch + 1) * seqlen, seqlen, device=q.device, dtype=torch.int32)
        out = _attend_packed(*flat, cu_seqlens, seqlen, **options)
        return out.reshape(batch, seqlen, hq, head_dim), None

    indices, cu_seqlens, max_seqlen = _unpadding(attention_mask, q.device)  # padded: the real tokens only
    packed = [x.reshape(batch * seqlen, *x.shape[2:]).index_select(0, indices) for x in (q, k, v)]
    out = _attend_packed(*packed, cu_seqlens, max_seqlen, **options)
    out = out.new_zeros((batch * seqlen, hq, head_dim)).index_copy(0, indices, out)
    return out.reshape(batch, seqlen, hq, head_dim), None


AttentionInterface.register(ATTN_IMPLEMENTATION, llm2vec_fast_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, padding_mask)
