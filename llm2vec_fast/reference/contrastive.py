"""Reference InfoNCE over cosine scores, chunked so that the (anchors x candidates) score matrix never
exists whole: memory is O((A + N) * D + CHUNK_ELEMENTS).

The building block is one direction: anchors a_i score every candidate c_j as scale * cos(a_i, c_j),
and the label of anchor i is candidate ``label_offset + i``. The forward returns the per-anchor loss
(lse_i - s_i,label) and the per-anchor logsumexp; the backward recomputes each chunk of scores.
"""
from __future__ import annotations

import torch

from .norm import l2_normalize_backward, l2_normalized

# Scores held at once per chunk (float32): 2^23 elements = 32 MiB, plus a couple of temporaries.
CHUNK_ELEMENTS = 1 << 23


def _chunks(rows: int, cols: int):
    step = max(1, min(rows, CHUNK_ELEMENTS // max(cols, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def infonce_forward(anchors, candidates, label_offset: int, scale: float):
    """Returns (row_loss (A,) float32, lse (A,) float32)."""
    a, _ = l2_normalized(anchors)
    c, _ = l2_normalized(candidates)
    lse = torch.empty(a.shape[0], device=a.device, dtype=torch.float32)
    positive = torch.empty_like(lse)
    labels = torch.arange(a.shape[0], device=a.device) + label_offset
    for start, stop in _chunks(a.shape[0], c.shape[0]):
        scores = scale * (a[start:stop] @ c.t())
        lse[start:stop] = torch.logsumexp(scores, dim=-1)
        # The positive score from the same product as the lse, so that loss = lse - positive >= 0 holds
        # in floating point too (a separate dot product rounds differently: -6e-4 at scale 1e4).
        positive[start:stop] = scores.gather(1, labels[start:stop, None]).squeeze(1)
    return lse - positive, lse


def infonce_backward(grad_rows, anchors, candidates, lse, label_offset: int, scale: float):
    """d(sum_i grad_rows_i * loss_i) / d(anchors, candidates), in the inputs' dtypes."""
    a, a_norm = l2_normalized(anchors)
    c, c_norm = l2_normalized(candidates)
    g = grad_rows.float()
    grad_a = torch.empty_like(a)
    grad_c = torch.zeros_like(c)
    for start, stop in _chunks(a.shape[0], c.shape[0]):
        # d loss_i / d s_ij = softmax_ij (recomputed from the saved lse), times scale for s = scale * a.c
        dscores = torch.exp(scale * (a[start:stop] @ c.t()) - lse[start:stop, None])
        dscores *= (g[start:stop] * scale)[:, None]
        grad_a[start:stop] = dscores @ c
        grad_c.addmm_(dscores.t(), a[start:stop])
    # The -s_i,label term of each row's loss.
    labels = torch.arange(a.shape[0], device=a.device) + label_offset
    grad_a -= (g * scale)[:, None] * c[labels]
    grad_c.index_add_(0, labels, -(g * scale)[:, None] * a)
    return (l2_normalize_backward(grad_a, a, a_norm).to(anchors.dtype),
            l2_normalize_backward(grad_c, c, c_norm).to(candidates.dtype))
