"""Reference attention on the packed (varlen) layout, vectorised over sequences.

``attention`` is the oracle. The torch backend's forward on the CPU (no softcap, no dropout) runs
ATen's fused CPU flash kernel per sequence instead (``_cpu_flash_forward``): the CPU production path.

Tokens are scattered into a zero-padded (B, S, H, D) block, attention runs as batched matmuls with a
key-padding mask, and the valid rows are gathered back. GQA stacks the G = Hq/Hkv query heads of one
KV head along the row axis, (B, Hkv, G*S, D), so K and V are read per KV head and never repeated.

The backward is written out (the same formulas a flash kernel uses) rather than taken from autograd,
so it also serves as the oracle for kernel backwards:
    dV = Pd^T dO,  dP = (dO V^T) * Z/(1-p),  dS = P * (dP - rowsum(P * dP) + dlse),
    dX = dS * (1 - (S/c)^2) under softcap c,  dQ = scale * dX K,  dK = scale * dX^T Q,
where X = scale * Q K^T, S the (capped) logits, P = softmax(S), Z the dropout keep mask, Pd = P*Z/(1-p),
and dlse the gradient with respect to the lse output (0 when only the output is used).
"""
from __future__ import annotations

import torch

from .layout import token_positions


def dropout_keep_mask(shape, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The reference dropout mask: torch's RNG seeded with ``seed``, so the backward regenerates it."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return torch.rand(shape, generator=generator, device=device) >= dropout_p


def window_keeps(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """The one definition of the sliding window (the kernels' ``_in_window``): |i - j| < window."""
    return (query_pos - key_pos).abs() < window


class _Padded:
    """One packed batch laid out as padded, grouped (B, Hkv, G*S, D) blocks."""

    def __init__(self, q, k, cu_seqlens, max_seqlen, dtype):
        self.total, self.hq, self.head_dim = q.shape
        self.hkv = k.shape[1]
        self.group = self.hq // self.hkv
        self.batch = cu_seqlens.numel() - 1
        self.seqlen = max_seqlen
        self.dtype = dtype
        self.seq_id, self.pos, self.lengths = token_positions(cu_seqlens, self.total)

    def pad(self, x, grouped: bool):
        """(T, H, D) -> (B, H, S, D), or (B, Hkv, G*S, D) for query-head tensors when ``grouped``."""
        out = x.new_zeros((self.batch, self.seqlen, x.shape[1], x.shape[-1]), dtype=self.dtype)
        out = out.index_put((self.seq_id, self.pos), x.to(self.dtype)).permute(0, 2, 1, 3)
        return out.reshape(self.batch, self.hkv, self.group * self.seqlen, x.shape[-1]) if grouped else out

    def unpad(self, x, heads: int):
        """(B, heads, S, D) or grouped (B, Hkv, G*S, D) -> (T, heads, D)."""
        x = x.reshape(self.batch, heads, self.seqlen, x.shape[-1]).permute(0, 2, 1, 3)
        return x[self.seq_id, self.pos]

    def padded_dropout_mask(self, mask):
        """A kernel-layout keep mask (Hq, T, >= S) -> (B, Hkv, G, S, S), like the probabilities."""
        mask = mask[..., : self.seqlen].permute(1, 0, 2)  # (T, Hq, S)
        out = mask.new_zeros((self.batch, self.seqlen, self.hq, self.seqlen))
        out = out.index_put((self.seq_id, self.pos), mask).permute(0, 2, 1, 3)
        return out.reshape(self.batch, self.hkv, self.group, self.seqlen, self.seqlen)

    def keep(self, causal: bool, window: int = 0):
        """Which (row, key) pairs attend, broadcastable to (B, Hkv, G, S, S): real keys, at or before the row
        when causal, and within |row - key| < window when window > 0."""
        cols = torch.arange(self.seqlen, device=self.lengths.device)
        keep = (cols[None, :] < self.lengths[:, None])[:, None, None, None, :]
        if causal:
            keep = keep & (cols[None, :] <= cols[:, None])
        if window > 0:
            keep = keep & window_keeps(cols[:, None], cols[None, :], window)
        return keep


def _logits_and_probs(layout: _Padded, qp, kp, causal, softmax_scale, softcap, window=0):
    """Returns (capped logits S, probabilities P, lse), each (B, Hkv, G, S, S) / (B, Hkv, G, S)."""
    logits = torch.matmul(qp, kp.transpose(-1, -2)) * softmax_scale
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    logits = logits.view(layout.batch, layout.hkv, layout.group, layout.seqlen, layout.seqlen)
    masked = logits.masked_fill(~layout.keep(causal, window), float("-inf"))
    # A softmax that stays finite on padding rows (every key masked): probability 0 there, not NaN.
    if masked.shape[-1] == 0:  # every sequence is empty: nothing attends
        row_max = masked.new_zeros((*masked.shape[:-1], 1))
    else:
        row_max = masked.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    expo = torch.exp(masked - row_max)
    denom = expo.sum(dim=-1, keepdim=True)
    probs = expo / torch.where(denom == 0, torch.ones_like(denom), denom)
    # Differentiable (row_max is a detached shift, exact for any constant): -inf on padding rows only.
    lse = (row_max + torch.log(denom)).squeeze(-1)
    return logits, probs, lse


def _keep_mask(layout: _Padded, probs, dropout_p, seed, dropout_mask):
    if dropout_mask is not None:
        return layout.padded_dropout_mask(dropout_mask).to(probs.dtype)
    return dropout_keep_mask(probs.shape, dropout_p, seed, probs.device).to(probs.dtype)


def attention(q, k, v, cu_seqlens, max_seqlen: int, causal: bool, softmax_scale: float, softcap: float,
              dropout_p: float, seed: int, window: int = 0, *, compute_dtype=torch.float32, dropout_mask=None):
    """Returns (out (T, Hq, D) in q's dtype, lse (Hq, T) float32), both differentiable by autograd.

    ``window`` > 0 keeps the keys with |i - j| < window only (a sliding window, on top of causal).
    ``compute_dtype=None`` computes in the input dtype (to measure PyTorch's own rounding error).
    ``dropout_mask`` (Hq, T, >= max_seqlen) bool replaces the seeded mask, e.g. to replay a kernel's.
    """
    layout = _Padded(q, k, cu_seqlens, max_seqlen, compute_dtype or q.dtype)
    qp, kp, vp = layout.pad(q, True), layout.pad(k, False), layout.pad(v, False)
    _, probs, lse = _logits_and_probs(layout, qp, kp, causal, softmax_scale, softcap, window)
    if dropout_p > 0:
        probs = probs * _keep_mask(layout, probs, dropout_p, seed, dropout_mask) / (1.0 - dropout_p)
    out = torch.matmul(probs.flatten(2, 3), vp)  # (B, Hkv, G*S, D)
    lse = layout.unpad(lse.reshape(layout.batch, layout.hq, layout.seqlen, 1), layout.hq)[..., 0].t()
    return layout.unpad(out, layout.hq).to(q.dtype), lse.float().contiguous()


def _cpu_flash_forward(q, k, v, cu_seqlens, causal: bool, softmax_scale: float):
    """The torch backend's CPU production path: ATen's fused CPU flash kernel, one sequence at a time
    (no padding, no materialised scores, fp32 accumulation), returning the lse as well.

    GQA without copies of K/V: non-causal, the G query heads sharing a K/V head are one longer query
    (G*L rows against the same L keys; every row's softmax is its own), so each sequence runs as
    (1, Hkv, G*L, D) queries against (1, Hkv, L, D) keys. Causal attention cannot fold (a row's
    mask depends on its position), so there K/V heads are expanded per sequence."""
    total, hq, head_dim = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    fold = group > 1 and not causal
    out = q.new_empty(q.shape)
    lse = torch.empty((hq, total), device=q.device, dtype=torch.float32)
    bounds = cu_seqlens.tolist()
    for start, stop in zip(bounds[:-1], bounds[1:]):
        length = stop - start
        if length == 0:
            continue
        key, value = (x[start:stop].transpose(0, 1).unsqueeze(0) for x in (k, v))  # (1, Hkv, L, D)
        if fold:
            # (L, Hkv*G, D) -> (1, Hkv, G*L, D): query head h = kv_head * G + g, row g * L + position
            query = q[start:stop].view(length, hkv, group, head_dim).permute(1, 2, 0, 3)
            query = query.reshape(1, hkv, group * length, head_dim)
        else:
            query = q[start:stop].transpose(0, 1).unsqueeze(0)
            if group > 1:
                key, value = (x.repeat_interleave(group, dim=1) for x in (key, value))
        seq_out, seq_lse = _CPU_FLASH(query, key, value, 0.0, causal, scale=softmax_scale)
        # back to (L, Hq, D) and (Hq, L): both layouts list query heads as (kv_head, g)
        out[start:stop] = seq_out.reshape(hq, length, head_dim).transpose(0, 1)
        lse[:, start:stop] = seq_lse.reshape(hq, length)
    return out, lse


_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def uses_cpu_flash(device: torch.device, softcap: float, dropout_p: float, window: int = 0) -> bool:
    """Whether the torch backend's forward takes the per-sequence CPU flash path (batch invariant)."""
    return device.type == "cpu" and softcap == 0 and dropout_p == 0 and window == 0 and _CPU_FLASH is not None


def attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, window=0):
    with torch.no_grad():
        if uses_cpu_flash(q.device, softcap, dropout_p, window):
            return _cpu_flash_forward(q, k, v, cu_seqlens, causal, softmax_scale)
        return attention(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, window)


def attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, softcap,
                       dropout_p, seed, window=0, dlse=None, *, compute_dtype=torch.float32, dropout_mask=None):
    """(dq, dk, dv) in the inputs' dtypes, by the formulas in the module docstring (``dlse`` (Hq, T): the
    gradient with respect to the lse output, when a loss uses it)."""
    layout = _Padded(q, k, cu_seqlens, max_seqlen, compute_dtype or q.dtype)
    qp, kp, vp = layout.pad(q, True), layout.pad(k, False), layout.pad(v, False)
    grad_out = layout.pad(dout, True)
    logits, probs, _ = _logits_and_probs(layout, qp, kp, causal, softmax_scale, softcap, window)
    grad_probs = torch.matmul(grad_out, vp.transpose(-1, -2)).view_as(probs)  # dO V^T
    dropped = probs
    if dropout_p > 0:
        keep_scaled = _keep_mask(layout, probs, dropout_p, seed, dropout_mask) / (1.0 - dropout_p)
        dropped = probs * keep_scaled
        grad_probs = grad_probs * keep_scaled
    grad_v = torch.matmul(dropped.flatten(2, 3).transpose(-1, -2), grad_out)  # sums the G query heads
    row_term = (probs * grad_probs).sum(dim=-1, keepdim=True)
    if dlse is not None:  # (Hq, T) -> (B, Hkv, G, S, 1), like the row term
        row_term = row_term - layout.pad(dlse.t().unsqueeze(-1), True).view_as(row_term)
    grad_logits = probs * (grad_probs - row_term)
    if softcap > 0:
        grad_logits = grad_logits * (1 - (logits / softcap) ** 2)
    grad_logits = grad_logits.flatten(2, 3) * softmax_scale  # (B, Hkv, G*S, S)
    grad_q = torch.matmul(grad_logits, kp)
    grad_k = torch.matmul(grad_logits.transpose(-1, -2), qp)
    return (layout.unpad(grad_q, layout.hq).to(q.dtype), layout.unpad(grad_k, layout.hkv).to(k.dtype),
            layout.unpad(grad_v, layout.hkv).to(v.dtype))
