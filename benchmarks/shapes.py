"""What the end-to-end benchmarks (``bench_model``, ``bench_encode``, ``bench_train``) share: the model shapes,
a random-weight bidirectional Mistral of a shape, lognormal workload lengths, and the model's useful FLOPs.

Each benchmark's ``Setting`` holds a :class:`ModelShape` (``setting.model``) plus its own workload fields.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from benchmarks import harness


@dataclass(frozen=True)
class ModelShape:
    """A Mistral-style decoder's shape and the dtype its weights are made in."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    dtype: torch.dtype

    def describe(self) -> str:
        """The model part of a row's ``shape`` text."""
        return f"L={self.layers},hidden={self.hidden},Hq={self.heads},Hkv={self.kv_heads},D={self.head_dim}"


def mistral_7b(layers: int) -> ModelShape:
    """Mistral-7B at full width (hidden 4096, MLP 14336, Hq=32, Hkv=8, D=128, vocab 32000), bf16, ``layers`` of
    its 32 layers."""
    return ModelShape(layers=layers, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                      vocab=32000, dtype=torch.bfloat16)


# Small and Mistral-shaped, for CPU runs.
SMALL_CPU = ModelShape(layers=4, hidden=256, intermediate=1024, heads=4, kv_heads=2, head_dim=64, vocab=32000,
                       dtype=torch.float32)


def tiny(vocab: int, heads: int = 2, kv_heads: int = 1) -> ModelShape:
    """The ``--quick`` dry-run model: 2 layers, hidden 128, MLP 256, D=64, float32."""
    return ModelShape(layers=2, hidden=128, intermediate=256, heads=heads, kv_heads=kv_heads, head_dim=64,
                      vocab=vocab, dtype=torch.float32)


def build_bidirectional_mistral(shape: ModelShape, device: torch.device, attn_implementation: str = "sdpa",
                                seed: int = 0, pad_token_id: int = 2):
    """A random-weight ``MistralBiModel`` of ``shape`` (no sliding window, bos 1, eos 2), made directly on
    ``device`` in ``shape.dtype`` from ``torch.manual_seed(seed)``, in eval mode with no parameter requiring
    grad. ``pad_token_id`` is the embedding row left at zero."""
    from transformers import MistralConfig

    from llm2vec_fast.models import MistralBiModel
    config = MistralConfig(vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                           num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                           num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, sliding_window=None,
                           max_position_embeddings=4096, pad_token_id=pad_token_id, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn_implementation
    previous = torch.get_default_dtype()
    torch.manual_seed(seed)
    try:
        torch.set_default_dtype(shape.dtype)
        with torch.device(device):
            model = MistralBiModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(device=device, dtype=shape.dtype).eval().requires_grad_(False)


def set_attention(model, attn_implementation: str) -> None:
    """Switches ``model`` (a transformers model) to ``attn_implementation``, or skips the impl if it cannot."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    else:
        model.config._attn_implementation = attn_implementation
    if model.config._attn_implementation != attn_implementation:
        raise harness.SkipImpl(f"could not switch to attn_implementation={attn_implementation!r}")


def lognormal_lengths(count: int, mean: float, sigma: float, low: int, high: int, seed: int = 0,
                      generator: Optional[torch.Generator] = None) -> List[int]:
    """``count`` lengths from a lognormal of spread ``sigma`` whose mean is ``mean`` (the median is set so),
    rounded and clipped to [low, high]. Drawn from ``generator`` when given (which then goes on from there),
    else from a fresh one seeded with ``seed``. (``harness.lognormal_lengths`` differs: a total, not a count.)"""
    if generator is None:
        generator = torch.Generator().manual_seed(seed)
    median = mean / math.exp(sigma ** 2 / 2)
    draws = torch.exp(math.log(median) + sigma * torch.randn(count, generator=generator))
    return [int(min(max(round(x), low), high)) for x in draws.tolist()]


def forward_flops(shape: ModelShape, lengths: Sequence[int]) -> float:
    """Useful FLOPs of a decoder forward over sequences of ``lengths`` (real tokens only): the linear
    layers (2 * tokens * parameters) plus the attention scores and values (4 * sum(n^2) * Hq * D)."""
    s = shape
    attn_params = s.hidden * (s.heads + 2 * s.kv_heads) * s.head_dim + s.heads * s.head_dim * s.hidden
    layer_params = attn_params + 3 * s.hidden * s.intermediate
    scores = 4 * sum(n * n for n in lengths) * s.heads * s.head_dim
    return s.layers * (2 * sum(lengths) * layer_params + scores)
