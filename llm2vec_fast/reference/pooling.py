"""Reference pooling: every mode is a per-token weight, applied in one vectorised scatter-add.

Both layouts are flattened to N tokens with a sequence id: packed (T, D) with cu_seqlens, or padded
(B, S, D) with attention_mask (left or right padding; N = B*S, padding tokens are not "real").
"""
from __future__ import annotations

import torch

from .layout import token_positions
from .norm import l2_normalize_backward, l2_normalized


def flatten_layout(hidden, cu_seqlens, attention_mask, embed_mask):
    """Returns (flat_hidden (N, D), seq_id (N,), starts (B,), real (N,) bool, pooled (N,) bool, B)."""
    device = hidden.device
    if cu_seqlens is not None:
        total = hidden.shape[0]
        seq_id, _, lengths = token_positions(cu_seqlens, total)
        batch = lengths.numel()
        starts = cu_seqlens[:-1].long()
        flat = hidden
        real = torch.ones(total, dtype=torch.bool, device=device)
    else:
        batch, seqlen, dim = hidden.shape
        seq_id = torch.arange(batch, device=device).repeat_interleave(seqlen)
        starts = torch.arange(batch, device=device) * seqlen
        flat = hidden.reshape(batch * seqlen, dim)
        real = (attention_mask.reshape(-1) != 0) if attention_mask is not None else \
            torch.ones(batch * seqlen, dtype=torch.bool, device=device)
    pooled = real if embed_mask is None else real & (embed_mask.reshape(-1) != 0)
    return flat, seq_id, starts, real, pooled, batch


def token_weights(seq_id, starts, real, pooled, batch: int, mode: str) -> torch.Tensor:
    """Float32 weight of every flat token in its sequence's embedding."""
    n = seq_id.numel()
    device = seq_id.device
    if mode in ("mean", "weighted_mean"):
        counts = torch.zeros(batch, device=device).index_add_(0, seq_id, pooled.float())
        if mode == "mean":
            return pooled.float() / counts.clamp_min(1)[seq_id]
        # Rank of each pooled token inside its sequence (1..n): global running count minus the count
        # before the sequence's first token. `running` has a leading 0 so running[start] is that count.
        running = torch.cat([torch.zeros(1, device=device, dtype=torch.long), torch.cumsum(pooled.long(), 0)])
        rank = running[1:] - running[starts][seq_id]
        total_weight = (counts * (counts + 1) / 2).clamp_min(1)
        return pooled.float() * rank.float() / total_weight[seq_id]
    # last_token / eos_token / bos_token select the last / first real token of each sequence.
    index = torch.arange(n, device=device)
    if mode == "bos_token":
        chosen = torch.full((batch,), n, device=device, dtype=torch.long)
        chosen = chosen.scatter_reduce(0, seq_id[real], index[real], reduce="amin")
        has_token = chosen < n
    else:
        chosen = torch.full((batch,), -1, device=device, dtype=torch.long)
        chosen = chosen.scatter_reduce(0, seq_id[real], index[real], reduce="amax")
        has_token = chosen >= 0
    weights = torch.zeros(n, device=device)
    return weights.index_fill(0, chosen[has_token], 1.0)


def _weights(hidden, cu_seqlens, attention_mask, embed_mask, mode):
    flat, seq_id, starts, real, pooled, batch = flatten_layout(hidden, cu_seqlens, attention_mask, embed_mask)
    return flat, seq_id, token_weights(seq_id, starts, real, pooled, batch, mode), batch


def weighted_tokens(flat, weights):
    """weight * token in float32, and exactly 0 for a token of weight 0: padding and unpooled tokens are never
    read (they may hold anything, NaN included, as in the Triton and CUDA kernels), not multiplied by 0."""
    return torch.where(weights[:, None] != 0, flat.float() * weights[:, None], 0.0)


def pool(hidden, cu_seqlens, attention_mask, embed_mask, mode: str, normalize: bool):
    """(B, D) float32 embeddings; differentiable by autograd."""
    flat, seq_id, weights, batch = _weights(hidden, cu_seqlens, attention_mask, embed_mask, mode)
    out = torch.zeros(batch, flat.shape[-1], device=hidden.device, dtype=torch.float32)
    out = out.index_add(0, seq_id, weighted_tokens(flat, weights))
    return l2_normalized(out)[0] if normalize else out


def pool_forward(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    with torch.no_grad():
        return pool(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize)


def pool_backward(grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    """d hidden[token] = weight[token] * d pooled[seq(token)], through the normalisation if any."""
    flat, seq_id, weights, batch = _weights(hidden, cu_seqlens, attention_mask, embed_mask, mode)
    grad = grad_out.float()
    if normalize:
        pooled = torch.zeros(batch, flat.shape[-1], device=hidden.device, dtype=torch.float32)
        pooled.index_add_(0, seq_id, weighted_tokens(flat, weights))
        grad = l2_normalize_backward(grad, *l2_normalized(pooled))
    return (weights[:, None] * grad[seq_id]).to(hidden.dtype).reshape(hidden.shape)
