"""The seed of a dropout that a backward regenerates (flash_attention, lora_linear): drawn from torch's default
CPU generator, so ``torch.manual_seed``, checkpointing's and GradCache's RNG replays reproduce the masks, and kept
on the CPU, so that kernels read it without a device sync."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def draw_seed(dropout_p: float) -> Optional[Tensor]:
    """A (1,) int64 CPU tensor where ``dropout_p`` drops anything, else None (nothing drawn)."""
    return torch.randint(0, 2**62, (1,)) if dropout_p > 0 else None


def seed_value(seed: Optional[Tensor]) -> int:
    """The int the backends take (0 where no seed was drawn)."""
    return int(seed.item()) if seed is not None else 0
