"""RMSNorm benchmark: ops ``rms_norm`` (forward, no grad: what encoding runs) and ``rms_norm_fwd_bwd``
(training), judged in GB/s.

Impls, on the same (T, D) rows and weight:
- ours: ``lf.rms_norm(x, weight, casting_mode="llama", backend=b)`` for every backend that runs here;
- ``transformers_eager``: ``LlamaRMSNorm.forward``, the module every Llama/Mistral/Qwen layer runs twice
  (upcast, square, mean, rsqrt, scale, downcast, weight: several passes over fp32 copies);
- ``liger``: Liger-Kernel's ``LigerRMSNorm`` (casting_mode="llama"), when liger-kernel is importable.

GB/s counts the bytes a one-pass kernel must move, the same for every impl: forward reads x and writes y
(2 * T * D * elem); forward + backward also reads x and dy and writes dx (5 * T * D * elem; the weight
and the per-row statistics are negligible). An impl that makes more passes pays for them in time.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Tuple

import torch

import llm2vec_fast as lf
from llm2vec_fast import dispatch

from .harness import Case, SkipImpl, randn

OPS = ("rms_norm", "rms_norm_fwd_bwd")
# (rows, D): per-head q/k norms (Qwen3: 16k tokens x 32 heads of 128), then 7B- and 70B-class hidden sizes.
FULL_SHAPES = ((16384 * 32, 128), (16384, 4096), (16384, 8192))
QUICK_SHAPES = ((256, 64),)
EPS = 1e-5

METHOD_NOTES = [
    "rms_norm: casting_mode=llama (Llama/Mistral/Qwen); GB/s = one pass's bytes for every impl (fwd: read x, write "
    "y; fwd+bwd: also read x and dy, write dx); transformers_eager is LlamaRMSNorm.forward, liger is LigerRMSNorm.",
]


def _transformers_module(dim: int, weight: torch.Tensor) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    module = LlamaRMSNorm(dim, eps=EPS).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


def _liger_module(dim: int, weight: torch.Tensor) -> torch.nn.Module:
    try:
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
    except ImportError:
        raise SkipImpl("liger-kernel is not installed") from None
    if weight.device.type != "cuda":
        raise SkipImpl("liger-kernel runs on a GPU only")
    module = LigerRMSNorm(dim, eps=EPS, casting_mode="llama").to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


def _timed(norm: Callable, x: torch.Tensor, with_backward: bool) -> Callable:
    if not with_backward:
        def forward():
            with torch.no_grad():
                return norm(x)
        return forward
    leaf = x.detach().requires_grad_(True)
    grad = randn(x.shape, x.dtype, x.device)

    def forward_backward():
        return torch.autograd.grad(norm(leaf), leaf, grad)
    return forward_backward


def impls(x: torch.Tensor, weight: torch.Tensor, with_backward: bool) -> List[Tuple[str, Callable]]:
    dim = x.shape[-1]
    ours = [b for b in ("triton", "cuda", "torch") if b in dispatch.available_backends("rms_norm", x.device)]

    def backend(name):
        return lambda: _timed(lambda t: lf.rms_norm(t, weight, EPS, backend=name), x, with_backward)

    def module(make):
        return lambda: _timed(make(dim, weight), x, with_backward)

    return ([(name, backend(name)) for name in ours] +
            [("transformers_eager", module(_transformers_module)), ("liger", module(_liger_module))])


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for tokens, dim in QUICK_SHAPES if quick else FULL_SHAPES:
        x = randn((tokens, dim), dtype, device)
        weight = randn((dim,), dtype, device, scale=0.5)
        element = x.element_size()
        for op, with_backward, passes in (("rms_norm", False, 2), ("rms_norm_fwd_bwd", True, 5)):
            yield Case(op, f"T={tokens},D={dim}", dtype, impls(x, weight, with_backward),
                       nbytes=float(passes * tokens * dim * element))
