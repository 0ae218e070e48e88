"""Shared by the tests of the fused elementwise ops (test_rms_norm.py, test_gated.py): where their backends
run, seeded inputs, and gradients of a function at fresh leaves."""
from __future__ import annotations

import pytest
import torch

from llm2vec_fast import dispatch

from cuda_support import CAN_EMULATE


def triton_device():
    """Where the triton kernels run here: the CPU under TRITON_INTERPRET=1, else a GPU, else nowhere (None)."""
    if dispatch.triton_interpreting():
        return "cpu"
    return "cuda" if torch.cuda.is_available() else None


def backends_and_devices(op: str):
    """(backend, device) params for ``op``: torch on the CPU; triton in the interpreter or on a GPU; cuda on the
    CPU through the emulator of csrc/ (``cuda-emulated``, marked ``emulated_cuda``: tests/conftest.py installs
    it), and on a GPU when the extension is built."""
    dispatch._load_backends()
    device = triton_device()
    skip = (op, "triton") not in dispatch._REGISTRY or device is None
    built = dispatch._importable(dispatch.EXTENSION)
    return [pytest.param("torch", "cpu", id="torch"),
            pytest.param("triton", device or "cpu", id="triton", marks=pytest.mark.skipif(
                skip, reason="triton runs in the interpreter (TRITON_INTERPRET=1) or on a GPU")),
            pytest.param("cuda", "cpu", id="cuda-emulated", marks=[pytest.mark.emulated_cuda, pytest.mark.skipif(
                not CAN_EMULATE, reason="the CPU emulator of csrc/ needs g++ and the CUDA headers")]),
            pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
                not built, reason=f"the CUDA extension {dispatch.EXTENSION} is not built")])]


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


def assert_matches_reference_and_fp64(backend, names, got, want, truth, *, truth_atol):
    """fp32: each output of ``backend`` (``got``) equals the torch reference's (``want``: same dtype and shape,
    to fp32 rounding) and the float64 formula's (``truth``, within ``truth_atol``)."""
    for name, g, w, t in zip(names, got, want, truth):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5, msg=f"{backend} {name} vs reference")
        torch.testing.assert_close(g.double().cpu(), t, atol=truth_atol, rtol=1e-5, msg=f"{backend} {name} vs float64")


def assert_within_bound_of_torch(names, got, base, truth, *, truncation_ulps=0):
    """flash-attention's criterion against the float64 ``truth``: the first output within 2x, the gradients
    within 3x of the error of ``base`` (torch's own computation in the same dtype), plus ``truncation_ulps``
    bf16 units in the last place at the largest true value (the interpreter truncates where a GPU rounds)."""
    report = []
    for index, (name, g, b, t) in enumerate(zip(names, got, base, truth)):
        factor = 2.0 if index == 0 else 3.0
        assert torch.isfinite(g).all(), name
        ours, torch_err = max_err(g.cpu(), t), max_err(b.cpu(), t)
        assert torch_err > 0, f"{name}: torch in {g.dtype} is exact, so the bound says nothing"
        slack = truncation_ulps * 2.0 ** -7 * t.abs().max().item()
        report.append(f"{name}: ours {ours:.3g}, torch {torch_err:.3g}")
        assert ours <= factor * torch_err + slack + 1e-6, "; ".join(report)


def assert_rounds_like(got, want, *, min_equal=0.99):
    """A 16-bit output rounded as ``want`` was (same roundings in the same places): at least ``min_equal`` of the
    elements are the same bits, the rest one unit in the last place away (a float32 sum in another order can
    flip a tie). A missing rounding step (one rounding where the reference has two) differs in far more."""
    assert got.dtype == want.dtype and got.shape == want.shape
    got, want = got.cpu(), want.cpu()
    equal = (got == want).float().mean().item()
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
    assert ((got.float() - want.float()).abs() <= ulp * 1.01).all(), "more than one unit in the last place off"
    assert equal >= min_equal, f"only {equal:.1%} of the elements have the reference's bits"


def skip_if_interpreted_bf16(backend):
    """The Triton interpreter casts float32 to bfloat16 by truncation where a GPU rounds to nearest."""
    if backend == "triton" and dispatch.triton_interpreting():
        pytest.skip("the Triton interpreter truncates to bfloat16 (a GPU rounds to nearest)")
