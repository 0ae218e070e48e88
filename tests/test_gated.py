"""Tests of ``llm2vec_fast.gated_activation`` (act(gate) * up: SwiGLU and GeGLU): the reference against
float64 formulas and transformers' ``act_fn(gate) * up`` (bit for bit), every backend against them (the
triton kernels through the interpreter under ``make test``, on a GPU otherwise), strided and in-place
forms, gradients, bad input, the custom-op registration, and the lean gated MLPs that run it in the models.

The interpreter casts float32 to bfloat16 by truncation where a GPU rounds to nearest, and the op rounds
twice (act(gate), then the product, as transformers does): under the interpreter the bf16 bound carries
two bf16 units in the last place more.
"""
from __future__ import annotations

import math

import re

import pytest
import torch

import llm2vec_fast as lf
from llm2vec_fast import dispatch
from llm2vec_fast.reference.gated import GELU_TANH_CUBIC, GELU_TANH_SCALE

from cuda_support import cubin_report, needs_build, needs_emulator
from cuda_support import extension as cuda_extension
from elementwise_support import (assert_matches_reference_and_fp64, assert_rounds_like, assert_within_bound_of_torch,
                                 backends_and_devices, grads_of, randn, skip_if_interpreted_bf16, triton_device)

FWD_OP = torch.ops.llm2vec_fast.gated_activation_forward
INPLACE_OP = torch.ops.llm2vec_fast.gated_activation_inplace
BWD_OP = torch.ops.llm2vec_fast.gated_activation_backward
ACTIVATIONS = ("silu", "gelu_tanh")


def exact(gate, up, activation):
    """The definition in float64, differentiable."""
    gate, up = gate.double(), up.double()
    if activation == "silu":
        return gate * torch.sigmoid(gate) * up
    return 0.5 * gate * (1 + torch.tanh(GELU_TANH_SCALE * (gate + GELU_TANH_CUBIC * gate ** 3))) * up


def transformers_product(gate, up, activation):
    """transformers' own ``act_fn(gate) * up``."""
    from transformers.activations import ACT2FN
    return ACT2FN["silu" if activation == "silu" else "gelu_pytorch_tanh"](gate) * up


# ---------------------------------------------------------------------------------------------------
# 1. the reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_fp64_formula_and_its_gradient(activation):
    gate, up = randn(7, 113, seed=1, scale=2.0), randn(7, 113, seed=2)
    grad_out = randn(7, 113, seed=3)
    got = grads_of(lambda g, u: lf.gated_activation(g, u, activation, backend="torch"), [gate, up], grad_out)
    want = grads_of(lambda g, u: exact(g, u, activation), [gate.double(), up.double()], grad_out)
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-6, rtol=2e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_is_transformers_product_bit_for_bit(dtype, activation):
    gate, up = randn(9, 300, seed=4, dtype=dtype, scale=3.0), randn(9, 300, seed=5, dtype=dtype)
    ours = lf.gated_activation(gate, up, activation, backend="torch")
    assert torch.equal(ours, transformers_product(gate, up, activation))


# ---------------------------------------------------------------------------------------------------
# 2. every backend
# ---------------------------------------------------------------------------------------------------
# (leading shape, I): one element, odd sizes, a 3-D input, a width past one 1024-column block.
SHAPES = [((1,), 1), ((17,), 113), ((3, 5), 17), ((2,), 2049)]


