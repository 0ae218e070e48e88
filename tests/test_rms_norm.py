"""Tests of ``llm2vec_fast.rms_norm``: the reference against float64 formulas and transformers' own RMSNorm
modules (bit for bit), every backend against them (the triton kernels through the interpreter under
``make test``, on a GPU otherwise), gradients, bad input, the custom-op registration, and the lean layers
that run it inside the models.

The interpreter casts float32 to bfloat16 by truncation (round toward zero) where a GPU rounds to nearest
(fp16 it rounds to nearest): a bf16 output there may be one unit in the last place further from the truth
than the GPU's, so the bf16 bound under the interpreter carries that one unit more.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import llm2vec_fast as lf
from llm2vec_fast import dispatch
from llm2vec_fast.reference.rms_norm import rms_norm_backward, rms_norm_forward

from cuda_support import CAN_BUILD, cubin_report, emulated_extension, needs_build, needs_emulator
from cuda_support import extension as cuda_extension
from elementwise_support import (assert_matches_reference_and_fp64, assert_rounds_like, assert_within_bound_of_torch,
                                 backends_and_devices, grads_of, max_err, randn, skip_if_interpreted_bf16,
                                 triton_device)

FWD_OP = torch.ops.llm2vec_fast.rms_norm_forward
BWD_OP = torch.ops.llm2vec_fast.rms_norm_backward
STYLES = [("llama", 0.0), ("gemma", 1.0)]  # (casting_mode, offset) of the families


def exact(x, weight, eps, offset):
    """The definition in float64: x / sqrt(mean(x^2) + eps) * (offset + weight), differentiable."""
    x, weight = x.double(), weight.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight)


# ---------------------------------------------------------------------------------------------------
# 1. the reference: float64 formulas, and transformers' modules bit for bit
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("casting_mode,offset", STYLES)
def test_reference_matches_fp64_formula_and_its_gradient(casting_mode, offset):
    x, weight = randn(2, 17, 113, seed=1, dtype=torch.float64), randn(113, seed=2, dtype=torch.float64) * 0.3
    grad_out = randn(2, 17, 113, seed=3, dtype=torch.float64)
    got = grads_of(lambda a, w: lf.rms_norm(a.float(), w.float(), 1e-5, offset=offset, casting_mode=casting_mode,
                                            backend="torch"), [x, weight], grad_out)
    want = grads_of(lambda a, w: exact(a, w, 1e-5, offset), [x, weight], grad_out)
    for name, g, w in zip(("out", "dx", "dweight"), got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-5, rtol=1e-5, msg=name)
    assert max_err(want[2], 0 * want[2]) > 1e-2  # the weight gradient is not trivially zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_reference_is_transformers_modules_bit_for_bit(dtype):
    """Llama-style (Llama, Mistral, Qwen2, Qwen3, Phi-3) and Gemma-style (Gemma 1/2/3) modules: the same bits
    forward, and the same gradients as autograd through the module (bitwise in fp32)."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

    dim = 96
    x = randn(7, dim, seed=4, dtype=dtype)
    for module, mode, offset, eps in ((LlamaRMSNorm(dim, eps=1e-5), "llama", 0.0, 1e-5),
                                      (Qwen3RMSNorm(dim, eps=1e-6), "llama", 0.0, 1e-6),
                                      (Gemma2RMSNorm(dim, eps=1e-6), "gemma", 1.0, 1e-6)):
        module = module.to(dtype)
        with torch.no_grad():
            module.weight.copy_(randn(dim, seed=5, dtype=dtype) * 0.5)
        ours = lf.rms_norm(x, module.weight, eps, offset=offset, casting_mode=mode, backend="torch")
        assert torch.equal(ours, module(x)), type(module).__name__
        if dtype == torch.float32:
            grad_out = randn(7, dim, seed=6)
            xs = x.clone().requires_grad_(True)
            theirs = torch.autograd.grad(module(xs), (xs, module.weight), grad_out)
            mine = grads_of(lambda a, w: lf.rms_norm(a, w, eps, offset=offset, casting_mode=mode, backend="torch"),
                            [x, module.weight], grad_out)[1:]
            for a, b in zip(mine, theirs):
                torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-6)


