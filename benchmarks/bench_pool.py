"""Pooling benchmark: op ``pool`` (mode="mean", forward, no grad), judged in GB/s.

Impls:
- ours: ``lf.pool(hidden, cu_seqlens=..., mode="mean", backend=b)`` on the packed (T, D) layout, for
  every backend in ``dispatch.available_backends("pool", device)``;
- ``torch_naive``: the usual masked mean on the padded (B, Smax, D) layout with a 0/1 mask,
  ``(hidden * mask[..., None]).sum(1, dtype=float32) / mask.sum(1, keepdim=True)`` (the padded copy is
  built outside the timed region: that is what a padded model hands over).

GB/s = (T * D * element size read + B * D * 4 written) / time, the same byte count for every impl
(effective bandwidth: an impl that reads padding pays for it in time, not in bytes).
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Tuple

import torch

import llm2vec_fast as lf

from .harness import Case, cu_seqlens_of, lognormal_lengths, our_impls, randn

OP = "pool"
FULL_TOKENS, FULL_DIM = 65536, 4096
QUICK_TOKENS, QUICK_DIM = 512, 64

METHOD_NOTES = [
    "pool: mode=mean forward; GB/s = (T*D*elem read + B*D*4 written)/time for every impl; ours run packed "
    "(T, D) with cu_seqlens, torch_naive runs (hidden*mask).sum/mask.sum on the padded (B, Smax, D) layout.",
]


class Problem:
    def __init__(self, lengths: Sequence[int], dim: int, dtype: torch.dtype, device: torch.device, label: str,
                 seed: int = 0):
        torch.manual_seed(seed)
        self.lengths = [int(n) for n in lengths]
        self.total, self.batch, self.max_seqlen = sum(self.lengths), len(self.lengths), max(self.lengths)
        self.dim, self.dtype, self.device, self.label = dim, dtype, device, label
        self.hidden = randn((self.total, dim), dtype, device)
        self.cu_seqlens = cu_seqlens_of(self.lengths, device)

    @property
    def shape(self) -> str:
        return f"B={self.batch},T={self.total},Smax={self.max_seqlen},D={self.dim},lengths={self.label}"

    @property
    def nbytes(self) -> float:
        return float(self.total * self.dim * self.hidden.element_size() + self.batch * self.dim * 4)

    def padded(self) -> Tuple[torch.Tensor, torch.Tensor]:
        lengths = torch.tensor(self.lengths, device=self.device)
        mask = torch.arange(self.max_seqlen, device=self.device)[None, :] < lengths[:, None]
        padded = randn((self.batch, self.max_seqlen, self.dim), self.dtype, self.device)
        padded[mask] = self.hidden  # right padding; the padding holds random values, masked out
        return padded, mask.to(self.dtype)


def _ours(p: Problem, backend: str) -> Callable:
    def setup():
        hidden, cu = p.hidden, p.cu_seqlens

        def run():
            with torch.no_grad():
                return lf.pool(hidden, cu_seqlens=cu, mode="mean", backend=backend)
        return run
    return setup


def _naive(p: Problem) -> Callable:
    def setup():
        hidden, mask = p.padded()

        def run():
            with torch.no_grad():
                return (hidden * mask[..., None]).sum(1, dtype=torch.float32) / mask.sum(1, keepdim=True, dtype=torch.float32)
        return run
    return setup


def impls(p: Problem) -> List[Tuple[str, Callable]]:
    return our_impls(OP, p.device, lambda backend: _ours(p, backend)) + [("torch_naive", _naive(p))]


def problems(quick: bool, device: torch.device) -> Iterator[Problem]:
    if quick:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        yield Problem(lognormal_lengths(QUICK_TOKENS, 64, 0.8, 4, 256, seed=1), QUICK_DIM, dtype, device, "lognormal")
        return
    yield Problem(lognormal_lengths(FULL_TOKENS, 400, 0.8, 16, 2048, seed=1), FULL_DIM, torch.bfloat16, device,
                  "lognormal")
    yield Problem([512] * (FULL_TOKENS // 512), FULL_DIM, torch.bfloat16, device, "equal")


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    for p in problems(quick, device):
        yield Case("pool", p.shape, p.dtype, impls(p), nbytes=p.nbytes)
