"""Tests of the CUDA backend: ``csrc/`` (built as ``llm2vec_fast._C``) and ``llm2vec_fast.cuda_backend``.

Four groups, from what runs everywhere to what needs a GPU:

1. Plumbing, no compiler: the backend is registered, offered only where it can run, refused on the CPU
   with the available backends named; the public ops' fake implementations give the right shapes for
   ``backend="cuda"``.
2. The extension (needs a CUDA build of torch and nvcc; CI has both): built once per session from
   ``csrc/`` with ``llm2vec_fast.tools.cuda_build.build`` (or the in-place ``llm2vec_fast._C`` when it
   is newer than every source): its functions and signatures, its argument checks on bad input, the
   launch plan (vector width, tails, blocks), and its cubin (sm_90a, 16-byte loads and stores, no
   spills).
3. The kernels on the CPU (needs g++ and the CUDA headers): ``csrc/emulator`` compiles
   ``csrc/pooling.cu`` unchanged with g++ and runs every thread of each block as a fiber, with real
   barriers and warp ballots/shuffles, blocks in shuffled order, aligned and bounds-checked vector
   accesses, and once under AddressSanitizer. Parity against the torch reference for every mode,
   layout, dtype, mask and normalize, tails, split sequences, empty and nothing-to-pool sequences.
4. ``gpu``: the real kernels against the torch reference, at real sizes (pooling T=64k, D=4096 bf16;
   contrastive B=4096, N=8192, D=4096 bf16) and odd ones, gradients, CUDA graphs, torch.compile,
   opcheck, streams, determinism. Skipped without a GPU.

The contrastive loss (``csrc/contrastive.cu``) gets the same treatment in each group: registration and
fake shapes, argument checks, tensor cores in the cubin, emulated parity (partial tiles, offsets, split
candidates, chunked backward, ties, zero vectors, huge scales) and GPU parity.
"""
from __future__ import annotations

import ctypes
import functools
import importlib
import importlib.util
import itertools
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import llm2vec_fast as lf
from llm2vec_fast import cuda_backend, dispatch
from llm2vec_fast.reference import contrastive as contrastive_reference
from llm2vec_fast.reference import pooling as reference

from cuda_support import CAN_EMULATE, CSRC, CUDA_HOME, CUDA_INCLUDE, DTYPE_CODES, HAS_NVCC, REPO, needs_emulator
from cuda_support import build_emulator as _build_emulator
from cuda_support import cubin_report as _cubin_report
from cuda_support import cuobjdump as _cuobjdump
from cuda_support import extension as _extension

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only, unless a GPU test allocates on it

MODES = ("mean", "weighted_mean", "last_token", "eos_token", "bos_token")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------------
# 1. Plumbing (no compiler needed)
# ---------------------------------------------------------------------------------------------------
def test_cuda_backend_is_registered():
    """Every op's cuda implementation is the backend's function, behind the kill switch (LLM2VEC_FAST_CUDA_OFF)."""
    dispatch._load_backends()
    for op, forward, backward in (
            ("pool", cuda_backend.pool_forward, cuda_backend.pool_backward),
            ("contrastive_loss", cuda_backend.infonce_forward, cuda_backend.infonce_backward),
            ("flash_attention", cuda_backend.flash_attention_forward, cuda_backend.flash_attention_backward),
            ("rms_norm", cuda_backend.rms_norm_forward, cuda_backend.rms_norm_backward),
            ("gated_activation", cuda_backend.gated_forward, cuda_backend.gated_backward),
            ("rotary_embedding", cuda_backend.rotary_forward, cuda_backend.rotary_backward)):
        impl = dispatch.implementation(op, "cuda")
        assert impl.forward.__wrapped__ is forward and impl.backward.__wrapped__ is backward, op
        assert impl.forward.__name__ == forward.__name__, op


def test_cuda_backend_is_offered_only_on_cuda_devices_with_the_extension(monkeypatch):
    dispatch._load_backends()
    real = dispatch._importable
    monkeypatch.setattr(dispatch, "_importable", lambda m: True if m == cuda_backend.EXTENSION else real(m))
    assert "cuda" in dispatch.available_backends("pool", CUDA)
    assert dispatch.resolve("pool", "cuda", CUDA) == "cuda"
    assert "cuda" not in dispatch.available_backends("pool", CPU)
    monkeypatch.setattr(dispatch, "_importable", lambda m: False if m == cuda_backend.EXTENSION else real(m))
    assert "cuda" not in dispatch.available_backends("pool", CUDA)
    with pytest.raises(ValueError, match=r"backend='cuda'.*llm2vec_fast\._C is not built.*available backends"):
        dispatch.resolve("pool", "cuda", CUDA)


def test_cuda_backend_on_cpu_names_the_available_backends(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden = torch.randn(2, 5, 8)
    with pytest.raises(ValueError, match=r"backend='cuda'.*cannot run pool on cpu.*available backends for pool on "
                                         r"cpu: \['auto', 'torch'\]"):
        lf.pool(hidden, backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda'.*\['auto', 'torch'\]"):
        lf.pool(torch.randn(7, 8), cu_seqlens=torch.tensor([0, 3, 7], dtype=torch.int32), mode="mean",
                backend="cuda")
    with pytest.raises(ValueError, match=r"backend='cuda'.*cannot run contrastive_loss on cpu.*\['auto', 'torch'\]"):
        lf.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), backend="cuda")


def test_missing_extension_says_how_to_build(monkeypatch):
    previous = cuda_backend.use_extension(None)
    try:
        real_import = importlib.import_module

        def fake_import(name, *args):
            if name == cuda_backend.EXTENSION:
                raise ImportError(f"No module named {name!r}")
            return real_import(name, *args)

        monkeypatch.setattr(importlib, "import_module", fake_import)
        with pytest.raises(RuntimeError, match=r"llm2vec_fast\._C cannot be imported.*--no-build-isolation"):
            cuda_backend.pool_forward(torch.zeros(1, 2, 3), None, None, None, "mean", False)
    finally:
        cuda_backend.use_extension(previous)


@pytest.mark.parametrize("layout", ("packed", "padded"))
@pytest.mark.parametrize("mode", ("mean", "last_token"))
def test_fake_shapes_with_cuda_backend(layout, mode):
    """Fake CUDA tensors (no GPU needed): the public custom ops' fake implementations, as torch.compile sees
    them with backend="cuda"."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        if layout == "packed":
            hidden = torch.empty(10, 24, dtype=torch.bfloat16, device="cuda")
            args = (hidden, torch.empty(4, dtype=torch.int32, device="cuda"), None,
                    torch.empty(10, dtype=torch.bool, device="cuda"))
        else:
            hidden = torch.empty(3, 7, 24, dtype=torch.float16, device="cuda")
            args = (hidden, None, torch.empty(3, 7, dtype=torch.long, device="cuda"), None)
        out = torch.ops.llm2vec_fast.pool_forward(*args, mode, True, "cuda")
        assert out.shape == (3, 24) and out.dtype == torch.float32 and out.device.type == "cuda"
        grad = torch.ops.llm2vec_fast.pool_backward(out, *args, mode, True, "cuda")
        assert grad.shape == hidden.shape and grad.dtype == hidden.dtype and grad.device.type == "cuda"


def test_fake_shapes_contrastive_with_cuda_backend():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(6, 32, dtype=torch.bfloat16, device="cuda")
        d = torch.empty(10, 32, dtype=torch.bfloat16, device="cuda")
        loss, lse = torch.ops.llm2vec_fast.infonce_forward(q, d, 2, 20.0, "cuda")
        assert loss.shape == lse.shape == (6,) and loss.dtype == lse.dtype == torch.float32
        ga, gd = torch.ops.llm2vec_fast.infonce_backward(loss, q, d, lse, 2, 20.0, "cuda")
        assert ga.shape == q.shape and gd.shape == d.shape and ga.dtype == gd.dtype == torch.bfloat16


def test_fake_shapes_row_ops_with_cuda_backend():
    """rms_norm, gated_activation and rotary_embedding (forward, in place, backward) as torch.compile sees them with
    backend="cuda"."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.llm2vec_fast
    with FakeTensorMode():
        x = torch.empty(10, 4096, dtype=torch.bfloat16, device="cuda")
        weight = torch.empty(4096, dtype=torch.bfloat16, device="cuda")
        y, rstd = ops.rms_norm_forward(x, weight, 1e-6, 0.0, "llama", "cuda")
        assert y.shape == x.shape and y.dtype == x.dtype and rstd.shape == (10,) and rstd.dtype == torch.float32
        dx, dw = ops.rms_norm_backward(y, x, weight, rstd, 1e-6, 0.0, "llama", "cuda")
        assert dx.shape == x.shape and dw.shape == weight.shape and dw.dtype == weight.dtype
        gate, up = (torch.empty(10, 14336, dtype=torch.float16, device="cuda") for _ in range(2))
        out = ops.gated_activation_forward(gate, up, "silu", "cuda")
        assert out.shape == gate.shape and out.dtype == gate.dtype and out.device.type == "cuda"
        assert ops.gated_activation_inplace(gate, up, "gelu_tanh", "cuda") is None
        dgate, dup = ops.gated_activation_backward(out, gate, up, "silu", "cuda")
        assert dgate.shape == dup.shape == gate.shape and dgate.dtype == torch.float16
        qkv = torch.empty(10, (32 + 2 * 8) * 128, dtype=torch.bfloat16, device="cuda")  # a fused projection
        q = qkv[:, :32 * 128].view(10, 32, 128)
        k = torch.empty(10, 8, 128, dtype=torch.bfloat16, device="cuda")
        cos, sin = (torch.empty(10, 64, dtype=torch.bfloat16, device="cuda") for _ in range(2))
        rotated_q, rotated_k = ops.rotary_embedding_forward(q, k, cos, sin, "cuda")
        assert rotated_q.shape == q.shape and rotated_k.shape == k.shape and rotated_q.dtype == torch.bfloat16
        assert ops.rotary_embedding_inplace(q, k, cos, sin, "cuda") is None
        dq, dk = ops.rotary_embedding_backward(rotated_q, rotated_k, cos, sin, "cuda")
        assert dq.shape == q.shape and dk.shape == k.shape and dk.device.type == "cuda"


# ---------------------------------------------------------------------------------------------------
# 2. The extension, built once per session
# ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def ext():
    """The extension (cuda_support.extension: the up-to-date in-place build, else a test build)."""
    return _extension()


def _signature(fn) -> str:
    return (fn.__doc__ or "").strip().splitlines()[0]


def _parameters(fn):
    """[(name, annotation, has_default)] of a pybind11 function, from its signature line (the annotation
    spelling of int/float varies with the pybind11 version, so only its first word is kept)."""
    inner = re.match(r"\w+\((.*)\) -> ", _signature(fn)).group(1)
    params = []
    for part in re.split(r", (?=\w+: )", inner):
        name, rest = part.split(": ", 1)
        params.append((name, re.split(r"[ |=]", rest)[0].replace("typing.Supports", "").lower(), "=" in rest))
    return params


def test_extension_records_its_build_versions(ext):
    assert ext.build_info == f"torch {torch.__version__}, CUDA {torch.version.cuda}"


def test_extension_functions_and_signatures(ext):
    tensor, opt = "torch.tensor", "torch.tensor"
    assert _parameters(ext.pool_forward) == [
        ("hidden", tensor, False), ("cu_seqlens", opt, False), ("attention_mask", opt, False),
        ("embed_mask", opt, False), ("mode", "str", False), ("normalize", "bool", False)]
    assert "| None" in _signature(ext.pool_forward) and _signature(ext.pool_forward).endswith("-> torch.Tensor")
    assert _parameters(ext.pool_backward) == [("grad_out", tensor, False)] + _parameters(ext.pool_forward)
    assert [p[0] for p in _parameters(ext.pool_plan)] == [
        "hidden", "cu_seqlens", "attention_mask", "embed_mask", "mode", "normalize", "backward", "num_sms"]
    assert _parameters(ext.infonce_forward) == [
        ("anchors", tensor, False), ("candidates", tensor, False), ("label_offset", "int", False),
        ("scale", "float", False)]
    assert _signature(ext.infonce_forward).endswith("-> tuple[torch.Tensor, torch.Tensor]")
    forward = _parameters(ext.infonce_forward)
    assert _parameters(ext.infonce_backward) == [("grad_rows", tensor, False), *forward[:2], ("lse", tensor, False),
                                                 *forward[2:]]


def _packed(t=10, d=16, dtype=torch.bfloat16):
    return torch.randn(t, d).to(dtype), torch.tensor([0, 4, t], dtype=torch.int32)