@pytest.mark.parametrize("backend,device", backends_and_devices("gated_activation"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape,width", SHAPES)
def test_fp32_matches_the_reference_and_fp64(backend, device, activation, shape, width):
    gate = randn(*shape, width, seed=10 + width, device=device, scale=2.5)
    up, grad_out = randn(*shape, width, seed=11, device=device), randn(*shape, width, seed=12, device=device)

    def run(name):
        return grads_of(lambda g, u: lf.gated_activation(g, u, activation, backend=name), [gate, up], grad_out)

    got, want = run(backend), run("torch")
    truth = grads_of(lambda g, u: exact(g, u, activation), [gate.cpu().double(), up.cpu().double()], grad_out.cpu())
    assert_matches_reference_and_fp64(backend, ("out", "dgate", "dup"), got, want, truth, truth_atol=1e-5)


@pytest.mark.parametrize("backend,device", backends_and_devices("gated_activation"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_bound_of_torch(backend, device, activation, dtype):
    """fp16/bf16 against float64: within 2x (out) / 3x (gradients) of transformers' own computation in that
    dtype, plus two bf16 units in the last place under the interpreter."""
    gate = randn(37, 1000, seed=20, dtype=dtype, device=device, scale=3.0)
    up, grad_out = randn(37, 1000, seed=21, dtype=dtype, device=device), randn(37, 1000, seed=22, dtype=dtype,
                                                                             device=device)
    got = grads_of(lambda g, u: lf.gated_activation(g, u, activation, backend=backend), [gate, up], grad_out)
    base = grads_of(lambda g, u: transformers_product(g, u, activation), [gate, up], grad_out)
    truth = grads_of(lambda g, u: exact(g, u, activation), [gate.cpu().double(), up.cpu().double()], grad_out.cpu())
    truncating = backend == "triton" and dispatch.triton_interpreting() and dtype == torch.bfloat16
    # two roundings (act(gate), then the product): two units in the last place under the interpreter
    assert_within_bound_of_torch(("out", "dgate", "dup"), got, base, truth, truncation_ulps=2 if truncating else 0)


@pytest.mark.parametrize("backend,device", backends_and_devices("gated_activation"))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_output_rounds_as_the_reference(backend, device, activation):
    """act(gate) rounded to bf16, then the product rounded, as transformers' act_fn(gate) * up: the same bits
    but for rare ties. One rounding of the float32 product instead changes a large share of the elements.
    gate stays within +-3: below that, torch's 0.5 g (1 + tanh(z)) cancels to 0 where the kernels' g sigmoid(2 z)
    keeps the tiny true value."""
    skip_if_interpreted_bf16(backend)
    gate = randn(64, 1024, seed=27, dtype=torch.bfloat16, device=device, scale=1.5).clamp(-3, 3)
    up = randn(64, 1024, seed=28, dtype=torch.bfloat16, device=device)
    want = lf.gated_activation(gate.cpu(), up.cpu(), activation, backend="torch")
    assert_rounds_like(lf.gated_activation(gate, up, activation, backend=backend), want)


@pytest.mark.parametrize("backend,device", backends_and_devices("gated_activation"))
def test_strided_halves_in_place_and_empty(backend, device):
    """The two halves of a fused (N, 2I) gate_up output are read in place; inplace=True writes into gate (the
    same values as the functional form) and returns it; an empty input gives an empty output."""
    fused = randn(13, 2 * 40, seed=30, device=device, scale=2.0)
    gate, up = fused.chunk(2, dim=-1)
    assert gate.stride() == (80, 1)
    want = lf.gated_activation(gate.contiguous(), up.contiguous(), backend=backend)
    torch.testing.assert_close(lf.gated_activation(gate, up, backend=backend), want, atol=1e-6, rtol=1e-6)
    own = gate.contiguous()
    with torch.no_grad():
        out = lf.gated_activation(own, up, "silu", inplace=True, backend=backend)
    assert out is own and torch.equal(own, want)
    empty = torch.empty(0, 40, device=device)
    assert lf.gated_activation(empty, empty, backend=backend).shape == (0, 40)



@pytest.mark.parametrize("backend,device", backends_and_devices("gated_activation"))
def test_in_place_refuses_an_up_it_would_overwrite_before_reading(backend, device):
    """inplace=True writes gate while up is read: an up sharing some of gate's memory (a shifted view, or gate's
    first row expanded) would be read after being overwritten (the triton kernel gave other values than the
    functional form). It raises, leaving gate as it was; up = gate itself (each element read, then written) runs."""
    buffer = randn(5 * 8, seed=31, device=device)
    shifted = (buffer[8:40].view(4, 8), buffer[0:32].view(4, 8))
    gate = randn(4, 8, seed=32, device=device)
    for gate_view, up_view in (shifted, (gate, gate[:1].expand(4, 8))):
        before = gate_view.clone()
        with torch.no_grad(), pytest.raises(ValueError, match="gate and up to share no memory"):
            lf.gated_activation(gate_view, up_view, inplace=True, backend=backend)
        assert torch.equal(gate_view, before)
    want = lf.gated_activation(gate, gate.clone(), backend=backend)
    with torch.no_grad():
        assert torch.equal(lf.gated_activation(gate, gate, inplace=True, backend=backend), want)
    with torch.inference_mode():
        frozen = randn(4, 8, seed=33, device=device)
    with pytest.raises(ValueError, match="gate is an inference tensor"):
        lf.gated_activation(frozen, frozen.clone(), inplace=True, backend=backend)
    with torch.inference_mode():
        want = lf.gated_activation(frozen, frozen, backend=backend)
        assert torch.equal(lf.gated_activation(frozen, frozen.clone(), inplace=True, backend=backend), want)

# ---------------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/gated.cu): vector width, emulated runs, the cubin
# ---------------------------------------------------------------------------------------------------
@pytest.mark.emulated_cuda
@needs_emulator
@pytest.mark.parametrize("width,half,vec", [(40, 40, 8), (36, 36, 1), (1029, 1032, 1)],
                         ids=["aligned-halves", "misaligned-up", "odd-width"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_emulated_cuda_kernels_on_fused_halves(_cuda_kernels_in_the_emulator, width, half, vec, activation):
    """The two halves of a fused bf16 (N, 2I) gate_up output, read where they lie: 16-byte vectors when both
    halves' rows and the outputs' are 16-byte aligned (I = 40: up starts 80 bytes in), element by element when
    not (I = 36: up starts 72 bytes in; I = 1029: the contiguous outputs' rows are 2058 bytes apart). Forward
    (functional and in place) and backward match the reference, over steps of 4 rows with a ragged last one.
    Into a strided output of aligned rows, an odd width runs in 16-byte vectors ending in a partial one."""
    emulated = _cuda_kernels_in_the_emulator
    fused = randn(23, 2 * half, seed=70, dtype=torch.bfloat16, scale=2.0)
    gate, up = fused[:, :width], fused[:, half:half + width]
    grad_out = randn(23, width, seed=71, dtype=torch.bfloat16)
    got = grads_of(lambda g, u: lf.gated_activation(g, u, activation, backend="cuda"), [gate, up], grad_out)
    assert emulated.last_plan["vec"] == vec
    want = grads_of(lambda g, u: lf.gated_activation(g, u, activation, backend="torch"), [gate, up], grad_out)
    for name, g, w in zip(("out", "dgate", "dup"), got, want):
        assert torch.isfinite(g).all(), name  # the outputs start as NaN: every element was written
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=1e-2, msg=name)
    own = gate.contiguous()
    with torch.no_grad():
        assert lf.gated_activation(own, up, activation, inplace=True, backend="cuda") is own
    assert torch.equal(own, got[0].detach())
    assert emulated.launches == {"gated_forward": 2, "gated_backward": 1}
    padded = torch.full((23, half), 7.0, dtype=torch.bfloat16)
    emulated.gated_forward(gate, up, activation == "gelu_tanh", out=padded[:, :width])
    assert emulated.last_plan["vec"] == (8 if width == 1029 else vec)  # 16-byte rows now, a partial last vector
    assert torch.equal(padded[:, :width], got[0].detach()) and (padded[:, width:] == 7).all()


@needs_build
def test_cuda_extension_gated_plan_and_checks():
    """The extension's plan for CPU tensors (launches nothing) and its argument checks, before any CUDA work."""
    ext = cuda_extension()
    fused = torch.randn(9, 80, dtype=torch.bfloat16)
    assert ext.gated_plan(fused[:, :40], fused[:, 40:]) == {"vec": 8, "col_blocks": 1, "row_blocks": 3}
    assert ext.gated_plan(fused[:, :36], fused[:, 36:72])["vec"] == 1
    rows = torch.randn(300000, 3000)
    assert ext.gated_plan(rows[:, :1000], rows[:, 1000:2000]) == {"vec": 4, "col_blocks": 1, "row_blocks": 65535}
    with pytest.raises(ValueError, match="up must have gate's shape"):
        ext.gated_forward(fused[:, :40], fused[:, :39], False)
    with pytest.raises(TypeError, match="gate must have dtype float32, float16 or bfloat16"):
        ext.gated_forward(torch.ones(2, 8, dtype=torch.int32), torch.ones(2, 8, dtype=torch.int32), False)
    with pytest.raises(ValueError, match="gate must be a CUDA tensor"):
        ext.gated_backward(fused[:, :40], fused[:, :40], fused[:, 40:], True)


@needs_build
def test_cuda_cubin_gated_kernels_use_16_byte_accesses_without_spills():
    report = cubin_report(cuda_extension())["kernels"]
    seen = set()
    for name, kernel in report.items():
        found = re.search(r"gated_kernelI(13__nv_bfloat16|6__half|f)Li(\d+)ELb([01])E", name)
        if not found or "sass" not in kernel:
            continue
        seen.add(found.groups())
        assert kernel.get("stack", 0) == 0, name
        if found.group(2) != "1":  # the 16-byte instantiations: 4 rows of loads in flight per input
            assert len(re.findall(r"LDG\.E\.128", kernel["sass"])) >= 8, name
            assert "STG.E.128" in kernel["sass"], name
    assert len(seen) == 3 * 2 * 2, sorted(seen)  # 3 dtypes x (16-byte, scalar) x (forward, backward)


# ---------------------------------------------------------------------------------------------------
# 3. bad input, registration
# ---------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(gate=[1.0]), TypeError, "gate must be a torch.Tensor, got list"),
    (dict(up=torch.ones(3, 7)), ValueError, r"up must have gate's shape \(3, 8\), got \(3, 7\)"),
    (dict(up=torch.ones(3, 8, dtype=torch.float16)), TypeError, "up must have the same dtype as gate"),
    (dict(gate=torch.ones(3, 8, dtype=torch.int32), up=torch.ones(3, 8, dtype=torch.int32)), TypeError,
     "gate must have dtype in"),
    (dict(gate=torch.ones(3, 0), up=torch.ones(3, 0)), ValueError,
     r"gate must be \(\.\.\., width >= 1\), got shape \(3, 0\)"),
    (dict(activation="relu"), ValueError, r"activation must be one of \['silu', 'gelu_tanh'\], got 'relu'"),
    (dict(inplace=1), TypeError, "inplace must be a bool, got int 1"),
    (dict(gate=torch.ones(8, 3).t(), up=torch.ones(3, 8), inplace=True), ValueError, "needs a contiguous gate"),
    (dict(gate=torch.ones(3, 8, requires_grad=True), inplace=True), ValueError, "computes no gradients"),
    (dict(backend="flash_attn"), ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,error,pattern", BAD_INPUTS)
def test_bad_input_raises_naming_argument_and_value(overrides, error, pattern):
    args = dict(gate=torch.ones(3, 8), up=torch.ones(3, 8), activation="silu", backend="auto")
    args.update(overrides)
    with pytest.raises(error, match=pattern):
        lf.gated_activation(args.pop("gate"), args.pop("up"), args.pop("activation"), **args)


def test_opcheck_and_fullgraph_compile():
    gate, up = randn(6, 24, seed=50, scale=2.0), randn(6, 24, seed=51)
    for activation in ACTIVATIONS:
        torch.library.opcheck(FWD_OP.default, (gate.requires_grad_(True), up.requires_grad_(True), activation,
                                               "torch"))
        torch.library.opcheck(INPLACE_OP.default, (gate.detach().clone(), up.detach(), activation, "torch"))
        torch.library.opcheck(BWD_OP.default, (randn(6, 24, seed=52), gate.detach(), up.detach(), activation,
                                               "torch"))
    torch._dynamo.reset()

    def fn(g, u):
        return lf.gated_activation(g * 1.5, u, "gelu_tanh").sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    grad_out = randn(6, seed=53)
    for g, w in zip(grads_of(compiled, [gate, up], grad_out), grads_of(fn, [gate, up], grad_out)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# 4. inside the models: lean gated MLPs run the fused op where FUSED_BACKENDS names the device
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton_device() != "cpu", reason="runs the triton op on the CPU through the interpreter")
@pytest.mark.parametrize("family,activation", [("mistral", "silu"), ("gemma", "gelu_tanh"), ("phi3", "silu")])
def test_lean_mlps_run_the_fused_op_in_the_models(monkeypatch, family, activation):
    """A packed forward with the fused MLP products (triton, interpreted; Phi-3's from the strided halves of its
    fused gate_up projection) matches transformers' products, with and without gradients, every MLP going
    through the op (in place without gradients where gate has its own buffer)."""
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed, lean
    from llm2vec_fast.ops import gated as op_module

    model = bi_model(family)
    mlps = [m for m in model.modules() if lean.is_gated_mlp(m)]
    ids, mask = make_batch(seed=62)
    with torch.no_grad():
        plain = forward_packed(model, ids, mask).hidden
    calls = []
    real = op_module.gated_activation

    def recording(gate, up, act, **kwargs):
        calls.append((act, kwargs["inplace"], kwargs["backend"]))
        return real(gate, up, act, **kwargs)

    monkeypatch.setattr(op_module, "gated_activation", recording)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "triton"})
    monkeypatch.setattr(lean, "_PROBES", {})
    with torch.no_grad():
        fused = forward_packed(model, ids, mask).hidden
    in_place = family != "phi3"  # Phi-3's gate is a strided half of gate_up's output: a new buffer
    assert calls[-len(mlps):] == [(activation, in_place, "triton")] * len(mlps)
    assert lean._PROBES and all(lean._PROBES.values())
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    # With gradients, inside lean_layers as training runs: the functional, differentiable form.
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    calls.clear()
    with lean.lean_layers(model):
        out = forward_packed(model, ids, mask).hidden
        fused_grads = torch.autograd.grad(out.square().sum(), weights)
    assert calls == [(activation, False, "triton")] * len(mlps)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {})
    with lean.lean_layers(model):
        out = forward_packed(model, ids, mask).hidden
        plain_grads = torch.autograd.grad(out.square().sum(), weights)
    assert len(calls) == len(mlps)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_lean_mlp_keeps_an_activation_the_op_does_not_take(monkeypatch):
    """GELU without the tanh approximation is not the op's: the MLP keeps its own activation; so does every MLP
    with LLM2VEC_FAST_FUSED_OPS=0."""
    from llm2vec_fast.models import lean

    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setattr(lean, "_PROBES", {})
    gate = randn(4, 16, seed=70)
    assert lean._fused_gate(torch.nn.GELU(), gate) is None
    assert lean._fused_gate(torch.nn.SiLU(), gate) is not None
    assert lean._fused_gate(torch.nn.SiLU(), gate.double()) is None  # a dtype the op does not take
    assert math.isclose(len(lean._PROBES), 1)
    monkeypatch.setenv(lean.FUSED_OPS_ENV, "0")  # switched off: transformers' own product everywhere
    assert lean._fused_gate(torch.nn.SiLU(), gate) is None