def test_casting_modes_differ_where_they_should():
    """bf16: llama rounds n before the weight multiplies it, gemma rounds once; not the same bits."""
    x, weight = randn(64, 256, seed=7, dtype=torch.bfloat16), randn(256, seed=8, dtype=torch.bfloat16)
    llama = lf.rms_norm(x, weight, casting_mode="llama", backend="torch")
    gemma = lf.rms_norm(x, weight, casting_mode="gemma", backend="torch")
    assert not torch.equal(llama, gemma) and max_err(llama, gemma) < 0.1


# ---------------------------------------------------------------------------------------------------
# 2. every backend against the reference and the float64 formula
# ---------------------------------------------------------------------------------------------------
# (leading shape, D): odd row counts and widths, one row, a 3-D input, a width past one block of 1024.
SHAPES = [((1,), 17), ((113,), 64), ((3, 17), 113), ((5,), 1500)]


@pytest.mark.parametrize("backend,device", backends_and_devices("rms_norm"))
@pytest.mark.parametrize("casting_mode,offset", STYLES)
@pytest.mark.parametrize("shape,dim", SHAPES)
def test_fp32_matches_the_reference(backend, device, casting_mode, offset, shape, dim):
    x = randn(*shape, dim, seed=10 + dim, device=device, shift=0.3)
    weight = randn(dim, seed=11, device=device) * 0.4
    grad_out = randn(*shape, dim, seed=12, device=device)

    def run(name):
        return grads_of(lambda a, w: lf.rms_norm(a, w, 1e-6, offset=offset, casting_mode=casting_mode, backend=name),
                        [x, weight], grad_out)

    got, want = run(backend), run("torch")
    truth = grads_of(lambda a, w: exact(a, w, 1e-6, offset), [x.cpu().double(), weight.cpu().double()], grad_out.cpu())
    assert_matches_reference_and_fp64(backend, ("out", "dx", "dweight"), got, want, truth, truth_atol=5e-5)