BAD_INPUTS = {
    "dtype int64": (lambda: (_packed()[0].long(), _packed()[1], None, None, "mean", False),
                    TypeError, r"pool_forward: hidden must have dtype float32, float16 or bfloat16, got Long"),
    "dtype float64": (lambda: (_packed()[0].double(), _packed()[1], None, None, "mean", False),
                      TypeError, r"hidden must have dtype .* got Double"),
    "mode": (lambda: (*_packed(), None, None, "median", False), ValueError, r"mode must be one of .*got 'median'"),
    "cu_seqlens int64": (lambda: (_packed()[0], _packed()[1].long(), None, None, "mean", False),
                         TypeError, r"cu_seqlens must have dtype int32, got Long"),
    "cu_seqlens too short": (lambda: (_packed()[0], torch.zeros(1, dtype=torch.int32), None, None, "mean", False),
                             ValueError, r"cu_seqlens must be 1-D with B\+1 >= 2 entries"),
    "packed 3-D": (lambda: (torch.randn(2, 5, 8), torch.tensor([0, 2], dtype=torch.int32), None, None, "mean", False),
                   ValueError, r"hidden must be packed \(T, D\) with cu_seqlens"),
    "padded 2-D": (lambda: (torch.randn(5, 8), None, None, None, "mean", False),
                   ValueError, r"hidden must be padded \(B, S, D\) without cu_seqlens"),
    "attention_mask with cu_seqlens": (lambda: (*_packed(), torch.ones(10, dtype=torch.bool), None, "mean", False),
                                       ValueError, r"attention_mask goes with the padded"),
    "attention_mask shape": (lambda: (torch.randn(2, 5, 8), None, torch.ones(2, 4), None, "mean", False),
                             ValueError, r"attention_mask must have shape \[2, 5\], got \[2, 4\]"),
    "embed_mask shape": (lambda: (*_packed(), None, torch.ones(9, dtype=torch.bool), "mean", False),
                         ValueError, r"embed_mask must have shape \[10\], got \[9\]"),
    "complex mask": (lambda: (torch.randn(2, 5, 8), None, torch.ones(2, 5, dtype=torch.complex64), None, "mean",
                              False), TypeError, r"attention_mask must be bool or integer"),
    "cpu tensors": (lambda: (*_packed(), None, None, "mean", False),
                    ValueError, r"hidden must be a CUDA tensor, got device cpu"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_extension_rejects_bad_input(ext, case):
    make, error, pattern = BAD_INPUTS[case]
    args = make()
    with pytest.raises(error, match=pattern):
        ext.pool_forward(*args)
    grad = torch.zeros(2, 16)
    with pytest.raises(error, match=pattern.replace("pool_forward", "pool_backward")):
        ext.pool_backward(grad, *args)


def test_extension_backward_checks_grad_out(ext):
    hidden, cu = _packed()
    with pytest.raises(ValueError, match=r"grad_out must have shape \(2, 16\), got \[3, 16\]"):
        ext.pool_backward(torch.zeros(3, 16), hidden, cu, None, None, "mean", False)
    with pytest.raises(TypeError, match=r"grad_out must have dtype"):
        ext.pool_backward(torch.zeros(2, 16, dtype=torch.long), hidden, cu, None, None, "mean", False)
    with pytest.raises(ValueError, match=r"hidden must be a CUDA tensor"):
        ext.pool_backward(torch.zeros(2, 16), hidden, cu, None, None, "mean", False)


NCE_BAD_INPUTS = {
    "dtype int64": (lambda: (torch.ones(4, 8, dtype=torch.long), torch.ones(6, 8, dtype=torch.long), 0, 20.0),
                    TypeError, r"anchors must have dtype float32, float16 or bfloat16, got Long"),
    "mixed dtypes": (lambda: (torch.randn(4, 8), torch.randn(6, 8).bfloat16(), 0, 20.0),
                     TypeError, r"candidates must have the dtype of anchors \(Float\), got BFloat16"),
    "1-D": (lambda: (torch.randn(8), torch.randn(6, 8), 0, 20.0), ValueError, r"must be 2-D"),
    "dims differ": (lambda: (torch.randn(4, 8), torch.randn(6, 9), 0, 20.0), ValueError, r"same D, got 8 and 9"),
    "labels outside": (lambda: (torch.randn(4, 8), torch.randn(6, 8), 3, 20.0),
                       ValueError, r"label_offset \+ i must index candidates: label_offset=3"),
    "scale": (lambda: (torch.randn(4, 8), torch.randn(6, 8), 0, float("nan")), ValueError, r"scale must be a finite"),
    "cpu tensors": (lambda: (torch.randn(4, 8), torch.randn(6, 8), 0, 20.0),
                    ValueError, r"anchors must be a CUDA tensor, got device cpu"),
}


@pytest.mark.parametrize("case", list(NCE_BAD_INPUTS))
def test_extension_rejects_bad_contrastive_input(ext, case):
    make, error, pattern = NCE_BAD_INPUTS[case]
    anchors, candidates, offset, scale = make()
    with pytest.raises(error, match=pattern):
        ext.infonce_forward(anchors, candidates, offset, scale)
    rows = anchors.shape[0]
    with pytest.raises(error, match=pattern):
        ext.infonce_backward(torch.ones(rows), anchors, candidates, torch.zeros(rows), offset, scale)


def test_plan_vector_width_and_tails(ext):
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    plan = ext.pool_plan
    assert plan(torch.randn(300, 4096).bfloat16(), cu)["vec"] == 8  # 16 bytes of bf16
    assert plan(torch.randn(300, 4096).half(), cu)["vec"] == 8
    assert plan(torch.randn(300, 4096), cu)["vec"] == 4  # 16 bytes of fp32
    # D not a multiple of 8 with 16-byte aligned rows (a slice of a wider tensor): vectors plus a tail
    sliced = torch.randn(300, 4096).bfloat16()[:, :4093]
    p = plan(sliced, cu)
    assert p["vec"] == 8 and p["slices"] == 16  # ceil(ceil(4093 / 8) / 32)
    # Rows that are not 16-byte aligned (odd D, or a misaligned start): element-wise
    assert plan(torch.randn(300, 4097).bfloat16(), cu)["vec"] == 1
    assert plan(torch.randn(300 * 4096 + 1).bfloat16()[1:].view(300, 4096), cu)["vec"] == 1
    assert plan(torch.randn(4, 75, 4100).bfloat16())["vec"] == 1  # padded rows 8200 bytes apart
    # The gradient is written contiguous: its width depends on D only
    assert plan(sliced, cu, backward=True)["vec"] == 1
    assert plan(torch.randn(300 * 4096 + 1).bfloat16()[1:].view(300, 4096), cu, backward=True)["vec"] == 8


def test_plan_blocks_and_workspace(ext):
    plan = ext.pool_plan
    dim = 4096
    big_batch = torch.tensor(list(range(0, 65537, 64)), dtype=torch.int32)  # 1024 sequences of 64
    hidden = torch.randn(65536, dim).bfloat16()
    p = plan(hidden, big_batch, mode="mean", normalize=True)
    assert (p["slices"], p["nsplit"]) == (16, 1)  # 16384 blocks: no split
    assert p["counter_ints"] == 1024 and p["partial_floats"] == 0  # one normalisation counter per sequence
    # Two long sequences: 32 blocks would leave the GPU idle, so each sequence is split along its tokens
    two = torch.tensor([0, 30000, 65536], dtype=torch.int32)
    p = plan(hidden, two, mode="weighted_mean", normalize=True, num_sms=132)
    assert p["nsplit"] > 1 and p["slices"] == 16
    assert p["partial_floats"] == 2 * p["nsplit"] * dim and p["counter_ints"] == 2 * 16 + 2
    assert plan(hidden, two, mode="weighted_mean", num_sms=132)["counter_ints"] == 2 * 16
    # Short sequences are not split below 256 tokens each
    short = torch.tensor([0, 200, 400], dtype=torch.int32)
    assert plan(torch.randn(400, dim).bfloat16(), short, num_sms=132)["nsplit"] == 1
    # Token modes: one block per sequence in the forward, no workspace; the gradient writes every token
    p = plan(hidden, two, mode="last_token", normalize=True)
    assert (p["slices"], p["nsplit"], p["counter_ints"], p["partial_floats"]) == (1, 1, 0, 0)
    p = plan(hidden, two, mode="last_token", normalize=True, backward=True)
    assert p["slices"] == 16 and p["nsplit"] > 1 and p["grad_floats"] == 2 * dim


def _demangled_kernel(name: str) -> str:
    m = re.search(r"(attention_fwd(?:_ws)?_kernel)I(13__nv_bfloat16|6__half)Li(\d+)E", name)
    if m:
        return f"{m.group(1)}<{'bf16' if m.group(2) == '13__nv_bfloat16' else 'fp16'},{m.group(3)}>"
    m = re.search(r"(infonce_\w+?_kernel)I(13__nv_bfloat16|6__half|f)Lb([01])E", name)
    if m:
        dtype = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}[m.group(2)]
        return f"{m.group(1)}<{dtype},{'vec' if m.group(3) == '1' else 'scalar'}>"
    m = re.search(r"(pool_\w+?_kernel|normalize_backward_kernel|inverse_norms_kernel|normalize_backward_rows_kernel|"
                  r"infonce_merge_kernel)(I\w+?Li(\d+)E)?", name)
    if not m:
        return name
    if m.group(2):
        dtype = "bf16" if "bfloat16" in name else "fp16" if "half" in name else "fp32"
        return f"{m.group(1)}<{dtype},{m.group(3)}>"
    t = re.search(r"kernelI(13__nv_bfloat16|6__half|f)E", name)
    if not t:
        return m.group(1)
    return f"{m.group(1)}<{ {'13__nv_bfloat16': 'bf16', '6__half': 'fp16', 'f': 'fp32'}[t.group(1)]}>"


@pytest.fixture(scope="session")
def cubin_report(ext):
    """{kernel: {"sass": text, "regs": int, "stack": int}} from the extension's sm_90a cubin."""
    return _cubin_report(ext)


def test_cubin_holds_sm90a_code(cubin_report):
    assert "sm_90a" in cubin_report["elves"]
    names = [_demangled_kernel(n) for n in cubin_report["kernels"]]
    for kernel in ("pool_reduce_kernel", "pool_select_kernel", "pool_backward_kernel", "normalize_backward_kernel",
                   "infonce_fwd_kernel", "infonce_grad_scores_kernel", "infonce_merge_kernel", "inverse_norms_kernel",
                   "normalize_backward_rows_kernel"):
        assert any(n.startswith(kernel) for n in names), (kernel, names)


def test_cubin_contrastive_uses_tensor_cores(cubin_report):
    """The fp16/bf16 score tiles run on tensor cores (HMMA, from WMMA), with 16-byte operand loads; fp32
    stays on FMA (IEEE products, as the Triton kernel's)."""
    seen = set()
    for name, k in cubin_report["kernels"].items():
        short = _demangled_kernel(name)
        if "sass" not in k or not short.startswith(("infonce_fwd_kernel", "infonce_grad_scores_kernel")):
            continue
        if "<fp32" in short:
            assert "HMMA" not in k["sass"], short
        else:
            assert "HMMA" in k["sass"], short
            seen.add(short)
        if short.endswith(",vec>"):
            assert "LDG.E.128" in k["sass"], short
    assert len(seen) == 8, seen


def test_cubin_vector_loads_and_stores(cubin_report):
    """The 16-byte paths really are 16-byte accesses: LDG.E.128 in the reductions and the token copy,
    STG.E.128 in the gradient; 4 loads in flight per thread and chunk in the reduction."""
    seen = set()
    for name, k in cubin_report["kernels"].items():
        short = _demangled_kernel(name)
        if "sass" not in k or not re.search(r",(8|4)>$", short):
            continue
        if short.startswith("pool_reduce_kernel"):
            assert len(re.findall(r"LDG\.E\.128", k["sass"])) >= 4, short
            seen.add("reduce")
        if short.startswith("pool_select_kernel"):
            assert "LDG.E.128" in k["sass"], short
            seen.add("select")
        if short.startswith("pool_backward_kernel"):
            assert "STG.E.128" in k["sass"], short
            seen.add("backward")
    assert seen == {"reduce", "select", "backward"}


def test_cubin_no_spills_and_bounded_registers(cubin_report):
    report = []
    for name, k in cubin_report["kernels"].items():
        if "regs" not in k:
            continue
        short = _demangled_kernel(name)
        report.append(f"{short}: {k['regs']} registers, stack {k['stack']} B, shared {k['shared']} B")
        assert k["stack"] == 0, f"{short} uses a stack frame (spills?): {k}"
        if short.endswith(",vec>"):
            assert k["regs"] <= 168, f"{short}: {k['regs']} registers > 168 (3 blocks of 128 threads per SM)"
        if short.startswith("pool_reduce_kernel"):
            assert k["regs"] <= 64, f"{short}: {k['regs']} registers > 64 (4 blocks of 256 threads per SM)"
    assert report
    print("\n".join(sorted(report)))


# ---------------------------------------------------------------------------------------------------
# 3. The kernels on the CPU: csrc/pooling.cu compiled by g++ against csrc/emulator/cuda_emulator.h
# ---------------------------------------------------------------------------------------------------
I64, I32, PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
_DTYPE_CODES = DTYPE_CODES
_MODE_CODES = {"mean": 0, "weighted_mean": 1, "last_token": 2, "eos_token": 2, "bos_token": 3}


class Emulator:
    """The kernels behind the backend contract (``pool_forward`` / ``pool_backward`` of the reference),
    prepared as csrc/bindings.cpp prepares them; ``num_sms`` drives the launch plan as the SM count does."""

    def __init__(self, path: Path, num_sms: int = 132):
        self.lib = ctypes.CDLL(str(path))
        self.num_sms = num_sms
        self.lib.l2vf_emu_pool_forward.argtypes = [PTR, I64, I32, I64, I64, PTR, I64, I64, I64, I64, PTR, PTR, I32,
                                                   I32, I32, PTR, PTR]
        self.lib.l2vf_emu_pool_backward.argtypes = [PTR, PTR, I64, I32, I64, I64, PTR, I64, I64, I64, I64, PTR, PTR,
                                                    I32, I32, I32, PTR, PTR]
        self.last_plan = None

    @staticmethod
    def _prepare(hidden, cu_seqlens, attention_mask, embed_mask):
        hidden = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
        masks = [None if m is None else (m != 0).to(torch.uint8).contiguous() for m in (attention_mask, embed_mask)]
        span = (sum((s - 1) * st for s, st in zip(hidden.shape, hidden.stride())) + 1) * hidden.element_size() \
            if hidden.numel() else 0
        if cu_seqlens is not None:
            layout = dict(stride_seq=0, stride_tok=hidden.stride(0), batch=cu_seqlens.numel() - 1, seqlen=0,
                          tokens=hidden.shape[0])
            masks[0] = None
        else:
            batch, seqlen, _ = hidden.shape
            layout = dict(stride_seq=hidden.stride(0), stride_tok=hidden.stride(1), batch=batch, seqlen=seqlen,
                          tokens=batch * seqlen)
        return hidden, span, masks, layout

    @staticmethod
    def _ptr(t):
        return None if t is None or t.numel() == 0 else t.data_ptr()

    def _common(self, hidden, span, cu_seqlens, masks, layout, mode, normalize):
        return (self._ptr(hidden), span, _DTYPE_CODES[hidden.dtype], layout["stride_seq"], layout["stride_tok"],
                self._ptr(cu_seqlens), layout["batch"], layout["seqlen"], layout["tokens"], hidden.shape[-1],
                self._ptr(masks[0]), self._ptr(masks[1]), _MODE_CODES[mode], int(normalize), self.num_sms)

    def pool_forward(self, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
        hidden, span, masks, layout = self._prepare(hidden, cu_seqlens, attention_mask, embed_mask)
        out = torch.full((layout["batch"], hidden.shape[-1]), float("nan"))
        plan = (ctypes.c_int64 * 6)()
        err = self.lib.l2vf_emu_pool_forward(*self._common(hidden, span, cu_seqlens, masks, layout, mode, normalize),
                                             self._ptr(out), ctypes.addressof(plan))
        assert err == 0, f"launcher returned cudaError {err}"
        self.last_plan = list(plan)
        return out

    def pool_backward(self, grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
        hidden, span, masks, layout = self._prepare(hidden, cu_seqlens, attention_mask, embed_mask)
        grad_hidden = torch.full(hidden.shape, float("nan"), dtype=hidden.dtype)  # every element must be written
        grad_out = grad_out.float().contiguous()
        plan = (ctypes.c_int64 * 6)()
        err = self.lib.l2vf_emu_pool_backward(
            self._ptr(grad_out), *self._common(hidden, span, cu_seqlens, masks, layout, mode, normalize),
            self._ptr(grad_hidden), ctypes.addressof(plan))
        assert err == 0, f"launcher returned cudaError {err}"
        self.last_plan = list(plan)
        return grad_hidden


@pytest.fixture(scope="session")
def emulator():
    if not CAN_EMULATE:
        pytest.skip("the CPU emulator needs g++ and the CUDA toolkit's headers")
    return Emulator(_build_emulator())


# Test data: the same sequences packed and padded (left or right), with an embed mask that has an
# instruction-like prefix of zeros and one non-empty sequence with nothing to pool.
def make_case(lengths, dim, dtype, seed=0, layout="packed", embed=True, pad_extra=3, padding_value=None,
              device=CPU):
    """(hidden, dict(cu_seqlens=, attention_mask=, embed_mask=)) on ``device`` (generated there)."""
    g = torch.Generator(device).manual_seed(seed)
    total = sum(lengths)
    tokens = (torch.randn(total, dim, generator=g, device=device) + 0.5).to(dtype)
    emb = (torch.rand(total, generator=g, device=device) < 0.7).long()
    bounds = [0, *itertools.accumulate(lengths)]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    for b, n in enumerate(lengths):
        emb[bounds[b]:bounds[b] + n // 3] = 0
    nonempty = [b for b, n in enumerate(lengths) if n]
    if len(nonempty) > 1:
        emb[bounds[nonempty[1]]:bounds[nonempty[1] + 1]] = 0
    if layout == "packed":
        return tokens, dict(cu_seqlens=cu, attention_mask=None, embed_mask=emb if embed else None)
    batch, seqlen = len(lengths), max(lengths, default=0) + pad_extra
    hidden = (torch.randn(batch, seqlen, dim, generator=g, device=device) * 10).to(dtype)
    if padding_value is not None:
        hidden.fill_(padding_value)
    attention = torch.zeros(batch, seqlen, dtype=torch.long, device=device)
    emb_p = (torch.rand(batch, seqlen, generator=g, device=device) < 0.5).long()  # random flags under the padding
    for b, n in enumerate(lengths):
        sl = slice(seqlen - n, seqlen) if layout == "left" else slice(0, n)
        hidden[b, sl] = tokens[bounds[b]:bounds[b + 1]]
        attention[b, sl] = 1
        emb_p[b, sl] = emb[bounds[b]:bounds[b + 1]]
    return hidden, dict(cu_seqlens=None, attention_mask=attention, embed_mask=emb_p if embed else None)


FWD_TOL = dict(rtol=1e-4, atol=1e-5)  # as the Triton backend's tests against the torch reference


def _grad_tol(dtype):
    return {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4)}[dtype]


def check_against_reference(impl, hidden, kw, mode, normalize, seed=0, where=""):
    """impl's forward and backward against the torch reference. The reference multiplies padding by 0,
    so where the padding holds NaN/inf it gets the same data with zero padding (impl must not read it)."""
    args = (hidden, kw["cu_seqlens"], kw["attention_mask"], kw["embed_mask"])
    ref_args = args
    if kw["attention_mask"] is not None and not torch.isfinite(hidden.float()).all():
        ref_args = (hidden.masked_fill(kw["attention_mask"][..., None] == 0, 0), *args[1:])
    out = impl.pool_forward(*args, mode, normalize)
    want = reference.pool_forward(*ref_args, "last_token" if mode == "eos_token" else mode, normalize)
    assert out.dtype == torch.float32 and out.shape == want.shape, where
    assert torch.isfinite(out).all(), f"{where}: non-finite output"
    torch.testing.assert_close(out, want, **FWD_TOL, msg=lambda m: f"{where} forward: {m}")
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(want.shape, generator=g).to(want.device)
    grad = impl.pool_backward(grad_out, *args, mode, normalize)
    want_grad = reference.pool_backward(grad_out, *ref_args, "last_token" if mode == "eos_token" else mode,
                                        normalize)
    assert grad.dtype == hidden.dtype and grad.shape == hidden.shape and grad.is_contiguous(), where
    assert torch.isfinite(grad.float()).all(), f"{where}: non-finite gradient"
    torch.testing.assert_close(grad.float(), want_grad.float(), **_grad_tol(hidden.dtype),
                               msg=lambda m: f"{where} backward: {m}")
    return out, grad


LENGTHS = (1, 17, 0, 113, 6, 0, 40)


@needs_emulator
@pytest.mark.parametrize("layout", ("packed", "left", "right"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_kernels_match_reference(emulator, dtype, layout):
    """Every mode, normalize off/on, embed_mask off/on; zero-length sequences (middle and end) and one
    with nothing to pool; padding holding large random values and random embed flags."""
    for embed in (False, True):
        hidden, kw = make_case(LENGTHS, 24, dtype, seed=1, layout=layout, embed=embed)
        for mode in MODES:
            for normalize in (False, True):
                out, grad = check_against_reference(emulator, hidden, kw, mode, normalize,
                                                    where=f"{layout} {dtype} {mode} normalize={normalize} "
                                                          f"embed={embed}")
                if layout == "packed":
                    assert torch.all(out[[2, 5]] == 0)  # zero-length sequences pool to zeros


@needs_emulator
@pytest.mark.parametrize("case", ["bf16 D=27 (element-wise)", "bf16 D=36 of 40 (16-byte + tail)",
                                  "fp32 D=30 of 32 (16-byte + tail)", "fp32 D=300 (3 slices)",
                                  "fp32 D=1", "bf16 misaligned start"])
def test_emulated_odd_dims(emulator, case):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.split()[0]]
    lengths = (5, 0, 37, 2)
    if case == "bf16 misaligned start":
        dim = 64
        hidden, kw = make_case(lengths, dim, dtype, seed=3)
        buf = torch.empty(hidden.numel() + 1, dtype=dtype)
        buf[1:] = hidden.reshape(-1)
        hidden = buf[1:].view(hidden.shape)  # rows 128 bytes apart, but starting 2 bytes off alignment
        expect_vec = 1
    elif " of " in case:
        dim, width = (int(x) for x in re.findall(r"\d+", case.split("D=")[1])[:2])
        wide, kw = make_case(lengths, width, dtype, seed=3)
        hidden = wide[:, :dim]
        expect_vec = 16 // wide.element_size()
    else:
        dim = int(re.search(r"D=(\d+)", case).group(1))
        hidden, kw = make_case(lengths, dim, dtype, seed=3)
        expect_vec = 16 // hidden.element_size() if dim * hidden.element_size() % 16 == 0 else 1
    for layout_kw in (kw, None):
        if layout_kw is None:  # the padded layout of the same rows
            hidden_p, layout_kw = make_case(lengths, hidden.shape[-1], dtype, seed=3, layout="right")
            h = hidden_p
        else:
            h = hidden
        for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
            for normalize in (False, True):
                check_against_reference(emulator, h, layout_kw, mode, normalize, where=f"{case} {mode} {normalize}")
    emulator.pool_forward(hidden, kw["cu_seqlens"], None, kw["embed_mask"], "mean", False)
    assert emulator.last_plan[0] == expect_vec, (case, emulator.last_plan)


@needs_emulator
@pytest.mark.parametrize("dtype, dim", [(torch.bfloat16, 40), (torch.float32, 300), (torch.float16, 33)], ids=str)
def test_emulated_split_sequences(emulator, dtype, dim):
    """Long sequences in a small batch: each sequence's tokens are split over several blocks whose partial
    sums the last block adds up (and normalises); ranks of weighted_mean continue across the splits."""
    lengths = (3000, 2500, 0, 1700, 64)
    hidden, kw = make_case(lengths, dim, dtype, seed=4)
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        for normalize in (False, True):
            check_against_reference(emulator, hidden, kw, mode, normalize, where=f"{mode} {normalize}")
            if mode in ("mean", "weighted_mean"):
                assert emulator.last_plan[2] > 1, emulator.last_plan  # the gradient was split too
    emulator.pool_forward(hidden, kw["cu_seqlens"], None, kw["embed_mask"], "weighted_mean", True)
    assert emulator.last_plan[2] > 1 and emulator.last_plan[4] > 0, emulator.last_plan
    # Padded, left padding: the splits start inside the padding
    hidden, kw = make_case((2000, 300, 1100), dim, dtype, seed=5, layout="left")
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        check_against_reference(emulator, hidden, kw, mode, True, where=f"padded {mode}")


@needs_emulator
def test_emulated_block_order_does_not_matter(emulator, monkeypatch):
    """Blocks run in a different shuffled order for each seed: results are bitwise identical (the split
    partials are added in split order, not in arrival order)."""
    hidden, kw = make_case((1500, 900, 0, 700), 300, torch.float32, seed=6)
    args = (hidden, kw["cu_seqlens"], None, kw["embed_mask"])
    results = []
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("L2VF_EMU_SEED", seed)
        results.append(emulator.pool_forward(*args, "weighted_mean", True))
    assert emulator.last_plan[2] > 1 and emulator.last_plan[1] > 1
    for r in results[1:]:
        assert torch.equal(r, results[0])


@needs_emulator
def test_emulated_edge_cases(emulator):
    # Nothing to pool anywhere: zeros, not NaN, also normalised; the gradient is all zeros.
    hidden, kw = make_case((4, 0, 9), 16, torch.bfloat16, seed=7, layout="left")
    kw["embed_mask"] = torch.zeros_like(kw["embed_mask"])
    for mode in ("mean", "weighted_mean"):
        for normalize in (False, True):
            out, grad = check_against_reference(emulator, hidden, kw, mode, normalize)
            assert torch.all(out == 0) and torch.all(grad == 0)
    kw["attention_mask"] = torch.zeros_like(kw["attention_mask"])  # no real token at all
    for mode in MODES:
        out, grad = check_against_reference(emulator, hidden, kw, mode, True)
        assert torch.all(out == 0) and torch.all(grad == 0)
    # Packed, every sequence empty (T = 0); a single empty sequence
    for lengths in ((0, 0, 0), (0,)):
        hidden, kw = make_case(lengths, 8, torch.float16, seed=8)
        for mode in MODES:
            out, grad = check_against_reference(emulator, hidden, kw, mode, True)
            assert out.shape == (len(lengths), 8) and torch.all(out == 0) and grad.shape == (0, 8)
    # Padded with S = 0
    hidden = torch.zeros(3, 0, 8)
    out = emulator.pool_forward(hidden, None, torch.zeros(3, 0), None, "mean", True)
    assert out.shape == (3, 8) and torch.all(out == 0)
    # Padding full of NaN and inf is never read
    for value in (float("nan"), float("inf")):
        hidden, kw = make_case((3, 11, 0, 7), 32, torch.bfloat16, seed=9, layout="left", padding_value=value)
        for mode in MODES:
            check_against_reference(emulator, hidden, kw, mode, True, where=f"padding={value} {mode}")


@needs_emulator
@pytest.mark.parametrize("mask_dtype", (torch.bool, torch.uint8, torch.int32, torch.float32), ids=str)
def test_emulated_mask_dtypes(emulator, mask_dtype):
    hidden, kw = make_case((3, 9, 1, 5), 16, torch.float32, seed=10, layout="left")
    kw = dict(kw, attention_mask=kw["attention_mask"].to(mask_dtype), embed_mask=kw["embed_mask"].to(mask_dtype))
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        check_against_reference(emulator, hidden, kw, mode, False, where=str(mask_dtype))


@needs_emulator
def test_emulated_non_contiguous_padded(emulator):
    """A transposed (B, S, D) view: sequences and tokens at arbitrary strides, last dim contiguous."""
    hidden, kw = make_case((6, 2, 0), 32, torch.bfloat16, seed=11, layout="right", pad_extra=0)
    view = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    assert not view.is_contiguous() and view.stride(-1) == 1
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        check_against_reference(emulator, view, kw, mode, True)
    assert emulator.last_plan[0] == 8


class NceEmulator:
    """The contrastive kernels behind the backend contract (``infonce_forward`` / ``infonce_backward`` of
    the reference); the backward's chunk loop and matrix products as in csrc/bindings.cpp, with torch.mm
    for cuBLAS. ``num_sms`` sizes the forward's candidate split; ``chunk_elements`` the backward's chunks."""

    def __init__(self, path: Path, num_sms: int = 132, chunk_elements: int = 1 << 26):
        lib = self.lib = ctypes.CDLL(str(path))
        self.num_sms, self.chunk_elements = num_sms, chunk_elements
        lib.l2vf_emu_inverse_norms.argtypes = [PTR, I64, I32, I64, I64, I64, PTR]
        lib.l2vf_emu_infonce_forward.argtypes = [PTR, I64, PTR, I64, I32, I64, I64, I64, I64, I64, I64, ctypes.c_float,
                                                 PTR, PTR, I32, PTR, PTR, PTR]
        lib.l2vf_emu_infonce_grad_scores.argtypes = [PTR, I64, PTR, I64, I32, I64, I64, I64, I64, I64, I64,
                                                     ctypes.c_float, PTR, PTR, PTR, PTR, I64, I64, I64, I64, I32, PTR,
                                                     I64, I64]
        lib.l2vf_emu_normalize_backward_rows.argtypes = [PTR, I64, PTR, I64, PTR, PTR, I64, I32, I64, I64, I64, I64,
                                                         I64]
        self.last_splits = None

    @staticmethod
    def _bytes(t):
        return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else 0

    @staticmethod
    def _ptr(t):
        return t.data_ptr() if t.numel() else None

    def _inv(self, x):
        inv = torch.empty(x.shape[0])
        assert self.lib.l2vf_emu_inverse_norms(self._ptr(x), self._bytes(x), _DTYPE_CODES[x.dtype], x.shape[0],
                                               x.shape[1], x.stride(0), self._ptr(inv)) == 0
        return inv

    def _problem(self, a, c, label_offset, scale, inv_a, inv_c):
        return (self._ptr(a), self._bytes(a), self._ptr(c), self._bytes(c), _DTYPE_CODES[a.dtype], a.shape[0],
                c.shape[0], a.shape[1], a.stride(0), c.stride(0), int(label_offset), float(scale), self._ptr(inv_a),
                self._ptr(inv_c))

    def infonce_forward(self, anchors, candidates, label_offset, scale):
        a = anchors if anchors.stride(-1) == 1 else anchors.contiguous()
        c = candidates if candidates.stride(-1) == 1 else candidates.contiguous()
        loss, lse = torch.empty(a.shape[0]), torch.empty(a.shape[0])
        if a.shape[0] == 0:
            return loss, lse
        inv_a, inv_c = self._inv(a), self._inv(c)
        splits = ctypes.c_int(0)
        assert self.lib.l2vf_emu_infonce_forward(*self._problem(a, c, label_offset, scale, inv_a, inv_c), self.num_sms,
                                                 self._ptr(loss), self._ptr(lse), ctypes.byref(splits)) == 0
        self.last_splits = splits.value
        return loss, lse

    def infonce_backward(self, grad_rows, anchors, candidates, lse, label_offset, scale):
        a = anchors if anchors.stride(-1) == 1 else anchors.contiguous()
        c = candidates if candidates.stride(-1) == 1 else candidates.contiguous()
        rows, cols = a.shape[0], c.shape[0]
        g, lse = grad_rows.float().contiguous(), lse.contiguous()
        inv_a, inv_c = self._inv(a), self._inv(c)
        problem = self._problem(a, c, label_offset, scale, inv_a, inv_c)
        unit_a, unit_c = torch.empty_like(a, memory_format=torch.contiguous_format), torch.empty_like(c)
        normed_a = torch.mul(a, inv_a[:, None], out=torch.empty_like(a))  # rounded once to a's dtype, as at::mul_out
        normed_c = torch.mul(c, inv_c[:, None], out=torch.empty_like(c))

        def scores(r0, r1, c0, c1, transposed):
            e = torch.empty((c1 - c0, r1 - r0) if transposed else (r1 - r0, c1 - c0), dtype=a.dtype)
            assert self.lib.l2vf_emu_infonce_grad_scores(*problem, self._ptr(lse), self._ptr(g), r0, r1, c0, c1,
                                                         int(transposed), self._ptr(e), self._bytes(e),
                                                         e.stride(0)) == 0
            return e

        step = max(1, self.chunk_elements // max(cols, 1))
        for r0 in range(0, rows, step):
            r1 = min(r0 + step, rows)
            torch.mm(scores(r0, r1, 0, cols, False), normed_c, out=unit_a[r0:r1])
        step = max(1, self.chunk_elements // max(rows, 1))
        if rows == 0:
            unit_c.zero_()
        for c0 in range(0, cols, step if rows else cols or 1):
            c1 = min(c0 + step, cols)
            if rows:
                torch.mm(scores(0, rows, c0, c1, True), normed_a, out=unit_c[c0:c1])

        def through_norm(x, unit, inv):
            out = torch.empty_like(x, memory_format=torch.contiguous_format)
            if x.shape[0]:
                assert self.lib.l2vf_emu_normalize_backward_rows(
                    self._ptr(x), self._bytes(x), self._ptr(unit), self._bytes(unit), self._ptr(inv), self._ptr(out),
                    self._bytes(out), _DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], x.stride(0), unit.stride(0),
                    out.stride(0)) == 0
            return out

        return through_norm(a, unit_a, inv_a), through_norm(c, unit_c, inv_c)


@pytest.fixture(scope="session")
def nce_emulator():
    if not CAN_EMULATE:
        pytest.skip("the CPU emulator needs g++ and the CUDA toolkit's headers")
    return NceEmulator(_build_emulator())


def _nce_grad_tol(dtype, expected):
    """Elementwise, plus a fraction of the largest entry: bf16/fp16 kernels keep E in the input dtype (as the
    Triton backend does), fp32 ones sum products in another order than torch's matmul."""
    frac, rtol = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 1.6e-2)}[dtype]
    return dict(rtol=rtol, atol=frac * float(expected.abs().max()) + 1e-6)


def make_nce_case(rows, cols, dim, dtype, label_offset=0, seed=0, device=CPU, noise=3.0):
    """Anchors, and candidates whose rows label_offset .. +rows are noisy copies of the anchors (positives;
    noise 3 keeps the cosines near 0.3, so the softmax is not saturated and the gradients are not all noise)."""
    g = torch.Generator(device).manual_seed(seed)
    a = torch.randn(rows, dim, generator=g, device=device)
    c = torch.randn(cols, dim, generator=g, device=device)
    c[label_offset:label_offset + rows] = a + noise * torch.randn(rows, dim, generator=g, device=device)
    return a.to(dtype), c.to(dtype)


def check_nce_against_reference(impl, a, c, label_offset, scale, seed=0, where="", loss_tol=None, compare_grads=True):
    """impl's forward and backward against the torch reference. compare_grads=False only checks the
    gradients' dtype, shape and finiteness (at scale 1e4 both sides' float32 gradients are rounding noise)."""
    loss, lse = impl.infonce_forward(a, c, label_offset, scale)
    want_loss, want_lse = contrastive_reference.infonce_forward(a, c, label_offset, scale)
    tol = loss_tol or dict(rtol=1e-4, atol=1e-4)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == want_loss.shape, where
    torch.testing.assert_close(lse, want_lse, **tol, msg=lambda m: f"{where} lse: {m}")
    torch.testing.assert_close(loss, want_loss, **tol, msg=lambda m: f"{where} loss: {m}")
    g = torch.rand(a.shape[0], generator=torch.Generator(a.device).manual_seed(seed + 1), device=a.device)
    ga, gc = impl.infonce_backward(g, a, c, lse, label_offset, scale)
    wa, wc = contrastive_reference.infonce_backward(g, a, c, want_lse, label_offset, scale)
    for got, want, name in ((ga, wa, "anchors"), (gc, wc, "candidates")):
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where} grad {name}"
        assert torch.isfinite(got.float()).all(), f"{where} grad {name} not finite"
        if compare_grads:
            torch.testing.assert_close(got.float(), want.float(), **_nce_grad_tol(a.dtype, want.float()),
                                       msg=lambda m: f"{where} grad {name}: {m}")
    return loss, lse, ga, gc


@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_emulated_contrastive_matches_reference(nce_emulator, dtype):
    """Partial tiles (rows, candidates and dims not multiples of 64 / 32), label offsets, with and without
    the 16-byte path (D % 8), the candidates split over blocks and merged, and a chunked backward."""
    cases = [(11, 24, 48, 0), (70, 150, 40, 13), (5, 5, 100, 0), (70, 600, 40, 200), (33, 40, 30, 7), (64, 64, 64, 0),
             (20, 70, 65, 3)]
    splits = {}
    for rows, cols, dim, offset in cases:
        a, c = make_nce_case(rows, cols, dim, dtype, offset, seed=rows)
        for scale in (20.0, 50.0):
            check_nce_against_reference(nce_emulator, a, c, offset, scale, where=f"{rows}x{cols}x{dim}+{offset}")
        splits[cols] = nce_emulator.last_splits
    assert splits[600] > 1 and splits[24] == 1, splits  # 600 candidates: split over blocks and merged


@needs_emulator
def test_emulated_contrastive_chunks_splits_and_views(nce_emulator, monkeypatch):
    chunked = NceEmulator(_build_emulator(), num_sms=132, chunk_elements=1000)  # several chunks in both passes
    a, c = make_nce_case(70, 300, 48, torch.bfloat16, 30, seed=3)
    check_nce_against_reference(chunked, a, c, 30, 50.0, where="chunked")
    wide = NceEmulator(_build_emulator(), num_sms=1)  # one range of candidates: no merge kernel
    check_nce_against_reference(wide, a, c, 30, 50.0, where="one range")
    assert wide.last_splits == 1
    # Row-strided views (a slice of wider rows): 16-byte path with strides, and the element-wise path
    for dim, width in ((40, 48), (37, 48)):
        a_w, c_w = make_nce_case(20, 90, width, torch.float16, 5, seed=4)
        check_nce_against_reference(nce_emulator, a_w[:, :dim], c_w[:, :dim], 5, 20.0, where=f"view {dim} of {width}")


@needs_emulator
def test_emulated_contrastive_edge_cases(nce_emulator):
    dim = 40
    row = torch.randn(1, dim)
    # Identical rows tie every score: the loss is log(N)
    loss, *_ = check_nce_against_reference(nce_emulator, row.repeat(6, 1), row.repeat(9, 1), 0, 20.0)
    torch.testing.assert_close(loss, torch.full((6,), float(torch.log(torch.tensor(9.0)))), rtol=1e-5, atol=1e-5)
    # Zero vectors have cosine 0 with everything; their gradient is finite
    a = torch.cat([torch.zeros(2, dim), torch.randn(4, dim)])
    c = torch.cat([torch.randn(5, dim), torch.zeros(3, dim)])
    check_nce_against_reference(nce_emulator, a, c, 1, 20.0, where="zero vectors")
    # fp16 zero rows: their own gradient (1/eps = 1e12 times the others') is beyond fp16, every other row's stays
    # finite and right (E once scaled by the inverse norms overflowed there: inf * 0 = NaN in each row scoring them)
    a, c = make_nce_case(6, 10, dim, torch.float16, 2, seed=6)
    a[1], c[0], c[7] = 0, 0, 0
    loss, lse = nce_emulator.infonce_forward(a, c, 2, 20.0)
    g = torch.rand(6, generator=torch.Generator().manual_seed(7))
    grads = nce_emulator.infonce_backward(g, a, c, lse, 2, 20.0)
    wants = contrastive_reference.infonce_backward(g, a, c, contrastive_reference.infonce_forward(a, c, 2, 20.0)[1], 2,
                                                   20.0)
    for got, want, zero_rows in zip(grads, wants, ([1], [0, 7])):
        keep = torch.ones(got.shape[0], dtype=torch.bool)
        keep[zero_rows] = False
        torch.testing.assert_close(got[keep].float(), want[keep].float(), **_nce_grad_tol(a.dtype, want[keep].float()))
    # A huge scale saturates the softmax without overflow
    a, c = make_nce_case(6, 10, dim, torch.float32, 2, seed=5)
    check_nce_against_reference(nce_emulator, a, c, 2, 1e4, where="scale 1e4", loss_tol=dict(rtol=1e-4, atol=1e-2),
                                compare_grads=False)
    # Each positive far above its row's other scores: the loss is >= 0, not a rounding below (the lse's base-2
    # round trip)
    for seed in range(4):
        a, c = make_nce_case(64, 64, 48, torch.float32, 0, seed=20 + seed, noise=1e-3)
        for scale in (20.0, 1e3, 1e4):
            assert nce_emulator.infonce_forward(a, c, 0, scale)[0].min() >= 0, (seed, scale)
    # No anchors
    loss, lse = nce_emulator.infonce_forward(torch.zeros(0, dim), torch.randn(5, dim), 0, 20.0)
    assert loss.shape == lse.shape == (0,)
    ga, gc = nce_emulator.infonce_backward(torch.zeros(0), torch.zeros(0, dim), torch.randn(5, dim), lse, 0, 20.0)
    assert ga.shape == (0, dim) and torch.all(gc == 0)


ASAN_SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import test_cuda_kernels as t
emu = t.Emulator({lib!r})
for dtype, dim, view in ((torch.bfloat16, 36, 40), (torch.float32, 30, 32), (torch.float16, 27, 27)):
    for layout in ("packed", "left"):
        hidden, kw = t.make_case((5, 0, 40, 1), view, dtype, seed=12, layout=layout)
        hidden = hidden[..., :dim]
        for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
            for normalize in (False, True):
                t.check_against_reference(emu, hidden, kw, mode, normalize)
hidden, kw = t.make_case((1200, 700, 0), 40, torch.bfloat16, seed=13)
for mode in ("mean", "weighted_mean", "bos_token"):
    t.check_against_reference(emu, hidden, kw, mode, True)
nce = t.NceEmulator({lib!r}, chunk_elements=3000)
for dtype, dim, width in ((torch.bfloat16, 40, 48), (torch.float32, 37, 40), (torch.float16, 64, 64)):
    a, c = t.make_nce_case(70, 300, width, dtype, 30, seed=14)
    t.check_nce_against_reference(nce, a[:, :dim], c[:, :dim], 30, 50.0)
attn = t.AttnEmulator({lib!r})
for d, packed in ((64, True), (128, False)):
    q, k, v, cu = t.make_attention_case((130, 5, 0, 17), 2, 1, d, torch.bfloat16, seed=15, packed_qkv=packed)
    err, why, out, lse = attn.run(q, k, v, cu, 130, d ** -0.5, 20.0)
    assert err == 0, why
    t.check_attention_against_reference(out, lse, q, k, v, cu, 130, d ** -0.5, 20.0)
print("ASAN-CLEAN")
"""


@needs_emulator
@pytest.mark.slow
def test_emulated_kernels_under_address_sanitizer(tmp_path):
    """Every plain global store and load of the kernels is bounds-checked (the tensors come from malloc,
    which ASan tracks), with tails, padding and splits."""
    runtime = [subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
               for name in ("libasan.so", "libubsan.so")]
    if not all(os.path.isabs(p) and os.path.exists(p) for p in runtime):
        pytest.skip("g++ has no AddressSanitizer runtime")
    lib = _build_emulator(sanitize=True)
    env = dict(os.environ, LD_PRELOAD=" ".join(runtime), ASAN_OPTIONS="detect_leaks=0:detect_stack_use_after_return=0",
               UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1", PYTHONPATH=str(REPO))
    script = ASAN_SCRIPT.format(tests=str(Path(__file__).parent), lib=str(lib))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0 and "ASAN-CLEAN" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "ERROR: AddressSanitizer" not in proc.stderr and "runtime error" not in proc.stderr, proc.stderr[-6000:]


# ---------------------------------------------------------------------------------------------------
# 3b. The Hopper attention forward (csrc/attention.cu, csrc/hopper.cuh): plumbing, argument checks,
#     nvcc / cubin facts, and the kernel on the emulator (TMA, mbarriers, wgmma descriptors emulated)
# ---------------------------------------------------------------------------------------------------
from llm2vec_fast.reference import attention as attention_reference  # noqa: E402

_ATTN_DTYPES = {torch.float16: 1, torch.bfloat16: 2}
CUDA_ERROR_INVALID_VALUE, CUDA_ERROR_NOT_SUPPORTED = 1, 801


def test_attention_kernel_layout_checks():
    """What the tensor maps accept (16-byte aligned bases and strides, nested strides), on CPU tensors."""
    qkv = torch.zeros(10, 4 + 2 + 2, 64, dtype=torch.bfloat16)
    q, k = qkv[:, :4], qkv[:, 4:6]
    assert cuda_backend._tma_layout_ok(q) and cuda_backend._tma_layout_ok(k)
    assert cuda_backend._tma_layout_ok(torch.zeros(10, 1, 128, dtype=torch.float16))
    assert not cuda_backend._tma_layout_ok(torch.zeros(10 * 4 * 64 + 1, dtype=torch.bfloat16)[1:].view(10, 4, 64))
    assert not cuda_backend._tma_layout_ok(torch.zeros(4, 10, 64, dtype=torch.bfloat16).transpose(0, 1))  # heads outer
    assert not cuda_backend._tma_layout_ok(torch.zeros(10, 4, 68, dtype=torch.bfloat16)[..., :64])  # 136-byte heads
    cu = torch.tensor([0, 10], dtype=torch.int32)
    assert not cuda_backend.attention_kernel_supported(q, k, k, cu, False, 0.0)  # CPU tensors


def test_attention_falls_back_to_triton(monkeypatch):
    """Calls the kernel cannot run go to the registered Triton implementation, forward and backward."""
    dispatch._load_backends()
    calls = []
    fake = dispatch.Implementation(lambda *a, **kw: calls.append(("fwd", a[5], a[8])) or "fwd",
                                   lambda *a, **kw: calls.append(("bwd",)) or "bwd")
    monkeypatch.setitem(dispatch._REGISTRY, ("flash_attention", "triton"), fake)
    q = torch.zeros(5, 2, 64, dtype=torch.bfloat16)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    assert cuda_backend.flash_attention_forward(q, q, q, cu, 5, True, 0.125, 0.0, 0.0, 0) == "fwd"
    assert cuda_backend.flash_attention_backward(q, q, q, q, q, None, cu, 5, False, 0.125, 0.0, 0.0, 0) == "bwd"
    assert calls == [("fwd", True, 0.0), ("bwd",)]


@pytest.fixture
def kernel_calls(monkeypatch):
    """The attention forward's calls into a fake extension (each call's keyword arguments), with the kernel
    taken as applicable and the variant re-read from the environment; restored afterwards."""
    calls = []
    fake = types.SimpleNamespace(attention_forward=lambda *a, **kw: calls.append(kw) or ("out", "lse"))
    monkeypatch.setattr(cuda_backend, "attention_kernel_supported", lambda *a: True)
    previous_ext = cuda_backend.use_extension(fake)
    previous = cuda_backend.use_attention_variant(None)
    yield calls
    cuda_backend.use_extension(previous_ext)
    cuda_backend.use_attention_variant(previous)


def _forward_small():
    q = torch.zeros(5, 2, 64, dtype=torch.bfloat16)
    return cuda_backend.flash_attention_forward(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5, False, 0.125,
                                                0.0, 0.0, 0)


def test_attention_variant_from_the_environment(monkeypatch, kernel_calls):
    """LLM2VEC_FAST_CUDA_ATTENTION (v1 / v2 / unset) is read once and reaches the extension as
    ``variant``; unset passes nothing (the extension's default, v1); a bad value names the choices."""
    for value, want in (("", {}), ("v2", {"variant": 2}), ("V1", {"variant": 1}), ("default", {})):
        monkeypatch.setenv(cuda_backend.ATTENTION_VARIANT_ENV, value)
        cuda_backend.use_attention_variant(None)
        assert _forward_small() == ("out", "lse")
        assert kernel_calls.pop() == want, value
    monkeypatch.setenv(cuda_backend.ATTENTION_VARIANT_ENV, "v1")  # read once: no effect until reset
    assert cuda_backend.attention_variant() == 0
    assert cuda_backend.use_attention_variant(2) == 0 and cuda_backend.attention_variant() == 2
    monkeypatch.setenv(cuda_backend.ATTENTION_VARIANT_ENV, "v3")
    cuda_backend.use_attention_variant(None)
    with pytest.raises(ValueError, match=r"LLM2VEC_FAST_CUDA_ATTENTION='v3': expected v1, v2, off"):
        cuda_backend.attention_variant()
    with pytest.raises(ValueError, match=r"variant must be 0, 1, 2 or -1 \(off\)"):
        cuda_backend.use_attention_variant(5)


def test_attention_kill_switch_runs_the_fallback(monkeypatch, kernel_calls):
    """LLM2VEC_FAST_CUDA_ATTENTION=off: the kernel is never called, even where it would apply; the registered
    Triton implementation runs instead."""
    dispatch._load_backends()
    fallback = dispatch.Implementation(lambda *a, **kw: kernel_calls.append("triton") or ("t", "t"),
                                       lambda *a, **kw: None)
    monkeypatch.setitem(dispatch._REGISTRY, ("flash_attention", "triton"), fallback)
    monkeypatch.setenv(cuda_backend.ATTENTION_VARIANT_ENV, "off")
    assert cuda_backend.attention_switched_off() and cuda_backend.attention_variant() == cuda_backend.ATTENTION_OFF
    assert _forward_small() == ("t", "t")
    monkeypatch.setenv(cuda_backend.ATTENTION_VARIANT_ENV, "v1")
    cuda_backend.use_attention_variant(None)
    assert not cuda_backend.attention_switched_off()
    assert _forward_small() == ("out", "lse")
    assert kernel_calls == ["triton", {"variant": 1}]


@pytest.mark.emulated_cuda
@needs_emulator
def test_kill_switch_sends_named_ops_to_the_fallback(_cuda_kernels_in_the_emulator, monkeypatch):
    """LLM2VEC_FAST_CUDA_OFF (comma-separated ops, or all): those ops' cuda backend runs the fallback (here the
    interpreted triton kernels, or the torch reference), forward and backward; the others keep their kernels; an
    unknown name is an error that names it."""
    emulated = _cuda_kernels_in_the_emulator
    x, weight = torch.randn(4, 64), torch.randn(64)
    gate, up = torch.randn(4, 64), torch.randn(4, 64)

    def run_both():
        emulated.reset()
        norm = torch.autograd.grad(lf.rms_norm(x, weight.requires_grad_(True), backend="cuda").sum(), weight)[0]
        return norm, lf.gated_activation(gate, up, backend="cuda")

    want = None, lf.gated_activation(gate, up, backend="torch")
    monkeypatch.setenv(cuda_backend.CUDA_OFF_ENV, " rms_norm,Gated_Activation ")
    run_both()
    assert not emulated.launches and cuda_backend.switched_off_ops() == {"rms_norm", "gated_activation"}
    monkeypatch.setenv(cuda_backend.CUDA_OFF_ENV, "all")
    got = run_both()
    assert not emulated.launches
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=1e-6)
    monkeypatch.setenv(cuda_backend.CUDA_OFF_ENV, "pool")
    run_both()
    assert emulated.launches == {"rms_norm_forward": 1, "rms_norm_backward": 1, "gated_forward": 1}
    monkeypatch.setenv(cuda_backend.CUDA_OFF_ENV, "rmsnorm")
    with pytest.raises(ValueError, match=r"LLM2VEC_FAST_CUDA_OFF='rmsnorm': unknown ops \['rmsnorm'\]"):
        lf.rms_norm(x, weight, backend="cuda")


def test_fake_shapes_attention_with_cuda_backend():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(20, 4, 128, dtype=torch.bfloat16, device="cuda")
        k = torch.empty(20, 2, 128, dtype=torch.bfloat16, device="cuda")
        cu = torch.empty(3, dtype=torch.int32, device="cuda")
        out, lse = torch.ops.llm2vec_fast.flash_attention_forward(q, k, k, cu, 12, False, 0.1, 0.0, 0.0, None, "cuda")
        assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (4, 20) and lse.dtype == torch.float32


def _attn_args(t=10, hq=4, hkv=2, d=64, dtype=torch.bfloat16):
    q = torch.zeros(t, hq, d, dtype=dtype)
    k = torch.zeros(t, hkv, d, dtype=dtype)
    return [q, k, k.clone(), torch.tensor([0, 4, t], dtype=torch.int32), t, 0.125, 0.0]


ATTN_BAD_INPUTS = {
    "dtype float32": (lambda a: [x.float() if i < 3 else x for i, x in enumerate(a)], TypeError,
                      r"attention_forward: q must have dtype bfloat16 or float16, got Float"),
    "mixed dtypes": (lambda a: [a[0], a[1].half(), a[2].half(), *a[3:]], TypeError, r"k and v must have q's dtype"),
    "2-D q": (lambda a: [a[0][:, 0], *a[1:]], ValueError, r"q must be packed \(T, H, D\)"),
    "head dim 96": (lambda a: [torch.zeros(10, 4, 96).bfloat16(), torch.zeros(10, 2, 96).bfloat16(),
                               torch.zeros(10, 2, 96).bfloat16(), *a[3:]], ValueError, r"head dim must be 64 or 128"),
    "GQA": (lambda a: [torch.zeros(10, 3, 64).bfloat16(), *a[1:]], ValueError, r"multiple of the key/value head"),
    "v shape": (lambda a: [a[0], a[1], a[2][:, :1], *a[3:]], ValueError, r"v must have k's shape"),
    "cu_seqlens int64": (lambda a: [*a[:3], a[3].long(), *a[4:]], TypeError, r"cu_seqlens must have dtype int32"),
    "scale": (lambda a: [*a[:5], 0.0, a[6]], ValueError, r"softmax_scale must be a finite number > 0"),
    "softcap": (lambda a: [*a[:6], -1.0], ValueError, r"softcap must be a finite number >= 0"),
    "misaligned q": (lambda a: [torch.zeros(10 * 4 * 64 + 1).bfloat16()[1:].view(10, 4, 64), *a[1:]], ValueError,
                     r"16-byte aligned addresses \(TMA\)"),
    "cpu tensors": (lambda a: a, ValueError, r"q must be a CUDA tensor, got device cpu"),
    "variant": (lambda a: [*a, 0, 0, 3], ValueError, r"variant must be 0 \(default\), 1 \(v1\) or 2"),
}


@pytest.mark.parametrize("case", list(ATTN_BAD_INPUTS))
def test_extension_rejects_bad_attention_input(ext, case):
    make, error, pattern = ATTN_BAD_INPUTS[case]
    with pytest.raises(error, match=pattern):
        ext.attention_forward(*make(_attn_args()))


def test_extension_attention_signature(ext):
    assert [p[0] for p in _parameters(ext.attention_forward)] == [
        "q", "k", "v", "cu_seqlens", "max_seqlen", "softmax_scale", "softcap", "v_desc_lbo", "v_desc_sbo", "variant"]
    assert _signature(ext.attention_forward).endswith("-> tuple[torch.Tensor, torch.Tensor]")


def test_cubin_attention_uses_wgmma_and_tma(cubin_report):
    """Every instantiation (v1 attention_fwd_kernel, v2 attention_fwd_ws_kernel) runs its matrix products
    on wgmma (HGMMA: 64x128 for S = Q K^T, 64xD for O += P V) and loads its tiles with TMA (UTMALDG),
    synchronised on mbarriers; no stack (no spills). v2 reallocates registers (USETMAXREG, both ways)."""
    seen = {}
    for name, k in cubin_report["kernels"].items():
        short = _demangled_kernel(name)
        if not short.startswith(("attention_fwd_kernel", "attention_fwd_ws_kernel")):
            continue
        assert k.get("stack", 0) == 0, f"{short} uses a stack frame (spills?): {k}"
        if "sass" not in k:
            continue
        sass, d = k["sass"], int(short[:-1].split(",")[1])
        assert len(re.findall(r"HGMMA\.64x128x16\.F32", sass)) >= 4, short
        assert re.search(rf"HGMMA\.64x{d}x16\.F32", sass), short
        assert "UTMALDG.3D" in sass and "SYNCS.PHASECHK" in sass, short
        assert ("BF16" in re.search(r"HGMMA[^\n]*", sass).group(0)) == ("bf16" in short), short
        if short.startswith("attention_fwd_ws_kernel"):
            assert "USETMAXREG.TRY_ALLOC" in sass and "USETMAXREG.DEALLOC" in sass, short
            assert "BAR.SYNC" not in sass.split("USETMAXREG")[-1], f"{short}: a block barrier after the split"
        seen[short] = k.get("regs")
    assert len(seen) == 8, seen
    print(seen)


def test_nvcc_compiles_attention_for_sm90a_without_spills(tmp_path):
    """attention.cu alone, for sm_90a: ptxas -v reports 0 bytes of spills for every instantiation, and the
    SASS holds HGMMA and UTMALDG (about 2 s; needs only nvcc and cuobjdump)."""
    if not HAS_NVCC:
        pytest.skip(f"no nvcc (CUDA_HOME={CUDA_HOME})")
    from llm2vec_fast.tools import aot_check

    cubin = tmp_path / "attention.cubin"
    cmd = [os.path.join(CUDA_HOME, "bin", "nvcc"), "-std=c++17", "-O3", "--use_fast_math",
           "-gencode", "arch=compute_90a,code=sm_90a", "-Xptxas", "-v", "-cubin", "-o", str(cubin),
           str(CSRC / "attention.cu")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert log.count("Compiling entry function") == 8, log  # v1 and v2 x bf16 / fp16 x hd 64 / 128
    # v2 (384 threads, __launch_bounds__(384, 1)): ptxas allocates 65536 / 384 -> 168 registers at launch;
    # the consumers' setmaxnreg.inc raises theirs to 240 (the producer's .dec gives 168 - 24 back).
    ws_regs = re.findall(r"attention_fwd_ws_kernel\S+\s+0 bytes stack frame[^\n]*\n[^\n]*Used (\d+) registers", log)
    assert len(ws_regs) == 4 and all(int(r) == 168 for r in ws_regs), (ws_regs, log)
    regs, stores, loads = aot_check.parse_ptxas_log(log)
    assert stores == 0 and loads == 0, log
    assert regs <= 255 and "0 bytes stack frame" in log, log
    assert "serialized" not in log, f"ptxas serialises the wgmma: {log}"
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump")
    sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    # per dtype, v1: hd128 8 (S) + 8 (PV), hd64 4 (S) + 8 (PV); v2 has the first tile's S and the last
    # tile's PV outside the loop: twice as many. More only if the compiler duplicates a loop body.
    assert len(re.findall(r"HGMMA\.64x128x16\.F32", sass)) >= 2 * (16 + 4) * 3, sass.count("HGMMA")
    assert len(re.findall(r"HGMMA\.64x64x16\.F32", sass)) >= 2 * 8 * 3, sass.count("HGMMA")
    assert len(re.findall(r"UTMALDG\.3D", sass)) > 0
    assert len(re.findall(r"USETMAXREG\.TRY_ALLOC\.CTAPOOL[^\n]*0xf0", sass)) == 4  # consumers: 240
    assert len(re.findall(r"USETMAXREG\.DEALLOC\.CTAPOOL 0x18", sass)) == 4         # producer: 24
    # v2's overlap survives compilation: a wait for "all but one" wgmma group (S retired, PV running)
    assert len(re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x1", sass)) >= 4


class AttnEmulator:
    """csrc/attention.cu on the emulator, prepared as csrc/bindings.cpp prepares it (out contiguous,
    lse (Hq, T) float32); returns (err, message, out, lse)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.l2vf_emu_attention_forward
        f.argtypes = [PTR, I64, PTR, I64, PTR, I64, I32, *[I64] * 12, PTR, PTR, I64, I64, I64, PTR, ctypes.c_float,
                      ctypes.c_float, ctypes.c_uint32, ctypes.c_uint32, I32, ctypes.POINTER(ctypes.c_char_p)]
        f.restype = I32

    @staticmethod
    def _bytes(t):
        return (sum((n - 1) * st for n, st in zip(t.shape, t.stride())) + 1) * t.element_size() if t.numel() else 0

    def run(self, q, k, v, cu_seqlens, max_seqlen, scale, softcap, v_desc=(0, 0), variant=0):
        total, hq, d = q.shape
        out = torch.full(q.shape, float("nan"), dtype=q.dtype)  # every valid row must be written
        lse = torch.full((hq, total), float("nan"))
        why = ctypes.c_char_p()
        err = self.lib.l2vf_emu_attention_forward(
            q.data_ptr(), self._bytes(q), k.data_ptr(), self._bytes(k), v.data_ptr(), self._bytes(v),
            _ATTN_DTYPES.get(q.dtype, 0), total, cu_seqlens.numel() - 1, max_seqlen, hq, k.shape[1], d,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cu_seqlens.data_ptr(),
            out.data_ptr(), self._bytes(out), out.stride(0), out.stride(1), lse.data_ptr(), scale, softcap,
            v_desc[0], v_desc[1], variant, ctypes.byref(why))
        return err, (why.value or b"").decode(), out, lse


@pytest.fixture(scope="session")
def attn_emulator():
    if not CAN_EMULATE:
        pytest.skip("the CPU emulator needs g++ and the CUDA toolkit's headers")
    return AttnEmulator(_build_emulator())


# Odd lengths: shorter than a tile (1, 17, 113), empty, exactly one tile (128), multi-tile with a ragged
# last tile (130, 257). Packed back to back, every sequence but the first starts inside a 128-token tile
# of its predecessor, whose key tiles hold the next sequence's tokens (masked) and whose last tiles run
# past T (TMA zero fill).
ATTN_LENGTHS = (1, 17, 0, 113, 130, 257, 128)


def make_attention_case(lengths, hq, hkv, d, dtype, seed, packed_qkv=False):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    if packed_qkv:  # slices of one (T, Hq + 2 Hkv, D) projection: token stride (Hq + 2 Hkv) D
        qkv = (torch.randn(total, hq + 2 * hkv, d, generator=g) * 1.5).to(dtype)
        return qkv[:, :hq], qkv[:, hq:hq + hkv], qkv[:, hq + hkv:], cu
    q, k, v = ((torch.randn(total, h, d, generator=g) * 1.5).to(dtype) for h in (hq, hkv, hkv))
    return q, k, v, cu


def check_attention_against_reference(impl_out, impl_lse, q, k, v, cu, max_seqlen, scale, softcap, where="",
                                      exact_baseline_ok=False):
    """out within 2x the error of torch in q's dtype (both vs float64), lse to float32 rounding.
    exact_baseline_ok: torch may be exact (one-key rows copy v), and then so must impl be."""
    args = (cu, max_seqlen, False, scale, softcap, 0.0, 0)
    true_out, true_lse = attention_reference.attention(*(x.double() for x in (q, k, v)), *args,
                                                       compute_dtype=torch.float64)
    base_out, _ = attention_reference.attention(q, k, v, *args, compute_dtype=None)
    assert impl_out.dtype == q.dtype and impl_out.shape == q.shape, where
    assert torch.isfinite(impl_out.float()).all(), f"{where}: non-finite (unwritten?) output"
    ours, base = ((x.double() - true_out).abs().max().item() for x in (impl_out, base_out))
    assert base > 0 or exact_baseline_ok, f"{where}: the same-dtype torch baseline is exact, the bound says nothing"
    assert ours <= 2 * base + 1e-6, f"{where}: error {ours:.3g} > 2 x torch-{q.dtype} error {base:.3g}"
    assert impl_lse.dtype == torch.float32 and impl_lse.shape == (q.shape[1], q.shape[0]), where
    torch.testing.assert_close(impl_lse.double(), true_lse.double(), rtol=1e-5, atol=1e-5,
                               msg=lambda m: f"{where} lse: {m}")
    return ours, base


ATTN_VARIANTS = {"v1": 1, "v2": 2}  # AttentionProblem::variant (0 = the default: v1 until a GPU measures v2)


@needs_emulator
@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_emulated_attention_matches_reference(attn_emulator, dtype, d, variant):
    """GQA ratios 1, 2, 4 (8 once), softcap off / on, separate tensors and slices of a packed qkv
    projection (token stride (Hq + 2 Hkv) D), odd varlen lengths; out and lse; v1 and v2 kernels."""
    cases = [(2, 2, 0.0, False), (2, 1, 30.0, False), (4, 1, 0.0, True)]
    if dtype == torch.bfloat16 and d == 64:
        cases.append((8, 1, 5.0, True))
    for i, (hq, hkv, softcap, packed) in enumerate(cases):
        q, k, v, cu = make_attention_case(ATTN_LENGTHS, hq, hkv, d, dtype, seed=100 + i, packed_qkv=packed)
        scale = d ** -0.5
        err, why, out, lse = attn_emulator.run(q, k, v, cu, max(ATTN_LENGTHS), scale, softcap,
                                               variant=ATTN_VARIANTS[variant])
        assert err == 0, (err, why)
        check_attention_against_reference(out, lse, q, k, v, cu, max(ATTN_LENGTHS), scale, softcap,
                                          where=f"{variant} {dtype} d={d} hq={hq} hkv={hkv} softcap={softcap} "
                                                f"packed={packed}")


@needs_emulator
@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
@pytest.mark.parametrize("sign", (-1.0, 1.0), ids=("scores-110", "scores+110"))
def test_emulated_attention_extreme_scores(attn_emulator, variant, sign):
    """Every score near -110 (each row's lse too: exp(-lse) overflows fp32) or near +110 (exp(s)
    overflows without the running max), with partial last tiles: the output stays finite and within
    the bound, the lse to float32 rounding of its magnitude."""
    lengths, d = (17, 5, 130), 64
    q, k, v, cu = make_attention_case(lengths, 2, 1, d, torch.bfloat16, seed=31)
    direction = torch.nn.functional.normalize(torch.randn(d, generator=torch.Generator().manual_seed(32)), dim=0)
    k = (30.0 * direction + 0.1 * k.float()).to(torch.bfloat16)
    q = (sign * 30.0 * direction + 0.1 * q.float()).to(torch.bfloat16)
    err, why, out, lse = attn_emulator.run(q, k, v, cu, max(lengths), d ** -0.5, 0.0, variant=ATTN_VARIANTS[variant])
    assert err == 0, why
    assert (lse.abs() > 90).all()  # the premise
    assert torch.isfinite(out.float()).all()
    true_out, true_lse = attention_reference.attention(*(x.double() for x in (q, k, v)), cu, max(lengths), False,
                                                       d ** -0.5, 0.0, 0.0, 0, compute_dtype=torch.float64)
    base_out, _ = attention_reference.attention(q, k, v, cu, max(lengths), False, d ** -0.5, 0.0, 0.0, 0,
                                                compute_dtype=None)
    ours, base = ((x.double() - true_out).abs().max().item() for x in (out, base_out))
    # bf16 torch loses much here (0.3: its scores round to bf16); the kernel's fp32 scores and
    # statistics must do far better: the bf16 rounding of the output itself (about 5e-3 here).
    assert ours <= min(2 * base, 0.02), (ours, base)
    torch.testing.assert_close(lse.double(), true_lse.double(), rtol=1e-5, atol=1e-4)


@needs_emulator
@pytest.mark.parametrize("d", (64, 128))
def test_emulated_attention_v2_wraps_the_stage_ring(attn_emulator, d):
    """v2 on sequences long enough to wrap its K/V stage ring several times (hd128: 2 stages, hd64: 4;
    1030 keys = 9 tiles), next to short ones, GQA 2, fp16 with softcap: matches float64 and equals v1
    bit for bit (the same operations in the same order; only the scheduling differs)."""
    for lengths, dtype, softcap in (((1030, 1, 130), torch.bfloat16, 0.0), ((17, 700), torch.float16, 20.0)):
        q, k, v, cu = make_attention_case(lengths, 2, 1, d, dtype, seed=150 + d)
        outs = {}
        for variant in (1, 2):
            err, why, out, lse = attn_emulator.run(q, k, v, cu, max(lengths), d ** -0.5, softcap, variant=variant)
            assert err == 0, (variant, why)
            outs[variant] = out, lse
        check_attention_against_reference(*outs[2], q, k, v, cu, max(lengths), d ** -0.5, softcap,
                                          where=f"v2 {dtype} d={d} {lengths}")
        assert torch.equal(outs[2][0], outs[1][0]) and torch.equal(outs[2][1], outs[1][1]), (dtype, d)


@needs_emulator
def test_emulated_attention_edges_and_rejections(attn_emulator, monkeypatch):
    # One token; a single sequence of exactly two tiles; a large max_seqlen (blocks past every end return)
    for lengths, max_seqlen in (((1,), 1), ((256,), 256), ((5, 3), 600)):
        q, k, v, cu = make_attention_case(lengths, 2, 1, 64, torch.float16, seed=7)
        err, why, out, lse = attn_emulator.run(q, k, v, cu, max_seqlen, 0.125, 0.0)
        assert err == 0, why
        check_attention_against_reference(out, lse, q, k, v, cu, max(lengths), 0.125, 0.0, where=str(lengths),
                                          exact_baseline_ok=lengths == (1,))
    # Nothing to do: no tokens
    q, k, v, cu = make_attention_case((0, 0), 2, 1, 64, torch.bfloat16, seed=8)
    assert attn_emulator.run(q, k, v, cu, 0, 0.125, 0.0)[0] == 0
    # The launcher's checks, with the message naming the argument
    q, k, v, cu = make_attention_case((7, 9), 2, 1, 64, torch.bfloat16, seed=9)
    misaligned = torch.zeros(q.numel() + 1, dtype=q.dtype)[1:].view(q.shape)
    err, why, *_ = attn_emulator.run(misaligned, k, v, cu, 9, 0.125, 0.0)
    assert err == CUDA_ERROR_INVALID_VALUE and "16-byte aligned" in why
    wide = torch.zeros(16, 2, 68, dtype=q.dtype)[:, :, :64]  # 136-byte head stride: not a multiple of 16
    err, why, *_ = attn_emulator.run(wide, k, v, cu, 9, 0.125, 0.0)
    assert err == CUDA_ERROR_INVALID_VALUE and "multiples of 16 bytes" in why
    err, why, *_ = attn_emulator.run(q.float(), k.float(), v.float(), cu, 9, 0.125, 0.0)
    assert err == CUDA_ERROR_INVALID_VALUE and "bfloat16 or float16" in why
    # The default variant (0) is v1 (kDefaultVariant in attention.cu) until a GPU measures v2
    outs = [attn_emulator.run(q, k, v, cu, 9, 0.125, 0.0, variant=variant)[2] for variant in (0, 1)]
    assert torch.equal(outs[0], outs[1])
    err, why, *_ = attn_emulator.run(q, k, v, cu, 9, 0.125, 0.0, variant=3)
    assert err == CUDA_ERROR_INVALID_VALUE and "variant" in why
    monkeypatch.setenv("L2VF_EMU_CC", "80")
    err, why, *_ = attn_emulator.run(q, k, v, cu, 9, 0.125, 0.0)
    assert err == CUDA_ERROR_NOT_SUPPORTED and "sm_90" in why


@needs_emulator
@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
def test_emulated_attention_neighbour_nan_does_not_leak(attn_emulator, variant):
    """NaN or inf in one sequence's V (an fp16 overflow) stays in that sequence: the last key tile of its
    predecessor holds its tokens (masked, P = 0), but 0 * NaN in the PV product would be NaN. The other
    sequences' outputs and lse are bitwise those of the clean run."""
    lengths = (5, 40, 3, 200)
    for d, bad in ((64, float("nan")), (128, float("inf"))):
        q, k, v, cu = make_attention_case(lengths, 2, 1, d, torch.float16, seed=40 + d)
        _, _, clean, clean_lse = attn_emulator.run(q, k, v, cu, max(lengths), d ** -0.5, 0.0,
                                                   variant=ATTN_VARIANTS[variant])
        v = v.clone()
        v[cu[1]:cu[2], :, ::3] = bad
        err, why, out, lse = attn_emulator.run(q, k, v, cu, max(lengths), d ** -0.5, 0.0,
                                               variant=ATTN_VARIANTS[variant])
        assert err == 0, why
        others = torch.cat([torch.arange(cu[b], cu[b + 1]) for b in (0, 2, 3)])
        assert not torch.isfinite(out[cu[1]:cu[2]].float()).all()  # the premise
        assert torch.isfinite(out[others].float()).all(), (d, "the bad sequence leaked into its neighbours")
        assert torch.equal(out[others], clean[others]) and torch.equal(lse[:, others], clean_lse[:, others]), d


@needs_emulator
@pytest.mark.parametrize("variant", list(ATTN_VARIANTS))
def test_emulated_attention_v_descriptor_knob(attn_emulator, variant):
    """The diagnostic override of V's descriptor strides reaches the kernel (v1 and v2): the built-in
    values given explicitly change nothing, the swapped order breaks hd128's output (what the GPU
    diagnosis looks for), and a stride that is not a multiple of 16 is refused. (At most 2 tiles: every
    load is issued before the first wgmma, so v2's swapped descriptor, which reads past its stage,
    cannot overlap a TMA refill.)"""
    run = functools.partial(attn_emulator.run, variant=ATTN_VARIANTS[variant])
    q, k, v, cu = make_attention_case((17, 130), 2, 1, 128, torch.bfloat16, seed=21)
    err, _, out, lse = run(q, k, v, cu, 130, 128 ** -0.5, 0.0)
    assert err == 0
    err, _, same, _ = run(q, k, v, cu, 130, 128 ** -0.5, 0.0, v_desc=(16384, 1024))
    assert err == 0 and torch.equal(same, out)
    err, _, swapped, _ = run(q, k, v, cu, 130, 128 ** -0.5, 0.0, v_desc=(1024, 16384))
    assert err == 0 and (swapped.float() - out.float()).abs().max() > 0.1
    err, why, *_ = run(q, k, v, cu, 130, 128 ** -0.5, 0.0, v_desc=(1000, 0))
    assert err == CUDA_ERROR_INVALID_VALUE and "v_desc_lbo" in why


@needs_emulator
@pytest.mark.parametrize("which, message", [
    (1, r"deadlock: every live thread spins"), (2, r"deadlock: every live thread spins"),
    (3, r"issued without a wgmma.fence"), (4, r"never retired by wgmma.wait_group"),
    (5, r"only SWIZZLE_128B \(layout type 1\) is emulated, got 0"), (6, r"destination not 1024-byte aligned"),
    (7, r"deadlock: every live thread spins"), (8, r"that an unretired wgmma of warpgroup 0 still reads"),
    (9, r"accumulator registers written by ordinary code while an async wgmma"),
    (10, r"setmaxnreg: not executed uniformly by the warpgroup"),
    (11, r"A fragment registers overwritten before the wgmma reading them was retired")])
def test_emulator_catches_broken_hopper_code(which, message):
    """The emulator aborts, naming the rule, on an mbarrier phase that can never complete, expect_tx bytes
    that never arrive, a wgmma without wgmma.fence or never waited for, a non-SWIZZLE_128B descriptor, a
    misaligned TMA destination, and the warp-specialisation bugs: consumers that never release a stage
    (the producer deadlocks), a TMA refill of smem an unretired wgmma reads, registers an in-flight wgmma
    owns (accumulators, RS A fragments) touched by ordinary code, a setmaxnreg not warpgroup-uniform
    (csrc/emulator/attention_emulator.cpp's self-test kernels)."""
    lib = _build_emulator()
    script = f"import ctypes; ctypes.CDLL({str(lib)!r}).l2vf_emu_attention_selftest({which}); print('NO-ABORT')"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "NO-ABORT" not in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert re.search(message, proc.stderr), proc.stderr[-2000:]


# Mutations of the v2 kernel (csrc/attention.cu, attention_fwd_ws_kernel) that break its protocol, and
# the emulator's message for each: a consumer that never releases V stages, O rescaled while the PV
# wgmma still accumulates into it, the next P packed into the fragments the PV wgmma still reads.
_V2_SOFTMAX = "    softmax_tile<D>(sc, m_run, alpha, sum, w.seqlen - j * kBlockN, lane, p);\n"
V2_MUTATIONS = {
    "no_v_empty_arrive": ("    hopper::mbarrier_arrive(v_empty(sp));\n", "", r"deadlock: every live thread spins"),
    "rescale_before_pv_wait": (_V2_SOFTMAX,
                               _V2_SOFTMAX + "    for (int e = 0; e < D / 2; ++e) o[e] *= alpha[(e / 2) % 2];\n",
                               r"accumulator registers written by ordinary code"),
    "pack_before_pv_wait": (_V2_SOFTMAX, _V2_SOFTMAX + "    pack_p<T>(sc, pa);\n",
                            r"A fragment registers overwritten before the wgmma"),
}


@needs_emulator
@pytest.mark.parametrize("mutation", list(V2_MUTATIONS))
def test_emulator_catches_v2_protocol_mutations(tmp_path, mutation):
    """The real v2 kernel with one protocol bug injected (a copy of csrc/ built for the emulator, about
    10 s each) aborts with the rule it breaks, on a 700-key sequence that wraps the stage ring."""
    old, new, message = V2_MUTATIONS[mutation]
    src = (CSRC / "attention.cu").read_text()
    cut = src.index("attention_fwd_ws_kernel(")
    assert old in src[cut:], f"the v2 kernel changed: update V2_MUTATIONS[{mutation!r}]"
    copy = tmp_path / "csrc"
    shutil.copytree(CSRC, copy, ignore=shutil.ignore_patterns("*.so", "*.o", "__pycache__"))
    (copy / "attention.cu").write_text(src[:cut] + src[cut:].replace(old, new, 1))
    lib = tmp_path / "attention_emulator.so"
    proc = subprocess.run(["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-w", f"-I{CUDA_INCLUDE}",
                           str(copy / "emulator" / "attention_emulator.cpp"), "-o", str(lib)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    script = f"""
import sys, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_cuda_kernels as t
q, k, v, cu = t.make_attention_case((700, 17), 2, 1, 128, torch.bfloat16, seed=5)
err, why, out, lse = t.AttnEmulator({str(lib)!r}).run(q, k, v, cu, 700, 128 ** -0.5, 0.0, variant=2)
print('NO-ABORT', err, why)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert proc.returncode != 0 and "NO-ABORT" not in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert re.search(message, proc.stderr), proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------
# 4. GPU: the real kernels against the torch reference
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def cuda_ext(ext, monkeypatch):
    """The cuda backend, backed by the session's build, offered by dispatch on CUDA devices."""
    previous = cuda_backend.use_extension(ext)
    real = dispatch._backend_runs_on
    monkeypatch.setattr(dispatch, "_backend_runs_on",
                        lambda b, d: d.type == "cuda" if b == "cuda" else real(b, d))
    yield ext
    cuda_backend.use_extension(previous)


class PublicOp:
    """lf.pool with a fixed backend, behind the backend contract (autograd for the gradient)."""

    def __init__(self, backend):
        self.backend = backend

    def pool_forward(self, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
        return lf.pool(hidden, cu_seqlens=cu_seqlens, attention_mask=attention_mask, embed_mask=embed_mask,
                       mode=mode, normalize=normalize, backend=self.backend)

    def pool_backward(self, grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
        h = hidden.detach().requires_grad_(True)
        self.pool_forward(h, cu_seqlens, attention_mask, embed_mask, mode, normalize).backward(grad_out)
        return h.grad


def _to(kw, device):
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ("packed", "left", "right"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_matches_reference(cuda_ext, dtype, layout):
    """Every mode (eos_token included) x normalize x embed_mask, forward and backward, through the public
    op; zero-length and nothing-to-pool sequences; D=1000 (16-byte path, 4 slices)."""
    lengths = (1, 17, 0, 113, 6, 0, 40, 300, 2, 77)
    for embed in (False, True):
        hidden, kw = make_case(lengths, 1000, dtype, seed=20, layout=layout, embed=embed)
        hidden, kw = hidden.cuda(), _to(kw, CUDA)
        for mode in MODES:
            for normalize in (False, True):
                out, _ = check_against_reference(PublicOp("cuda"), hidden, kw, mode, normalize,
                                                 where=f"{layout} {dtype} {mode} {normalize} embed={embed}")
                if layout == "packed":
                    assert torch.all(out[[2, 5]] == 0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ("mean", "weighted_mean", "last_token", "bos_token"))
def test_gpu_real_size(cuda_ext, mode):
    """T = 64k tokens, D = 4096, bf16, packed (lognormal-ish lengths, one empty) and padded (left)."""
    g = torch.Generator().manual_seed(21)
    raw = torch.exp(torch.randn(120, generator=g) * 0.6)
    lengths = (raw / raw.sum() * 65000).long().clamp_min(1)
    lengths[7] = 0
    lengths[-1] += 65536 - int(lengths.sum())
    assert int(lengths.sum()) == 65536 and int(lengths.min()) == 0
    hidden, kw = make_case(lengths.tolist(), 4096, torch.bfloat16, seed=22, device=CUDA)
    for normalize in (False, True):
        check_against_reference(cuda_backend, hidden, kw, mode, normalize, where=f"packed {normalize}")
    hidden, kw = make_case(lengths[:16].tolist(), 4096, torch.bfloat16, seed=23, layout="left", device=CUDA)
    check_against_reference(cuda_backend, hidden, kw, mode, True, where="padded")


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["bf16 D=4097", "fp16 D=4100", "fp32 D=4095 of 4096", "bf16 D=4093 of 4096",
                                  "bf16 D=27", "fp32 D=1", "bf16 misaligned start"])
def test_gpu_odd_dims(cuda_ext, case):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[case.split()[0]]
    lengths = (5, 0, 370, 2, 1031)
    if case == "bf16 misaligned start":
        hidden, kw = make_case(lengths, 512, dtype, seed=24)
        buf = torch.empty(hidden.numel() + 1, dtype=dtype)
        buf[1:] = hidden.reshape(-1)
        hidden = buf.cuda()[1:].view(hidden.shape)
    elif " of " in case:
        dim, width = (int(x) for x in re.findall(r"\d+", case.split("D=")[1])[:2])
        wide, kw = make_case(lengths, width, dtype, seed=24)
        hidden = wide.cuda()[:, :dim]
    else:
        hidden, kw = make_case(lengths, int(re.search(r"D=(\d+)", case).group(1)), dtype, seed=24)
        hidden = hidden.cuda()
    kw = _to(kw, CUDA)
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        for normalize in (False, True):
            check_against_reference(cuda_backend, hidden, kw, mode, normalize, where=f"{case} {mode} {normalize}")
    padded, pkw = make_case(lengths, hidden.shape[-1], dtype, seed=25, layout="left")
    for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
        check_against_reference(cuda_backend, padded.cuda(), _to(pkw, CUDA), mode, True, where=f"padded {mode}")


@pytest.mark.gpu
def test_gpu_split_sequences_and_determinism(cuda_ext):
    """A batch too small to fill the GPU: sequences split along their tokens (checked through the plan),
    partial sums added in split order, so repeated runs are bitwise identical."""
    for lengths in ((65536,), (40000, 0, 25536), (9000, 12, 3000)):
        hidden, kw = make_case(lengths, 4096, torch.bfloat16, seed=26, device=CUDA)
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        assert cuda_ext.pool_plan(hidden, kw["cu_seqlens"], None, kw["embed_mask"], "weighted_mean", True,
                                  num_sms=sms)["nsplit"] > 1
        for mode in ("mean", "weighted_mean", "last_token", "bos_token"):
            for normalize in (False, True):
                out, grad = check_against_reference(cuda_backend, hidden, kw, mode, normalize,
                                                    where=f"{lengths} {mode} {normalize}")
                args = (hidden, kw["cu_seqlens"], None, kw["embed_mask"], mode, normalize)
                assert torch.equal(cuda_backend.pool_forward(*args), out)


@pytest.mark.gpu
def test_gpu_edge_cases(cuda_ext):
    hidden, kw = make_case((4, 0, 9), 64, torch.bfloat16, seed=27, layout="left")
    kw["embed_mask"] = torch.zeros_like(kw["embed_mask"])
    hidden, kw = hidden.cuda(), _to(kw, CUDA)
    for mode in ("mean", "weighted_mean"):
        out, grad = check_against_reference(cuda_backend, hidden, kw, mode, True)
        assert torch.all(out == 0) and torch.all(grad == 0)
    kw["attention_mask"] = torch.zeros_like(kw["attention_mask"])
    for mode in MODES:
        out, grad = check_against_reference(cuda_backend, hidden, kw, mode, True)
        assert torch.all(out == 0) and torch.all(grad == 0)
    for lengths in ((0, 0, 0), (0,)):
        hidden, kw = make_case(lengths, 8, torch.float16, seed=28)
        out, grad = check_against_reference(cuda_backend, hidden.cuda(), _to(kw, CUDA), "mean", True)
        assert torch.all(out == 0) and grad.shape == (0, 8)
    out = cuda_backend.pool_forward(torch.zeros(3, 0, 8, device=CUDA), None, None, None, "mean", True)
    assert out.shape == (3, 8) and torch.all(out == 0)
    for value in (float("nan"), float("inf")):
        hidden, kw = make_case((3, 11, 0, 7), 32, torch.bfloat16, seed=29, layout="left", padding_value=value)
        for mode in MODES:
            check_against_reference(cuda_backend, hidden.cuda(), _to(kw, CUDA), mode, True)
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_current_stream_and_cuda_graph(cuda_ext):
    hidden, kw = make_case((300, 0, 1200, 17), 2048, torch.bfloat16, seed=30)
    hidden, kw = hidden.cuda(), _to(kw, CUDA)
    args = (kw["cu_seqlens"], None, kw["embed_mask"], "weighted_mean", True)
    want = reference.pool_forward(hidden, *args)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = cuda_backend.pool_forward(hidden, *args)
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(out, want, **FWD_TOL)
    # Capture forward and backward in one graph, replay on new values
    static_h = hidden.clone()
    grad_out = torch.randn(4, 2048, device=CUDA)
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):  # warm-up on a side stream, as torch.cuda.graph asks
        for _ in range(2):
            cuda_backend.pool_forward(static_h, *args)
            cuda_backend.pool_backward(grad_out, static_h, *args)
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = cuda_backend.pool_forward(static_h, *args)
        static_grad = cuda_backend.pool_backward(grad_out, static_h, *args)
    new = torch.randn_like(hidden)
    static_h.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out, reference.pool_forward(new, *args), **FWD_TOL)
    torch.testing.assert_close(static_grad.float(), reference.pool_backward(grad_out, new, *args).float(),
                               **_grad_tol(torch.bfloat16))


@pytest.mark.gpu
def test_gpu_torch_compile_and_opcheck(cuda_ext):
    hidden, kw = make_case((30, 7, 0, 120), 256, torch.bfloat16, seed=31)
    hidden, kw = hidden.cuda(), _to(kw, CUDA)

    def f(h):
        return lf.pool(h, cu_seqlens=kw["cu_seqlens"], embed_mask=kw["embed_mask"], mode="weighted_mean",
                       normalize=True, backend="cuda")

    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    out1, out2 = f(h1), torch.compile(f, fullgraph=True, backend="aot_eager")(h2)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    g = torch.randn_like(out1)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=0)
    for mode in ("mean", "last_token"):
        args = (hidden.requires_grad_(True), kw["cu_seqlens"], None, kw["embed_mask"], mode, True, "cuda")
        torch.library.opcheck(torch.ops.llm2vec_fast.pool_forward.default, args)
        torch.library.opcheck(torch.ops.llm2vec_fast.pool_backward.default,
                              (torch.randn(4, 256, device=CUDA), hidden.detach(), *args[1:]))


class PublicLoss:
    """lf.contrastive_loss's one direction with a fixed backend, behind the backend contract."""

    def __init__(self, backend):
        self.backend = backend

    def infonce_forward(self, anchors, candidates, label_offset, scale):
        return torch.ops.llm2vec_fast.infonce_forward(anchors, candidates, label_offset, scale, self.backend)

    def infonce_backward(self, grad_rows, anchors, candidates, lse, label_offset, scale):
        return torch.ops.llm2vec_fast.infonce_backward(grad_rows, anchors, candidates, lse, label_offset, scale,
                                                       self.backend)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_contrastive_matches_reference(cuda_ext, dtype):
    """Partial tiles, offsets, 16-byte and element-wise operand paths, split candidates, through the custom ops."""
    for rows, cols, dim, offset in ((11, 24, 48, 0), (70, 150, 40, 13), (333, 1000, 4096, 200), (64, 8192, 1000, 64),
                                    (500, 1500, 4093, 900), (1, 1, 8, 0)):
        a, c = make_nce_case(rows, cols, dim, dtype, offset, seed=rows, device=CUDA)
        for scale in (20.0, 50.0):
            check_nce_against_reference(PublicLoss("cuda"), a, c, offset, scale, where=f"{rows}x{cols}x{dim}+{offset}")


@pytest.mark.gpu
@pytest.mark.parametrize("symmetric", (False, True))
def test_gpu_contrastive_real_size(cuda_ext, symmetric):
    """B = 4096 queries, 4096 hard negatives, D = 4096, bf16, through lf.contrastive_loss (both directions)."""
    g = torch.Generator(CUDA).manual_seed(40)
    q = torch.randn(4096, 4096, device=CUDA, generator=g).bfloat16()
    d_pos = (q.float() + 5.0 * torch.randn(4096, 4096, device=CUDA, generator=g)).bfloat16()
    d_neg = torch.randn(4096, 4096, device=CUDA, generator=g).bfloat16()
    results = {}
    for backend in ("torch", "cuda"):
        leaves = [x.clone().requires_grad_(True) for x in (q, d_pos, d_neg)]
        loss = lf.contrastive_loss(*leaves, scale=50.0, symmetric=symmetric, backend=backend)
        loss.backward()
        results[backend] = (loss.detach(), *[x.grad for x in leaves])
    torch.testing.assert_close(results["cuda"][0], results["torch"][0], rtol=1e-4, atol=1e-4)
    for got, want, name in zip(results["cuda"][1:], results["torch"][1:], ("q", "d_pos", "d_neg")):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want.float(), **_nce_grad_tol(torch.bfloat16, want.float()),
                                   msg=lambda m: f"grad {name}: {m}")


@pytest.mark.gpu
def test_gpu_contrastive_chunked_backward_and_determinism(cuda_ext):
    """A x N > 2^26: the backward runs in two chunks per pass; repeated runs are bitwise identical."""
    a, c = make_nce_case(8192, 16384, 256, torch.bfloat16, 4096, seed=41, device=CUDA, noise=3.0)
    loss, lse, ga, gc = check_nce_against_reference(cuda_backend, a, c, 4096, 50.0, where="chunked")
    again = cuda_backend.infonce_forward(a, c, 4096, 50.0)
    assert torch.equal(again[0], loss) and torch.equal(again[1], lse)
    grads = cuda_backend.infonce_backward(torch.rand(8192, device=CUDA, generator=torch.Generator(CUDA).manual_seed(1)),
                                          a, c, lse, 4096, 50.0)
    assert torch.equal(grads[0], ga) and torch.equal(grads[1], gc)


@pytest.mark.gpu
def test_gpu_contrastive_edge_cases_compile_and_opcheck(cuda_ext):
    dim = 64
    row = torch.randn(1, dim, device=CUDA)
    loss, *_ = check_nce_against_reference(cuda_backend, row.repeat(6, 1), row.repeat(9, 1), 0, 20.0)
    torch.testing.assert_close(loss, torch.full((6,), float(torch.log(torch.tensor(9.0))), device=CUDA), rtol=1e-5,
                               atol=1e-5)
    a = torch.cat([torch.zeros(2, dim), torch.randn(4, dim)]).cuda()
    c = torch.cat([torch.randn(5, dim), torch.zeros(3, dim)]).cuda()
    check_nce_against_reference(cuda_backend, a, c, 1, 20.0, where="zero vectors")
    a, c = make_nce_case(6, 10, dim, torch.float32, 2, seed=42, device=CUDA)
    check_nce_against_reference(cuda_backend, a, c, 2, 1e4, where="scale 1e4", loss_tol=dict(rtol=1e-4, atol=1e-2),
                                compare_grads=False)
    q, d = make_nce_case(40, 90, 128, torch.bfloat16, 0, seed=43, device=CUDA)

    def f(q, d):
        return lf.contrastive_loss(q, d[:40], d[40:], scale=50.0, symmetric=True, backend="cuda")

    q1, d1 = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
    q2, d2 = q.clone().requires_grad_(True), d.clone().requires_grad_(True)
    out1, out2 = f(q1, d1), torch.compile(f, fullgraph=True, backend="aot_eager")(q2, d2)
    torch.testing.assert_close(out2, out1, rtol=1e-6, atol=1e-7)  # the sums around the op may be fused differently
    out1.backward()
    out2.backward()
    torch.testing.assert_close(q2.grad, q1.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(d2.grad, d1.grad, rtol=1e-5, atol=1e-7)
    args = (q.requires_grad_(True), d, 0, 50.0, "cuda")
    torch.library.opcheck(torch.ops.llm2vec_fast.infonce_forward.default, args)
    _, lse = cuda_backend.infonce_forward(q.detach(), d, 0, 50.0)
    torch.library.opcheck(torch.ops.llm2vec_fast.infonce_backward.default,
                          (torch.rand(40, device=CUDA), q.detach(), d, lse, 0, 50.0, "cuda"))



def _needs_sm90():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the attention kernel runs on sm_90 (H100 / H200) only")
    if cuda_backend.attention_switched_off():
        pytest.skip("LLM2VEC_FAST_CUDA_ATTENTION=off: the device check switched the kernel off after its "
                    "first-contact diagnosis failed (see step (a2) of the log)")


@pytest.fixture
def attention_variant(request):
    """Runs the test with cuda_backend's attention kernel variant set to request.param (1 = v1, 2 = v2)."""
    previous = cuda_backend.use_attention_variant(request.param)
    yield request.param
    cuda_backend.use_attention_variant(previous)


@pytest.mark.gpu
@pytest.mark.parametrize("attention_variant", [1, 2], ids=["v1", "v2"], indirect=True)
@pytest.mark.parametrize("d", (64, 128))
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=str)
def test_gpu_attention_matches_reference(cuda_ext, dtype, d, attention_variant):
    """The Hopper kernel (v1 and v2) through the public op (backend="cuda"): odd varlen lengths (up to
    1000 keys: v2's stage ring wraps), GQA 1/4/8, softcap, packed-qkv slices; out within 2x torch's own
    error, lse to float32 rounding (reference on the GPU)."""
    _needs_sm90()
    lengths = (1, 17, 0, 113, 130, 257, 128, 1000, 384)
    for i, (hq, hkv, softcap, packed) in enumerate(((4, 4, 0.0, False), (8, 2, 30.0, True), (16, 2, 0.0, True),
                                                    (8, 1, 50.0, False))):
        q, k, v, cu = (x.to(CUDA) for x in make_attention_case(lengths, hq, hkv, d, dtype, seed=200 + i,
                                                               packed_qkv=packed))
        assert cuda_backend.attention_kernel_supported(q, k, v, cu, False, 0.0)
        out = lf.flash_attention(q, k, v, cu, max(lengths), softcap=softcap, backend="cuda")
        _, lse = cuda_backend.flash_attention_forward(q, k, v, cu, max(lengths), False, d ** -0.5, softcap, 0.0, 0)
        check_attention_against_reference(out, lse, q, k, v, cu, max(lengths), d ** -0.5, softcap,
                                          where=f"{dtype} d={d} hq={hq} hkv={hkv} softcap={softcap}")


@pytest.mark.gpu
def test_gpu_attention_gradients_fallbacks_and_graphs(cuda_ext):
    """backward = Triton's (gradients match backend="triton"); causal / fp32 / head dim 80 fall back to
    the Triton forward; the kernel is deterministic and capturable in a CUDA graph."""
    _needs_sm90()
    lengths = (300, 17, 700)
    q, k, v, cu = (x.to(CUDA) for x in make_attention_case(lengths, 8, 2, 128, torch.bfloat16, seed=300))
    grads = {}
    for backend in ("cuda", "triton"):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = lf.flash_attention(*leaves, cu, 700, backend=backend)
        out.backward(torch.ones_like(out))
        grads[backend] = (out.detach(), *[x.grad for x in leaves])
    for got, want in zip(grads["cuda"], grads["triton"]):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
    for kw, (qq, kk, vv) in ((dict(causal=True), (q, k, v)), ({}, (q.float(), k.float(), v.float()))):
        assert not cuda_backend.attention_kernel_supported(qq, kk, vv, cu, kw.get("causal", False), 0.0)
        torch.testing.assert_close(lf.flash_attention(qq, kk, vv, cu, 700, backend="cuda", **kw),
                                   lf.flash_attention(qq, kk, vv, cu, 700, backend="triton", **kw))
    first = cuda_backend.flash_attention_forward(q, k, v, cu, 700, False, 0.1, 0.0, 0.0, 0)
    again = cuda_backend.flash_attention_forward(q, k, v, cu, 700, False, 0.1, 0.0, 0.0, 0)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    static_q = q.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        cuda_backend.flash_attention_forward(static_q, k, v, cu, 700, False, 0.1, 0.0, 0.0, 0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out, _ = cuda_backend.flash_attention_forward(static_q, k, v, cu, 700, False, 0.1, 0.0, 0.0, 0)
    new_q = torch.randn_like(q)
    static_q.copy_(new_q)
    graph.replay()
    torch.cuda.synchronize()
    want, _ = cuda_backend.flash_attention_forward(new_q, k, v, cu, 700, False, 0.1, 0.0, 0.0, 0)
    assert torch.equal(static_out, want)


@pytest.mark.gpu
def test_gpu_attention_speed_report(cuda_ext):
    """Not a bound: prints the kernels' (v1, v2) and Triton's forward time at a real size (bf16, hd128,
    32 x 1024 tokens, Hq 32, Hkv 8) so the device check records them."""
    _needs_sm90()
    q, k, v, cu = (x.to(CUDA) for x in make_attention_case([1024] * 32, 32, 8, 128, torch.bfloat16, seed=400))
    report = []
    for backend, variant in (("cuda", 1), ("cuda", 2), ("triton", None)):
        previous = cuda_backend.use_attention_variant(variant or 0)

        def f():
            return lf.flash_attention(q, k, v, cu, 1024, backend=backend)

        for _ in range(3):
            f()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(20):
            f()
        stop.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(stop) / 20
        cuda_backend.use_attention_variant(previous)
        label = backend if variant is None else f"{backend} v{variant}"
        report.append(f"{label}: {ms:.3f} ms, {4 * 32 * 1024 ** 2 * 32 * 128 / ms / 1e9:.0f} TFLOP/s")
    print("; ".join(report))
