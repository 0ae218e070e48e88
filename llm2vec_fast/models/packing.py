"""The packed (varlen) layout: a padded batch with its padding dropped.

A padded batch ``input_ids`` (B, S) with a 0/1 ``attention_mask`` (B, S), left- or right-padded,
becomes T real tokens in one row. Sequence b is the real tokens of row b, in order; its tokens sit
at ``cu_seqlens[b]:cu_seqlens[b+1]`` and its positions restart at 0, so RoPE sees the same positions
as for the sequence alone. ``indices`` remembers where each token was in the flattened (B*S) batch,
so :func:`repad` puts results back in the caller's layout.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import chain
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..validation import register_cu_seqlens


@dataclass
class PackedBatch:
    """T real tokens of a batch of B sequences (see the module docstring).

    ``input_ids`` (T,) long, or None when only the layout was packed; ``position_ids`` (T,) long;
    ``cu_seqlens`` (B+1,) int32 from 0 to T; ``max_seqlen`` the longest sequence; ``indices`` (T,)
    long, each token's flat index in the padded (``batch_size``, ``seqlen``) layout.
    """
    input_ids: Optional[Tensor]
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    indices: Tensor
    batch_size: int
    seqlen: int

    @property
    def num_tokens(self) -> int:
        return int(self.indices.numel())

    @property
    def sequence_ids(self) -> Tensor:
        """(T,) long: the sequence each token belongs to."""
        return torch.div(self.indices, max(self.seqlen, 1), rounding_mode="floor")

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        """The batch on ``device``. ``non_blocking=True`` copies without waiting (asynchronous from pinned
        memory, see :meth:`pin_memory`; the pinned tensors must then stay unmodified until the copy has run).
        Moving from the CPU records cu_seqlens' values (read on the host) with the new tensor, so that the
        attention and pooling checks never read them back from the device (``validation.register_cu_seqlens``).
        """
        move = (lambda x: None if x is None else x.to(device, non_blocking=non_blocking))
        moved = replace(self, input_ids=move(self.input_ids), position_ids=move(self.position_ids),
                        cu_seqlens=move(self.cu_seqlens), indices=move(self.indices))
        if moved.cu_seqlens is not self.cu_seqlens and self.cu_seqlens.device.type == "cpu":
            register_cu_seqlens(moved.cu_seqlens, self.cu_seqlens.tolist())
        return moved

    def pin_memory(self) -> "PackedBatch":
        """The batch in pinned (page-locked) host memory, for asynchronous copies to a CUDA device."""
        pin = (lambda x: None if x is None else x.pin_memory())
        return replace(self, input_ids=pin(self.input_ids), position_ids=pin(self.position_ids),
                       cu_seqlens=pin(self.cu_seqlens), indices=pin(self.indices))


def _check_mask(attention_mask: Tensor, shape) -> Tensor:
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or tuple(attention_mask.shape) != tuple(shape):
        raise ValueError(f"attention_mask must be a 0/1 (B, S) mask of shape {tuple(shape)}, got shape "
                         f"{tuple(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise TypeError(f"attention_mask must be bool or integer 0/1, got {attention_mask.dtype}")
        if not torch.compiler.is_compiling() and bool(((attention_mask != 0) & (attention_mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 and 1")
        attention_mask = attention_mask != 0
    return attention_mask


def pack(input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
         shape: Optional[Sequence[int]] = None) -> PackedBatch:
    """Drops the padding of a (B, S) batch. ``attention_mask`` None means no padding.

    Give ``input_ids`` (B, S), or only ``attention_mask`` (or ``shape`` (B, S)) to pack the layout
    alone (for hidden states that :func:`unpad` then packs).
    """
    if input_ids is not None:
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a (B, S) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
        shape = tuple(input_ids.shape)
        device = input_ids.device
    elif attention_mask is not None:
        shape = tuple(attention_mask.shape)
        device = attention_mask.device
    elif shape is not None:
        shape = tuple(int(n) for n in shape)
        device = torch.device("cpu")
    else:
        raise ValueError("pack needs input_ids, attention_mask or shape")
    batch_size, seqlen = shape
    if attention_mask is None:
        mask = torch.ones(shape, dtype=torch.bool, device=device)
    else:
        mask = _check_mask(attention_mask, shape).to(device)
    lengths = mask.sum(dim=1, dtype=torch.int32)
    cu_seqlens = torch.zeros(batch_size + 1, dtype=torch.int32, device=device)
    torch.cumsum(lengths, dim=0, out=cu_seqlens[1:])
    indices = mask.reshape(-1).nonzero().squeeze(1)
    position_ids = (mask.cumsum(dim=1) - 1).reshape(-1)[indices]
    max_seqlen = int(lengths.max()) if batch_size > 0 else 0
    packed_ids = input_ids.reshape(-1)[indices] if input_ids is not None else None
    return PackedBatch(packed_ids, position_ids, cu_seqlens, max_seqlen, indices, batch_size, seqlen)


def pack_sequences(sequences: Sequence[Union[Sequence[int], Tensor]], device=None,
                   pin_memory: bool = False) -> PackedBatch:
    """Packs token-id lists (no padding anywhere); their padded layout is right-padded to the longest.

    Built on the host from the lists' lengths (no value is read from a device); ``device`` moves the
    result there, and ``pin_memory=True`` builds it in pinned memory (then moved with ``non_blocking``).
    """
    lengths = [len(s) for s in sequences]
    batch_size, seqlen = len(lengths), max(lengths, default=0)
    ids = None
    if all(isinstance(s, (list, tuple)) for s in sequences):
        try:  # the fast path: one tensor from all the ids
            ids = torch.tensor(list(chain.from_iterable(sequences)), dtype=torch.long)
        except (TypeError, ValueError):
            ids = None  # not flat lists of ints: the general path below
    if ids is None:
        flat = [torch.as_tensor(s, dtype=torch.long).reshape(-1).cpu() for s in sequences]
        ids = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.long)
    total = sum(lengths)
    if ids.numel() != total:
        raise ValueError(f"each sequence must be a flat list of token ids: {ids.numel()} ids for lengths {lengths}")
    count = torch.tensor(lengths, dtype=torch.long)
    cu_seqlens = torch.zeros(batch_size + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(count, dim=0)
    seq_id = torch.repeat_interleave(torch.arange(batch_size), count, output_size=total)
    position_ids = torch.arange(total) - cu_seqlens[:-1].long()[seq_id]
    indices = seq_id * seqlen + position_ids
    batch = PackedBatch(ids, position_ids, cu_seqlens, seqlen, indices, batch_size, seqlen)
    if pin_memory:
        batch = batch.pin_memory()
    if device is not None:
        batch = batch.to(device, non_blocking=pin_memory)
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + n)
    register_cu_seqlens(batch.cu_seqlens, bounds)  # known here: the checks need not read them (from a device)
    return batch


def unpad(x: Tensor, batch: PackedBatch) -> Tensor:
    """(B, S, ...) -> (T, ...): the real tokens of a padded tensor, in packed order."""
    if tuple(x.shape[:2]) != (batch.batch_size, batch.seqlen):
        raise ValueError(f"x must start with the padded shape ({batch.batch_size}, {batch.seqlen}), got "
                         f"{tuple(x.shape)}")
    return x.reshape(batch.batch_size * batch.seqlen, *x.shape[2:]).index_select(0, batch.indices)


def repad(x: Tensor, batch: PackedBatch, value: float = 0.0) -> Tensor:
    """(T, ...) -> (B, S, ...): packed values back in the padded layout; padding holds ``value``."""
    if x.shape[0] != batch.num_tokens:
        raise ValueError(f"x must have T={batch.num_tokens} rows, got shape {tuple(x.shape)}")
    out = x.new_full((batch.batch_size * batch.seqlen, *x.shape[1:]), value)
    return out.index_copy(0, batch.indices, x).reshape(batch.batch_size, batch.seqlen, *x.shape[1:])
