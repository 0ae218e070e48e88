"""Contrastive loss benchmarks: ``contrastive_loss_fwd`` and ``contrastive_loss_fwd_bwd``.

Impls:
- ours: ``lf.contrastive_loss(q, d_pos, d_neg, scale=20, gather=False, backend=b)`` for every backend
  in ``dispatch.available_backends("contrastive_loss", device)``;
- ``naive``: the usual B x N loss, ``cross_entropy(normalize(q) @ normalize(d).T * scale, arange(B))``,
  with the matmul in the input dtype and the cross-entropy in float32 (sentence-transformers' MNRL).

``contrastive_loss_fwd`` runs under ``torch.no_grad``; ``contrastive_loss_fwd_bwd`` is one training
step's loss work, ``torch.autograd.grad(loss, (q, d_pos[, d_neg]))``. FLOPs: fwd = 2*B*N*D, fwd_bwd =
3 x fwd (scores, dQ, dD; recomputation is not counted). peak_mem_mb is the memory the call allocates.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F

import llm2vec_fast as lf

from .harness import Case, our_impls, randn

OP = "contrastive_loss"
SCALE = 20.0
FULL = ((8192, 0, 4096, torch.bfloat16), (32768, 0, 4096, torch.bfloat16), (8192, 0, 4096, torch.float32))
QUICK = ((64, 64, 32, None),)  # (B, hard negatives, D, dtype); None: bf16 on CUDA, fp32 on the CPU

METHOD_NOTES = [
    "contrastive_loss: FLOPs fwd = 2*B*N*D, fwd_bwd = 3x fwd; fwd under no_grad, fwd_bwd = autograd.grad of "
    "the loss; naive = cross_entropy(normalize(q) @ normalize(d).T * 20, arange(B)).",
]


class Problem:
    def __init__(self, batch: int, negatives: int, dim: int, dtype: torch.dtype, device: torch.device,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.batch, self.negatives, self.dim, self.dtype, self.device = batch, negatives, dim, dtype, device
        self.q = randn((batch, dim), dtype, device)
        # Positives correlated with their queries, like trained embeddings (the loss is then not uniform).
        self.d_pos = (self.q.float() + randn((batch, dim), torch.float32, device)).to(dtype)
        self.d_neg: Optional[torch.Tensor] = randn((negatives, dim), dtype, device) if negatives else None
        self.labels = torch.arange(batch, device=device)

    @property
    def candidates(self) -> int:
        return self.batch + self.negatives

    @property
    def shape(self) -> str:
        return f"B={self.batch},N={self.candidates},D={self.dim}"

    @property
    def flops(self) -> float:
        return 2.0 * self.batch * self.candidates * self.dim

    def inputs(self) -> Tuple[torch.Tensor, ...]:
        return (self.q, self.d_pos) + ((self.d_neg,) if self.d_neg is not None else ())


def _timed(loss: Callable, inputs: Tuple[torch.Tensor, ...], backward: bool):
    if not backward:
        def run():
            with torch.no_grad():
                return loss(*inputs)
        return run
    leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
    return lambda: torch.autograd.grad(loss(*leaves), leaves)


def _ours(p: Problem, backend: str, backward: bool):
    def setup():
        def loss(q, d_pos, d_neg=None):
            return lf.contrastive_loss(q, d_pos, d_neg, scale=SCALE, gather=False, backend=backend)
        return _timed(loss, p.inputs(), backward)
    return setup


def _naive(p: Problem, backward: bool):
    def setup():
        labels = p.labels

        def loss(q, d_pos, d_neg=None):
            d = d_pos if d_neg is None else torch.cat([d_pos, d_neg])
            scores = F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).t() * SCALE
            return F.cross_entropy(scores.float(), labels)
        return _timed(loss, p.inputs(), backward)
    return setup


def impls(p: Problem, backward: bool) -> List[Tuple[str, Callable]]:
    return our_impls(OP, p.device, lambda backend: _ours(p, backend, backward)) + [("naive", _naive(p, backward))]


def problems(quick: bool, device: torch.device) -> Iterator[Problem]:
    for batch, negatives, dim, dtype in (QUICK if quick else FULL):
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        yield Problem(batch, negatives, dim, dtype, device)


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    for p in problems(quick, device):
        yield Case("contrastive_loss_fwd", p.shape, p.dtype, impls(p, backward=False), flops=p.flops)
        yield Case("contrastive_loss_fwd_bwd", p.shape, p.dtype, impls(p, backward=True), flops=3 * p.flops)
