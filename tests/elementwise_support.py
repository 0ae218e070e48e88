"""Shared by the tests of the fused elementwise ops (test_rms_norm.py, test_gated.py): where their backends
run, seeded inputs, and gradients of a function at fresh leaves."""
from __future__ import annotations

import pytest
import torch

from llm2vec_fast import dispatch


def triton_device():
    """Where the triton kernels run here: the CPU under TRITON_INTERPRET=1, else a GPU, else nowhere (None)."""
    if dispatch.triton_interpreting():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def backends_and_devices(op: str):
    """(backend, device) params for ``op``: torch on the CPU; triton in the interpreter or on a GPU."""
    dispatch._load_backends()
    device = triton_device()
    skip = (op, "triton") not in dispatch._REGISTRY or device is None
    return [pytest.param("torch", "cpu", id="torch"),
            pytest.param("triton", device or "cpu", id="triton", marks=pytest.mark.skipif(
                skip, reason="triton runs in the interpreter (TRITON_INTERPRET=1) or on a GPU"))]


def randn(*shape, seed, dtype=torch.float32, device="cpu", scale=1.0, shift=0.0):
    """scale * N(0, 1) + shift from a seeded generator (never zeros), then cast and moved."""
    generator = torch.Generator().manual_seed(seed)
    values = scale * torch.randn(*shape, generator=generator, dtype=torch.float64) + shift
    return values.to(device=device, dtype=dtype)


def grads_of(fn, inputs, grad_out):
    """(fn(*inputs), then its gradients with respect to every input for the output gradient grad_out)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    return (out,) + torch.autograd.grad(out, leaves, grad_out.to(out.dtype))


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