@pytest.mark.parametrize("backend,device", backends_and_devices("rms_norm"))
@pytest.mark.parametrize("casting_mode,offset", STYLES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_within_bound_of_torch(backend, device, casting_mode, offset, dtype):
    """fp16/bf16 against the float64 formula: within 2x (out) / 3x (gradients) of the error of the torch
    reference in that dtype (transformers' own computation), plus an ulp under the interpreter for bf16."""
    rows, dim = 37, 1000
    x = randn(rows, dim, seed=20, dtype=dtype, device=device, shift=0.2)
    weight = randn(dim, seed=21, dtype=dtype, device=device) * 0.5
    grad_out = randn(rows, dim, seed=22, dtype=dtype, device=device)

    def run(name):
        return grads_of(lambda a, w: lf.rms_norm(a, w, 1e-6, offset=offset, casting_mode=casting_mode, backend=name),
                        [x, weight], grad_out)

    got, base = run(backend), run("torch")
    truth = grads_of(lambda a, w: exact(a, w, 1e-6, offset), [x.cpu().double(), weight.cpu().double()], grad_out.cpu())
    truncating = backend == "triton" and dispatch.triton_interpreting() and dtype == torch.bfloat16
    assert_within_bound_of_torch(("out", "dx", "dweight"), got, base, truth, truncation_ulps=1 if truncating else 0)


@pytest.mark.parametrize("backend,device", backends_and_devices("rms_norm"))
@pytest.mark.parametrize("casting_mode,offset", STYLES)
def test_bf16_output_rounds_as_the_reference(backend, device, casting_mode, offset):
    """The casting mode's roundings are the reference's (llama: n rounded to bf16 before the weight, then the
    product; gemma: one rounding): the same bits but for rare ties. Leaving out llama's first rounding changes
    about a fifth of the elements."""
    skip_if_interpreted_bf16(backend)
    x = randn(64, 1024, seed=25, dtype=torch.bfloat16, device=device, shift=0.2)
    weight = randn(1024, seed=26, dtype=torch.bfloat16, device=device, scale=0.7)
    want = lf.rms_norm(x.cpu(), weight.cpu(), offset=offset, casting_mode=casting_mode, backend="torch")
    assert_rounds_like(lf.rms_norm(x, weight, offset=offset, casting_mode=casting_mode, backend=backend), want)


@pytest.mark.parametrize("backend,device", backends_and_devices("rms_norm"))
def test_edge_shapes_and_non_contiguous_rows(backend, device):
    """No rows gives empty outputs and a zero weight gradient; a strided view gives the contiguous input's
    result; a row of zeros gives zeros (rstd = 1/sqrt(eps)), never NaN."""
    weight = randn(40, seed=30, device=device)
    empty = torch.empty(0, 40, device=device, requires_grad=True)
    out = lf.rms_norm(empty, weight, backend=backend)
    assert out.shape == (0, 40)
    (grad_w,) = torch.autograd.grad(lf.rms_norm(empty, weight.requires_grad_(True), backend=backend).sum(), weight)
    assert torch.equal(grad_w, torch.zeros_like(weight))
    weight = weight.detach()
    wide = randn(9, 80, seed=31, device=device)
    view = wide[:, ::2]  # last-dim stride 2
    torch.testing.assert_close(lf.rms_norm(view, weight, backend=backend),
                               lf.rms_norm(view.contiguous(), weight, backend=backend), atol=0, rtol=0)
    zeros = torch.zeros(3, 40, device=device)
    out = lf.rms_norm(zeros, weight, backend=backend)
    assert torch.isfinite(out).all() and torch.equal(out, torch.zeros_like(out))


@pytest.mark.parametrize("backend,device", backends_and_devices("rms_norm"))
@pytest.mark.parametrize("casting_mode,offset", STYLES)
def test_float32_weight_with_bf16_rows(backend, device, casting_mode, offset):
    """A float32 weight (kept in fp32 while the activations are bf16): y stays bf16, dweight float32, and the
    backends agree with the reference (which reads the weight in fp32, as the kernels do)."""
    x = randn(19, 96, seed=35, dtype=torch.bfloat16, device=device, shift=0.2)
    weight = randn(96, seed=36, device=device, scale=0.3)
    grad_out = randn(19, 96, seed=37, dtype=torch.bfloat16, device=device)

    def run(name):
        return grads_of(lambda a, w: lf.rms_norm(a, w, offset=offset, casting_mode=casting_mode, backend=name),
                        [x, weight], grad_out)

    got, want = run(backend), run("torch")
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    for name, g, w in zip(("out", "dx", "dweight"), got, want):
        torch.testing.assert_close(g.float(), w.float(), atol=0.05, rtol=0.02, msg=name)


@pytest.mark.skipif(triton_device() != "cpu", reason="sets the interpreter's program count")
@pytest.mark.parametrize("rows,dim", [(17, 1500), (203, 64)], ids=["one-row-tiles", "32-row-tiles"])
def test_triton_weight_gradient_sums_partials_over_uneven_row_runs(monkeypatch, rows, dim):
    """The backward's per-program partial weight gradients (rows split unevenly over 1, 3 and 7 programs, in
    tiles of one row at D = 1500 and of 32 rows at D = 64, the last tile partly past the end) sum to the
    reference's, and dx matches row by row."""
    from llm2vec_fast.kernels import rms_norm as kernel
    x, weight, grad_out = randn(rows, dim, seed=40), randn(dim, seed=41), randn(rows, dim, seed=42)
    want = grads_of(lambda a, w: lf.rms_norm(a, w, backend="torch"), [x, weight], grad_out)
    for programs in (1, 3, 7):
        monkeypatch.setattr(kernel, "BACKWARD_PROGRAMS_CPU", programs)
        got = grads_of(lambda a, w: lf.rms_norm(a, w, backend="triton"), [x, weight], grad_out)
        torch.testing.assert_close(got[2], want[2], atol=2e-5, rtol=1e-5, msg=f"dweight, {programs} programs")
        torch.testing.assert_close(got[1], want[1], atol=1e-5, rtol=1e-5, msg=f"dx, {programs} programs")


@pytest.mark.skipif(triton_device() != "cpu", reason="patches the interpreter's width limit")
def test_triton_rows_wider_than_its_limit_run_on_the_reference(monkeypatch):
    from llm2vec_fast.kernels import rms_norm as kernel
    monkeypatch.setattr(kernel, "MAX_D", 32)
    x, weight = randn(4, 40, seed=43), randn(40, seed=44)
    calls = []
    monkeypatch.setattr(kernel, "rms_norm_forward", lambda *a: calls.append(1) or rms_norm_forward(*a))
    monkeypatch.setattr(kernel, "rms_norm_backward", lambda *a: calls.append(2) or rms_norm_backward(*a))
    got = grads_of(lambda a, w: lf.rms_norm(a, w, backend="triton"), [x, weight], randn(4, 40, seed=45))
    want = grads_of(lambda a, w: lf.rms_norm(a, w, backend="torch"), [x, weight], randn(4, 40, seed=45))
    assert calls == [1, 2]
    for g, w in zip(got, want):
        assert torch.equal(g, w)


# ---------------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/rms_norm.cu): the launch plan, emulated runs, the cubin
# ---------------------------------------------------------------------------------------------------
# (dtype, D, view) -> the plan's (supported, warps per row, vectors per thread). Rows of 16-byte vectors up to
# 8192 values (4096 in float32); anything else (odd widths, misaligned rows, a float32 weight for bf16 rows)
# is declined and runs on the fallback (Triton, or torch where Triton cannot run).
PLANS = [
    ((torch.bfloat16, 128, "rows"), (True, 1, 1)),   # Qwen3's q/k norm: a warp a row, 8 rows a block
    ((torch.bfloat16, 1000, "rows"), (True, 2, 2)),
    ((torch.bfloat16, 4096, "rows"), (True, 8, 2)),  # 7B hidden size: a block a row, 2 vectors a thread
    ((torch.float16, 8192, "rows"), (True, 8, 4)),
    ((torch.float32, 4096, "rows"), (True, 8, 4)),
    ((torch.float32, 8192, "rows"), (False, None, None)),  # past the registers' budget
    ((torch.bfloat16, 16384, "rows"), (False, None, None)),
    ((torch.bfloat16, 17, "rows"), (False, None, None)),   # not whole 16-byte vectors
    ((torch.bfloat16, 64, "shifted"), (False, None, None)),  # base 2 bytes past 16-byte alignment
    ((torch.bfloat16, 64, "fp32 weight"), (False, None, None)),
]


def _plan_inputs(dtype, dim, view):
    x = randn(5, dim + 8, seed=60, dtype=dtype)
    x = x[:, 1:dim + 1] if view == "shifted" else x[:, :dim]  # rows of stride dim + 8 (16-byte aligned)
    weight = randn(dim, seed=61, dtype=torch.float32 if view == "fp32 weight" else dtype)
    return x, weight


@needs_emulator
@pytest.mark.parametrize("case,expected", PLANS, ids=[f"{c[0]}-{c[1]}-{c[2]}".replace("torch.", "") for c, _ in PLANS])
def test_cuda_plan_takes_whole_aligned_vectors_and_declines_the_rest(case, expected):
    """The plan as the emulator computes it (the .cu's own rms_norm_plan) and, where the extension builds, as the
    extension reports it for the same CPU tensors (bindings.cpp's dtype check included)."""
    x, weight = _plan_inputs(*case)
    planners = [emulated_extension()]
    if CAN_BUILD:
        planners.append(cuda_extension())
    for planner in planners:
        for backward in (False, True):
            plan = planner.rms_norm_plan(x, weight, backward=backward, num_sms=132)
            got = (plan["supported"],) + ((plan["warps_per_row"], plan["vecs_per_thread"]) if plan["supported"]
                                          else (None, None))
            assert got == expected, (type(planner).__name__, backward, plan)
            if plan["supported"]:
                rows_per_block = 8 // plan["warps_per_row"]
                blocks = -(-x.shape[0] // rows_per_block)
                assert plan["blocks"] == blocks  # at most 4 x 132 in the backward: fewer rows here
                assert plan["partial_rows"] == (blocks * rows_per_block if backward else 0)


@pytest.mark.emulated_cuda
@needs_emulator
@pytest.mark.parametrize("dtype,rows,dim", [(torch.float32, 203, 128), (torch.bfloat16, 37, 1000),
                                            (torch.float16, 9, 4096), (torch.bfloat16, 3, 8192)], ids=str)
@pytest.mark.parametrize("casting_mode,offset", STYLES)
def test_emulated_cuda_kernels_run_and_sum_the_partial_weight_gradients(_cuda_kernels_in_the_emulator, dtype, rows,
                                                                        dim, casting_mode, offset):
    """The kernels themselves run (not the fallback) for 1, 2 and 8 warps a row and 1 to 4 vectors a thread;
    with 3 SMs the backward's row groups walk several rows each (203 rows over 96 row groups at D = 128), and
    the partial weight gradients sum to the reference's."""
    emulated = _cuda_kernels_in_the_emulator
    x = randn(rows, dim, seed=62, dtype=dtype, shift=0.2)
    weight = randn(dim, seed=63, dtype=dtype, scale=0.5)
    grad_out = randn(rows, dim, seed=64, dtype=dtype)

    def run(name):
        return grads_of(lambda a, w: lf.rms_norm(a, w, 1e-6, offset=offset, casting_mode=casting_mode, backend=name),
                        [x, weight], grad_out)

    got, want = run("cuda"), run("torch")
    assert emulated.launches == {"rms_norm_forward": 1, "rms_norm_backward": 1} and not emulated.declined
    if dim == 128:  # 3 SMs x 4 blocks x 8 row groups: each walks 2 or 3 of the 203 rows
        assert emulated.last_plan["partial_rows"] == 96
    for name, g, w in zip(("out", "dx", "dweight"), got, want):
        assert g.dtype == w.dtype and torch.isfinite(g).all(), name
        if dtype == torch.float32:
            torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5, msg=name)
        else:  # rounding order: one unit in the last place of the result, or a dweight sum of rows x units
            torch.testing.assert_close(g.float(), w.float(), atol=2e-2 if name != "dweight" else 0.2, rtol=1e-2,
                                       msg=name)


@pytest.mark.emulated_cuda
@needs_emulator
def test_emulated_cuda_declines_to_the_fallback(_cuda_kernels_in_the_emulator):
    """An odd width goes to the fallback (the torch reference here: triton cannot run without the interpreter or
    a GPU) with the same results, and the decline is counted."""
    emulated = _cuda_kernels_in_the_emulator
    x, weight = randn(4, 17, seed=65), randn(17, seed=66)
    got = grads_of(lambda a, w: lf.rms_norm(a, w, backend="cuda"), [x, weight], randn(4, 17, seed=67))
    want = grads_of(lambda a, w: lf.rms_norm(a, w, backend="torch"), [x, weight], randn(4, 17, seed=67))
    assert emulated.declined == {"rms_norm_forward": 1, "rms_norm_backward": 1} and not emulated.launches
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-6, rtol=1e-6)


