"""Cross-rank gathering with gradient, for in-batch negatives that span every rank.

``gather_rows`` concatenates each rank's rows (row counts may differ) in rank order. Its backward sums
the gradient of the gathered tensor over ranks and returns this rank's slice: every rank's loss uses
the gathered rows, so the gradient of a local row is the sum of what each rank's loss sends it.
"""
from __future__ import annotations

import os
from typing import List, Tuple

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def join_torchrun_group(device=None) -> Tuple[torch.device, bool]:
    """(this process's device, whether this call joined the process group).

    Under torchrun (WORLD_SIZE > 1) a CUDA rank uses ``cuda:LOCAL_RANK`` and the group is joined with NCCL on
    CUDA, gloo on the CPU. ``device`` ("cpu", "cuda", "cuda:1", ...) overrides the automatic choice (CUDA when
    available). Idempotent: a group already joined is kept.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        device = torch.device(device)
    else:
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1 or dist.is_initialized():
        return device, False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, True


def rank_and_world() -> Tuple[int, int]:
    """(this process's rank, the world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def share(rows: int, rank: int, world: int) -> slice:
    """This rank's contiguous part of ``rows`` global rows: sizes differ by at most one, rank order = row order
    (so every rank has a row whenever rows >= world)."""
    base, extra = divmod(rows, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def _row_counts(rows: int, device) -> List[int]:
    local = torch.tensor([rows], device=device, dtype=torch.long)
    counts = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, local)
    return [int(c.item()) for c in counts]


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, counts: Tuple[int, ...]):
        rank = dist.get_rank()
        padded = x.new_zeros((max(counts), *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded.contiguous())
        ctx.start = sum(counts[:rank])
        ctx.rows = x.shape[0]
        return torch.cat([part[:n] for part, n in zip(parts, counts)])

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.start: ctx.start + ctx.rows], None


def gather_rows(x: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
    """Returns (rows of every rank concatenated, this rank's first row index, total rows).

    Without an initialised process group of more than one rank: (x, 0, len(x)).
    """
    if not is_distributed():
        return x, 0, x.shape[0]
    counts = _row_counts(x.shape[0], x.device)
    start = sum(counts[: dist.get_rank()])
    if sum(counts) == 0:  # every rank knows: skip the (zero-byte) collective that gloo mishandles
        return x, start, 0
    if torch.is_grad_enabled() and not x.requires_grad:
        # The backward's all_reduce must run on every rank, also where this rank's rows need no gradient.
        x = x.detach().requires_grad_(True)
    return _GatherRows.apply(x, tuple(counts)), start, sum(counts)


def global_value(local_part: torch.Tensor) -> torch.Tensor:
    """A scalar whose value is the sum of ``local_part`` over ranks and whose gradient is local_part's.

    Each rank then reports the global loss while its backward only differentiates its own share; the
    gathered inputs route the cross-rank gradients (see ``gather_rows``).
    """
    if not is_distributed():
        return local_part
    total = local_part.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return local_part + (total - local_part.detach())