@needs_build
def test_cuda_cubin_row_kernels_use_16_byte_accesses_without_spills():
    """Every instantiation is in the sm_90a cubin with no stack frame, and the 16-bit ones move rows as
    LDG.E.128 / STG.E.128 (x and dy in the backward, y and dx stored)."""
    report = cubin_report(cuda_extension())["kernels"]
    seen = set()
    for name, kernel in report.items():
        found = re.search(r"(rms_norm_(?:fwd|bwd)_kernel)I(13__nv_bfloat16|6__half|f)Li(\d+)ELi(\d+)E", name)
        if not found or "sass" not in kernel:
            continue
        which, dtype, vpt = found.group(1), found.group(2), found.group(4)
        seen.add((which, dtype, vpt))
        assert report[name].get("stack", 0) == 0, name
        assert "LDG.E.128" in kernel["sass"], name
        if dtype != "f":
            assert "STG.E.128" in kernel["sass"], name
    assert len(seen) == 2 * 3 * 3, sorted(seen)  # fwd/bwd x 3 dtypes x 1, 2, 4 vectors a thread


# ---------------------------------------------------------------------------------------------------
# 3. bad input, registration
# ---------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(x=[1.0, 2.0]), TypeError, "x must be a torch.Tensor, got list"),
    (dict(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, r"x must have dtype in .*got int64"),
    (dict(weight=torch.ones(7)), ValueError, r"weight must have x.shape\[-1\] = 8 elements, got shape \(7,\)"),
    (dict(weight=torch.ones(2, 8)), ValueError, r"weight must have 1 dimensions, got shape \(2, 8\)"),
    (dict(x=torch.tensor(1.0)), ValueError, r"x must be \(\.\.\., D >= 1\).*got shape \(\)"),
    (dict(x=torch.ones(3, 0), weight=torch.ones(0)), ValueError, r"x must be \(\.\.\., D >= 1\).*got shape \(3, 0\)"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps=1e-46), ValueError, r"eps must be >= 1\.4\d*e-45, got 1e-46"),  # 0 in float32: NaN on a zero row
    (dict(eps=1e39), ValueError, r"eps must be <= 3\.4\d*e\+38, got 1e\+39"),  # inf in float32: all zeros
    (dict(eps=10 ** 400), ValueError, "eps must fit a float"),
    (dict(eps="1e-6"), TypeError, "eps must be a number, got str"),
    (dict(offset=math.nan), ValueError, "offset must be a number, got nan"),
    (dict(casting_mode="none"), ValueError, r"casting_mode must be one of \['llama', 'gemma'\], got 'none'"),
    (dict(backend="flash_attn"), ValueError, r"backend"),
]


@pytest.mark.parametrize("overrides,error,pattern", BAD_INPUTS)
def test_bad_input_raises_naming_argument_and_value(overrides, error, pattern):
    args = dict(x=torch.ones(3, 8), weight=torch.ones(8), eps=1e-6, offset=0.0, casting_mode="llama", backend="auto")
    args.update(overrides)
    with pytest.raises(error, match=pattern):
        lf.rms_norm(args.pop("x"), args.pop("weight"), args.pop("eps"), **args)


def test_opcheck_and_fullgraph_compile():
    x, weight = randn(6, 24, seed=50, shift=0.1), randn(24, seed=51)
    for mode, offset in STYLES:
        args = (x.requires_grad_(True), weight.requires_grad_(True), 1e-6, offset, mode, "torch")
        torch.library.opcheck(FWD_OP.default, args)
        y, rstd = FWD_OP(*args)
        torch.library.opcheck(BWD_OP.default, (randn(6, 24, seed=52), x.detach(), weight.detach(), rstd, 1e-6,
                                               offset, mode, "torch"))
    torch._dynamo.reset()

    def fn(a, w):
        return lf.rms_norm(a @ a.new_ones(24, 24) * 0.1, w, casting_mode="gemma", offset=1.0).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    grad_out = randn(6, seed=53)
    got = grads_of(compiled, [x, weight], grad_out)
    want = grads_of(fn, [x, weight], grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# 4. inside the models: lean layers run the fused op where FUSED_BACKENDS names the device
# ---------------------------------------------------------------------------------------------------
@pytest.mark.skipif(triton_device() != "cpu", reason="runs the triton op on the CPU through the interpreter")
@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_lean_layers_run_the_fused_norm_in_the_models(monkeypatch, family):
    """A packed forward with the fused norms (triton, interpreted) matches the one with transformers' norms,
    with and without gradients; every RMSNorm (Qwen3's q/k norms too) went through the op."""
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed
    from llm2vec_fast.models import lean
    from llm2vec_fast.ops import normalization as op_module

    model = bi_model(family)
    torch.manual_seed(60)
    for module in model.modules():  # non-trivial norm weights (transformers initialises them to 1 or 0)
        if lean.is_rms_norm(module):
            with torch.no_grad():
                module.weight.normal_(0.0, 0.3)
    norms = sum(lean.is_rms_norm(m) for m in model.modules())
    ids, mask = make_batch(seed=61)
    with torch.no_grad():
        plain = forward_packed(model, ids, mask).hidden
    calls = []
    real = op_module.rms_norm
    monkeypatch.setattr(op_module, "rms_norm", lambda *a, **k: calls.append(k["backend"]) or real(*a, **k))
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "triton"})
    monkeypatch.setattr(lean, "_PROBES", {})
    with torch.no_grad():
        fused = forward_packed(model, ids, mask).hidden
    assert len(calls) >= norms and set(calls) == {"triton"}
    assert all(lean._PROBES.values()) and lean._PROBES
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)
    # With gradients, inside lean_layers as training runs: the same gradients as transformers' norms give.
    weights = [m.weight for m in model.modules() if lean.is_rms_norm(m)]
    calls.clear()
    with lean.lean_layers(model):
        out = forward_packed(model, ids, mask).hidden
        fused_grads = torch.autograd.grad(out.square().sum(), weights)
    assert len(calls) == norms
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {})
    with lean.lean_layers(model):
        out = forward_packed(model, ids, mask).hidden
        plain_grads = torch.autograd.grad(out.square().sum(), weights)
    assert len(calls) == norms
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_lean_norm_keeps_transformers_forward_when_the_probe_disagrees(monkeypatch):
    """An RMSNorm whose forward is not what its style says (here: a patched Llama norm that adds 1) fails the
    probe and keeps its own forward; the probe leaves the global RNG as it was."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from llm2vec_fast.models import lean

    class ShiftedRMSNorm(LlamaRMSNorm):
        def forward(self, hidden_states):
            return super().forward(hidden_states) + 1

    ShiftedRMSNorm.__module__ = LlamaRMSNorm.__module__  # looks like a transformers module to is_rms_norm
    norm = ShiftedRMSNorm(16)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setattr(lean, "_PROBES", {})
    x = randn(3, 16, seed=70)
    rng = torch.get_rng_state()
    with pytest.warns(RuntimeWarning, match="does not reproduce ShiftedRMSNorm"):
        assert lean._fused_norm(norm, ShiftedRMSNorm.forward, x) is None
    assert torch.equal(torch.get_rng_state(), rng)  # the probe draws from its own generator (dropout unchanged)
    assert lean._PROBES == {("rms_norm", ShiftedRMSNorm, torch.float32, "cpu"): False}
    plain_norm = LlamaRMSNorm(16)
    fused = lean._fused_norm(plain_norm, LlamaRMSNorm.forward, x)
    assert fused is not None and torch.equal(fused(x), plain_norm(x))
    assert lean._fused_norm(plain_norm, LlamaRMSNorm.forward, x.double()) is None  # a dtype the op does not take
    # A kernel that raises: reported once, and the class keeps its own forward.
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "cuda"})  # no extension here: rms_norm raises
    monkeypatch.setattr(lean, "_PROBES", {})
    with pytest.warns(RuntimeWarning, match="fused rms_norm failed on LlamaRMSNorm"):
        assert lean._fused_norm(plain_norm, LlamaRMSNorm.forward, x) is None
