"""Tests of ``llm2vec_fast.rotary_embedding`` (RoPE of q and k): the reference against the float64 rotation and
transformers' ``apply_rotary_pos_emb`` (bit for bit, forward and autograd's backward, full and Phi-3's partial
rotary), every backend against them (the triton kernel through the interpreter under ``make test``, on a GPU
otherwise; the CUDA kernel through the emulator of csrc/), strided, dense and in-place forms, bad input, the
custom-op registration, and the lean attention modules that run it in the models.

The interpreter casts float32 to bfloat16 by truncation where a GPU rounds to nearest: there the bf16 results
are compared within the flash-attention bound instead of bit for bit (float16 and float32 stay exact).
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import llm2vec_fast as lf
from llm2vec_fast import cuda_backend, dispatch
from llm2vec_fast.reference import rotary as reference

from cuda_support import cubin_report, needs_build, needs_emulator
from cuda_support import extension as cuda_extension
from elementwise_support import assert_within_bound_of_torch, backends_and_devices, grads_of, randn, triton_device

OP = "rotary_embedding"
HEADS_Q, HEADS_KV = 8, 2  # GQA: 4 query heads per key head
ROPE_BASE = 10000.0       # transformers' default rope_theta
VECTOR_BYTES = 16         # the kernels' vector accesses (csrc/rotary.cu)
PADDING = 7.0             # what a padded output's columns past D must keep
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FWD_OP = torch.ops.llm2vec_fast.rotary_embedding_forward
INPLACE_OP = torch.ops.llm2vec_fast.rotary_embedding_inplace
BWD_OP = torch.ops.llm2vec_fast.rotary_embedding_backward


def angles(tokens: int, width: int, *, seed: int = 0, dtype=torch.float32, device="cpu", kind="transformers"):
    """(cos, sin) of shape (T, R). ``kind="transformers"``: as a family's rotary embedding makes them (positions
    from a random start times R/2 inverse frequencies, the two halves the same, computed in float32 and cast);
    ``"random"``: independent values per column, so that the backward's sin[p] and the forward's sin[j] differ and
    a kernel that mixes them up shows."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "random":
        a, b = (2 * math.pi * torch.rand(tokens, width, generator=generator, dtype=torch.float64) for _ in range(2))
        return a.cos().to(device=device, dtype=dtype), b.sin().to(device=device, dtype=dtype)
    start = int(torch.randint(0, 1000, (1,), generator=generator))
    inverse = ROPE_BASE ** (-torch.arange(0, width, 2, dtype=torch.float32) / width)
    phase = torch.arange(start, start + tokens, dtype=torch.float32)[:, None] * inverse
    phase = torch.cat((phase, phase), dim=-1)
    return phase.cos().to(device=device, dtype=dtype), phase.sin().to(device=device, dtype=dtype)


def exact(q, k, cos, sin):
    """The rotation in float64, pair by pair: (x_j, x_{j+h}) turned by the angle whose (cos, sin) column j holds,
    differentiable; the columns past R unchanged."""
    def turn(x):
        x = x.double()
        width = cos.shape[-1]
        half = width // 2
        c, s = cos.double().unsqueeze(-2), sin.double().unsqueeze(-2)
        first, second, rest = x[..., :half], x[..., half:width], x[..., width:]
        return torch.cat((first * c[..., :half] - second * s[..., :half],
                          second * c[..., half:] + first * s[..., half:], rest), dim=-1)
    return turn(q), turn(k)


def transformers_rotary(q, k, cos, sin):
    """transformers' own ``apply_rotary_pos_emb`` (Phi-3's, which also takes a partial rotary width), on the
    (B, H, S, D) layout it expects: q (T, H, D) is taken as one sequence."""
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb
    q_embed, k_embed = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    return q_embed[0].transpose(0, 1), k_embed[0].transpose(0, 1)


def both(fn):
    """fn's (q, k) pair as one flat output for grads_of: q's elements, then k's."""
    def flat(q, k):
        rq, rk = fn(q, k)
        return torch.cat((rq.reshape(-1), rk.reshape(-1)))
    return flat


# (T, Hq, Hkv, D, R): one token; odd counts; GQA 1, 4 and 8; head dims 64, 80, 96 (Phi-3's partial R = 32),
# 128 and 256.
CASES = [(1, 1, 1, 64, 64), (17, 8, 2, 96, 32), (113, 8, 1, 128, 128), (5, 4, 4, 80, 80), (3, 2, 1, 256, 256)]


# ---------------------------------------------------------------------------------------------------
# 1. the reference
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens,hq,hkv,dim,width", CASES)
def test_reference_matches_the_fp64_rotation_and_its_gradient(tokens, hq, hkv, dim, width):
    q, k = randn(tokens, hq, dim, seed=1), randn(tokens, hkv, dim, seed=2)
    cos, sin = angles(tokens, width, seed=3)
    grad_out = randn(q.numel() + k.numel(), seed=4)
    got = grads_of(both(lambda a, b: lf.rotary_embedding(a, b, cos, sin, backend="torch")), [q, k], grad_out)
    want = grads_of(both(lambda a, b: exact(a, b, cos, sin)), [q.double(), k.double()], grad_out.double())
    for name, g, w in zip(("out", "dq", "dk"), got, want):
        torch.testing.assert_close(g.double(), w, atol=2e-6, rtol=2e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("width", [64, 32], ids=["full", "partial"])
def test_reference_is_transformers_apply_rotary_pos_emb_bit_for_bit(dtype, width):
    """Forward, and autograd's backward through transformers' expression, the same bits in every dtype."""
    q, k = randn(29, 4, 64, seed=5, dtype=dtype), randn(29, 2, 64, seed=6, dtype=dtype)
    cos, sin = angles(29, width, seed=7, dtype=dtype)
    grad_out = randn(q.numel() + k.numel(), seed=8, dtype=dtype)
    ours = grads_of(both(lambda a, b: lf.rotary_embedding(a, b, cos, sin, backend="torch")), [q, k], grad_out)
    theirs = grads_of(both(lambda a, b: transformers_rotary(a, b, cos, sin)), [q, k], grad_out)
    for name, a, b in zip(("out", "dq", "dk"), ours, theirs):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------------------------
# 2. every backend
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend,device", backends_and_devices("rotary_embedding"))
@pytest.mark.parametrize("tokens,hq,hkv,dim,width", CASES)
def test_fp32_matches_the_reference_and_fp64(backend, device, tokens, hq, hkv, dim, width):
    q, k = randn(tokens, hq, dim, seed=10, device=device), randn(tokens, hkv, dim, seed=11, device=device)
    cos, sin = angles(tokens, width, seed=12, device=device, kind="random")  # sin[p] != sin[j]
    grad_out = randn(q.numel() + k.numel(), seed=13, device=device)

    def run(name):
        return grads_of(both(lambda a, b: lf.rotary_embedding(a, b, cos, sin, backend=name)), [q, k], grad_out)

    got, want = run(backend), run("torch")
    truth = grads_of(both(lambda a, b: exact(a, b, cos.cpu(), sin.cpu())), [q.cpu().double(), k.cpu().double()],
                     grad_out.cpu().double())
    for name, g, w, t in zip(("out", "dq", "dk"), got, want, truth):
        assert torch.equal(g.cpu(), w.cpu()), f"{backend} {name}: not the reference's bits"  # no FMA contraction
        torch.testing.assert_close(g.cpu().double(), t, atol=1e-5, rtol=1e-5, msg=f"{backend} {name} vs float64")


@pytest.mark.parametrize("backend,device", backends_and_devices("rotary_embedding"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_rounds_as_transformers(backend, device, dtype):
    """fp16/bf16: the same bits as transformers' expression, forward and backward (each product rounded, then
    the sum); under the interpreter's truncating bf16 casts, within flash-attention's bound of torch's error
    against float64 instead."""
    tokens, hq, hkv, dim = 37, 8, 2, 128
    q, k = randn(tokens, hq, dim, seed=20, dtype=dtype, device=device), randn(tokens, hkv, dim, seed=21,
                                                                              dtype=dtype, device=device)
    cos, sin = angles(tokens, dim, seed=22, dtype=dtype, device=device)
    grad_out = randn(q.numel() + k.numel(), seed=23, dtype=dtype, device=device)
    got = grads_of(both(lambda a, b: lf.rotary_embedding(a, b, cos, sin, backend=backend)), [q, k], grad_out)
    base = grads_of(both(lambda a, b: transformers_rotary(a, b, cos, sin)), [q, k], grad_out)
    if backend == "triton" and dispatch.triton_interpreting() and dtype == torch.bfloat16:
        truth = grads_of(both(lambda a, b: exact(a, b, cos.cpu(), sin.cpu())), [q.cpu(), k.cpu()],
                         grad_out.cpu())
        assert_within_bound_of_torch(("out", "dq", "dk"), got, base, truth, truncation_ulps=2)
        return
    for name, g, b in zip(("out", "dq", "dk"), got, base):
        assert torch.equal(g.cpu(), b.cpu()), f"{backend} {name}: not transformers' bits"


@pytest.mark.parametrize("backend,device", backends_and_devices("rotary_embedding"))
def test_fused_qkv_views_dense_layouts_in_place_and_empty(backend, device):
    """q and k as strided views into a fused (T, (Hq + 2 Hkv) D) projection (Phi-3) are read where they lie;
    a dense (B, S, H, D) batch and the (B, H, S, D)-transposed layout transformers' modules hold give the packed
    result; inplace=True writes the same values into q and k and returns them; no token gives nothing."""
    tokens, hq, hkv, dim = 11, 4, 2, 64
    qkv = randn(tokens, (hq + 2 * hkv) * dim, seed=30, dtype=torch.float16, device=device)
    q, k = qkv[:, :hq * dim].view(tokens, hq, dim), qkv[:, hq * dim:(hq + hkv) * dim].view(tokens, hkv, dim)
    assert q.stride(0) == (hq + 2 * hkv) * dim
    cos, sin = angles(tokens, dim, seed=31, dtype=torch.float16, device=device)
    want = lf.rotary_embedding(q.contiguous(), k.contiguous(), cos, sin, backend="torch")
    for got, w in zip(lf.rotary_embedding(q, k, cos, sin, backend=backend), want):
        assert torch.equal(got, w)
    # dense (B, S, H, D), and transposed (B, H, S, D) storage seen as (B, S, H, D)
    batch = [t.view(1, tokens, *t.shape[1:]) for t in (q.contiguous(), k.contiguous())]
    dense = lf.rotary_embedding(*batch, cos[None], sin[None], backend=backend)
    transposed = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in batch]
    for got, w in zip(dense + lf.rotary_embedding(*transposed, cos[None], sin[None], backend=backend), want * 2):
        assert torch.equal(got.reshape(w.shape), w)
    with torch.no_grad():
        out = lf.rotary_embedding(q, k, cos, sin, inplace=True, backend=backend)
    assert out[0] is q and out[1] is k and torch.equal(q, want[0]) and torch.equal(k, want[1])
    empty_q, empty_k = q[:0], k[:0]
    assert [t.shape for t in lf.rotary_embedding(empty_q, empty_k, cos[:0], sin[:0], backend=backend)] == \
        [empty_q.shape, empty_k.shape]


@pytest.mark.skipif(triton_device() is None, reason="triton runs in the interpreter (TRITON_INTERPRET=1) or on a GPU")
@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_triton_kernel_writes_every_column_of_partial_rotary(backward):
    """Phi-3's partial rotary (D = 96, R = 32) into outputs pre-filled with NaN: the kernel writes the rotated
    columns and copies the 64 pass-through columns (an output buffer that happens to hold the right values
    cannot hide a missing copy); in place, the pass-through columns are left as they are."""
    from llm2vec_fast.kernels import rotary as triton_rotary

    device = triton_device()
    q, k = randn(9, 8, 96, seed=110, device=device), randn(9, 2, 96, seed=111, device=device)
    cos, sin = angles(9, 32, seed=112, device=device, kind="random")
    want = (reference.rotary_backward if backward else reference.rotary_forward)(q, k, cos, sin)
    outs = [torch.full_like(t, float("nan")) for t in (q, k)]
    triton_rotary._launch(q, k, cos, sin, *outs, backward=backward)
    for got, w in zip(outs, want):
        assert torch.equal(got, w)
    if not backward:
        own_q, own_k = q.clone(), k.clone()
        triton_rotary._launch(own_q, own_k, cos, sin, own_q, own_k, backward=False)
        assert torch.equal(own_q, want[0]) and torch.equal(own_k, want[1])


def fused_qkv(tokens, dim, *, seed, dtype=torch.bfloat16, offset=0):
    """A (T, offset + (Hq + 2 Hkv) D) buffer whose columns from `offset` on are a fused qkv projection's output."""
    return randn(tokens, offset + (HEADS_Q + 2 * HEADS_KV) * dim, seed=seed, dtype=dtype, scale=2.0)


def q_and_k(buffer, dim, offset=0):
    """q (T, Hq, D) and k (T, Hkv, D): strided views into the fused buffer (token stride (Hq + 2 Hkv) D)."""
    qkv = buffer[:, offset:]
    q = qkv[:, :HEADS_Q * dim].view(-1, HEADS_Q, dim)
    k = qkv[:, HEADS_Q * dim:(HEADS_Q + HEADS_KV) * dim].view(-1, HEADS_KV, dim)
    return q, k


def rotate_fused(buffer, dim, offset, cos, sin, grads, backend):
    """Forward and backward of the public op on q and k viewed in a leaf copy of the fused buffer: (rotated q,
    rotated k, the buffer's gradient: d q and d k where q and k lie, zeros elsewhere)."""
    leaf = buffer.detach().clone().requires_grad_(True)
    q, k = q_and_k(leaf, dim, offset)
    out_q, out_k = lf.rotary_embedding(q, k, cos, sin, backend=backend)
    (grad_buffer,) = torch.autograd.grad((out_q, out_k), leaf, grads)
    return out_q.detach(), out_k.detach(), grad_buffer


def rotate_fused_in_place(buffer, dim, offset, cos, sin, backend):
    """A copy of the fused buffer with q and k rotated where they lie (inplace=True)."""
    own = buffer.clone()
    q, k = q_and_k(own, dim, offset)
    with torch.no_grad():
        rotated_q, rotated_k = lf.rotary_embedding(q, k, cos, sin, inplace=True, backend=backend)
    assert rotated_q is q and rotated_k is k
    return own



@pytest.mark.parametrize("backend,device", backends_and_devices(OP))
def test_in_place_refuses_q_and_k_that_share_memory(backend, device):
    """inplace=True writes q and k: q is k (the triton kernel rotated it twice, torch once), a q overlapping k,
    an expanded q (one element for several tokens), or cos held in q's memory raise, changing nothing. The
    q and k slices of one fused projection (disjoint columns of the same rows) run (test above)."""
    cos, sin = angles(4, 8, seed=60, device=device)
    buffer = randn(4 * 16 + 8, seed=61, device=device)
    q = randn(4, 2, 8, seed=62, device=device)
    expanded = randn(1, 2, 8, seed=63, device=device).expand(4, 2, 8)
    cases = [(q, q, "q and k to share no memory"),
             (buffer[8:72].view(4, 2, 8), buffer[0:64].view(4, 2, 8), "q and k to share no memory"),
             (expanded, randn(4, 1, 8, seed=64, device=device), "a q whose elements each have their own memory")]
    for q_view, k_view, message in cases:
        before = (q_view.clone(), k_view.clone())
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            lf.rotary_embedding(q_view, k_view, cos, sin, inplace=True, backend=backend)
        assert torch.equal(q_view, before[0]) and torch.equal(k_view, before[1])
    angles_in_q = q.view(4, 16)[:, :8]
    with torch.no_grad(), pytest.raises(ValueError, match="q and cos to share no memory"):
        lf.rotary_embedding(q, randn(4, 1, 8, seed=65, device=device), angles_in_q, sin, inplace=True,
                            backend=backend)

# ---------------------------------------------------------------------------------------------------
# the CUDA kernels (csrc/rotary.cu): emulated runs (the CPU emulator of csrc/emulator/)
# ---------------------------------------------------------------------------------------------------
@pytest.mark.emulated_cuda
@needs_emulator
@pytest.mark.parametrize("tokens,dim,rot,offset,vec", [
    (17, 96, 32, 0, 8), (1, 96, 32, 0, 8), (17, 64, 64, 0, 8), (1, 64, 64, 0, 8), (17, 96, 32, 1, 1),
    (1, 64, 64, 1, 1)], ids=["partial-T17", "partial-T1", "full-T17", "full-T1", "misaligned-partial-T17",
                             "misaligned-full-T1"])
@pytest.mark.parametrize("kind", ["transformers", "random"])
def test_emulated_cuda_rotary_on_fused_qkv(_cuda_kernels_in_the_emulator, tokens, dim, rot, offset, vec, kind):
    """bf16 q and k read and written where they lie in a fused qkv buffer, GQA (Hq = 8, Hkv = 2): the forward
    (functional and in place) and the backward are the torch reference's bits. Partial rotary as Phi-3 (D = 96,
    R = 32: 64 pass-through columns) and full (D = R = 64). 16-byte vectors when the buffer is aligned;
    element by element when it starts one element in (offset 1: every row 2 bytes off), while the backward's
    contiguous gradients and outputs are aligned again."""
    emulated = _cuda_kernels_in_the_emulator
    buffer = fused_qkv(tokens, dim, seed=80 + tokens, offset=offset)
    cos, sin = angles(tokens, rot, kind=kind, dtype=torch.bfloat16, seed=81)
    grads = (randn(tokens, HEADS_Q, dim, seed=82, dtype=torch.bfloat16),
             randn(tokens, HEADS_KV, dim, seed=83, dtype=torch.bfloat16))

    got = rotate_fused(buffer, dim, offset, cos, sin, grads, "cuda")
    assert emulated.launches == {"rotary_forward": 1, "rotary_backward": 1}
    assert emulated.last_plan["vec"] == 8 and emulated.last_plan["copy_tail"]  # the backward's contiguous tensors
    want = rotate_fused(buffer, dim, offset, cos, sin, grads, "torch")
    for name, g, w in zip(("q", "k", "grad"), got, want):
        assert torch.equal(g, w), name  # the outputs start as NaN: every element was written, with torch's bits

    got_in_place = rotate_fused_in_place(buffer, dim, offset, cos, sin, "cuda")
    assert emulated.last_plan["vec"] == vec and not emulated.last_plan["copy_tail"]
    assert torch.equal(got_in_place, rotate_fused_in_place(buffer, dim, offset, cos, sin, "torch"))
    q, k = q_and_k(got_in_place, dim, offset)
    assert torch.equal(q, got[0]) and torch.equal(k, got[1])

    functional = emulated.rotary_forward(*q_and_k(buffer, dim, offset), cos, sin)
    assert emulated.last_plan["vec"] == vec and emulated.last_plan["copy_tail"]
    assert torch.equal(functional[0], got[0]) and torch.equal(functional[1], got[1])
    assert emulated.launches == {"rotary_forward": 3, "rotary_backward": 1}


def padded_heads(tokens, heads, dim, width, *, seed, dtype):
    """(T, H, dim) views of (T, H, width) rows: heads `width` elements apart, columns past dim left alone."""
    return randn(tokens, heads, width, seed=seed, dtype=dtype)[..., :dim]


@pytest.mark.emulated_cuda
@needs_emulator
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "padded", "misaligned-angles", "wide"])
def test_emulated_cuda_rotary_every_dtype_matches_the_reference_bit_for_bit(_cuda_kernels_in_the_emulator, dtype,
                                                                           layout):
    """Every dtype, against llm2vec_fast.reference.rotary directly, with angles that differ per column. Layouts:
    contiguous (D = 40, R = 32: 16-byte vectors in every dtype); padded heads (D = 44 of 48, into outputs of padded
    heads: the pass-through columns end in a partial vector in 16-bit types, and the padding stays); cos and
    sin one element off alignment (element by element); wide rows (D = 612, R = 600: 16-bit heads are 1224 bytes
    apart, so 300 pair slots element by element, more than a block has threads: each thread walks several).
    The inputs include tiny values, whose products are float32
    denormals (the kernels must not flush them: this shows on a GPU)."""
    emulated = _cuda_kernels_in_the_emulator
    tokens, dim, rot, width = 5, 40, 32, 40
    if layout == "padded":
        dim, width = 44, 48
    elif layout == "wide":
        dim, rot, width = 612, 600, 612
    q = padded_heads(tokens, 3, dim, width, seed=90, dtype=dtype)
    k = padded_heads(tokens, 1, dim, width, seed=91, dtype=dtype)
    q[0] *= 1e-37  # products of order 1e-38 and below: float32 denormals (bf16 keeps them; fp16 underflows)
    cos, sin = angles(tokens, rot, kind="random", dtype=dtype, seed=92)
    if layout == "misaligned-angles":
        both = torch.cat((cos, sin), dim=-1)
        cos, sin = (torch.cat((torch.zeros(tokens, 1, dtype=dtype), both), dim=-1)[:, 1:].split(rot, dim=-1))
    sixteen_bit = dtype != torch.float32
    scalar = layout == "misaligned-angles" or (layout == "wide" and sixteen_bit)  # wide: 1224-byte 16-bit heads
    vec = 1 if scalar else VECTOR_BYTES // q.element_size()
    want_q, want_k = reference.rotary_forward(q, k, cos, sin)

    got_q, got_k = emulated.rotary_forward(q, k, cos, sin)
    if layout == "padded":  # the contiguous outputs' heads are 88 / 176 bytes apart: 16-bit rows misaligned
        assert emulated.last_plan["vec"] == (4 if dtype == torch.float32 else 1)
        out_q = torch.full((tokens, 3, width), PADDING, dtype=dtype)[..., :dim]
        out_k = torch.full((tokens, 1, width), PADDING, dtype=dtype)[..., :dim]
        into = emulated.rotary_forward(q, k, cos, sin, out_q=out_q, out_k=out_k)
        assert into[0] is out_q and into[1] is out_k
        assert (out_q._base[..., dim:] == PADDING).all() and (out_k._base[..., dim:] == PADDING).all()
        assert torch.equal(out_q, want_q) and torch.equal(out_k, want_k)
    assert emulated.last_plan["vec"] == vec, emulated.last_plan
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)

    own_q, own_k = q.clone(), k.clone()
    emulated.rotary_forward(own_q, own_k, cos, sin, out_q=own_q, out_k=own_k)
    assert not emulated.last_plan["copy_tail"]
    assert torch.equal(own_q, want_q) and torch.equal(own_k, want_k)

    grad_q, grad_k = q.flip(0) * 3, k.flip(0) * 3  # tiny values too, in another token
    got = emulated.rotary_backward(grad_q, grad_k, cos, sin)
    for name, g, w in zip(("dq", "dk"), got, reference.rotary_backward(grad_q, grad_k, cos, sin)):
        assert g.is_contiguous() and torch.equal(g, w), name


@pytest.mark.emulated_cuda
@needs_emulator
def test_kill_switch_sends_rotary_to_the_fallback(_cuda_kernels_in_the_emulator, monkeypatch):
    """LLM2VEC_FAST_CUDA_OFF=rotary_embedding: the cuda backend runs the fallback, forward and backward."""
    emulated = _cuda_kernels_in_the_emulator
    q, k = randn(3, 4, 16, seed=95), randn(3, 2, 16, seed=96)
    cos, sin = angles(3, 16, kind="transformers", dtype=torch.float32)
    want = lf.rotary_embedding(q, k, cos, sin, backend="torch")
    monkeypatch.setenv(cuda_backend.CUDA_OFF_ENV, OP)
    got = lf.rotary_embedding(q.requires_grad_(True), k, cos, sin, backend="cuda")
    got[0].sum().backward()
    assert not emulated.launches
    assert torch.equal(got[0].detach(), want[0]) and torch.equal(got[1], want[1])
    monkeypatch.setenv(cuda_backend.CUDA_OFF_ENV, "gated_activation")
    lf.rotary_embedding(q.detach(), k, cos, sin, backend="cuda")
    assert emulated.launches == {"rotary_forward": 1}


def test_cuda_backend_registers_rotary_behind_the_kill_switch():
    dispatch._load_backends()
    impl = dispatch.implementation(OP, "cuda")
    assert impl.forward.__wrapped__ is cuda_backend.rotary_forward
    assert impl.backward.__wrapped__ is cuda_backend.rotary_backward


# ---------------------------------------------------------------------------------------------------
# the extension: plan and argument checks on CPU tensors, the cubin
# ---------------------------------------------------------------------------------------------------
@needs_build
def test_cuda_extension_rotary_plan_and_checks():
    """The extension's plan for CPU tensors (launches nothing) and its argument checks, before any CUDA work."""
    ext = cuda_extension()
    buffer = fused_qkv(9, 96, seed=97)
    q, k = q_and_k(buffer, 96)
    cos, sin = angles(9, 32, kind="transformers", dtype=torch.bfloat16)
    # 2 pair vectors + 8 pass-through vectors a row: 25 lanes of 10 threads walk 9 tokens x 3 groups of 4 heads
    assert ext.rotary_plan(q, k, cos, sin) == {"vec": 8, "pair_slots": 2, "slots": 10, "slot_threads": 10,
                                                "head_lanes": 25, "items": 27, "blocks": 2, "copy_tail": True}
    assert ext.rotary_plan(q, k, cos, sin, out_q=q, out_k=k) == {
        "vec": 8, "pair_slots": 2, "slots": 2, "slot_threads": 2, "head_lanes": 128, "items": 27, "blocks": 1,
        "copy_tail": False}
    assert ext.rotary_plan(q, k, cos, sin, out_q=q, backward=True)["copy_tail"]
    assert ext.rotary_plan(*q_and_k(fused_qkv(9, 96, seed=97, offset=1), 96, offset=1), cos, sin)["vec"] == 1
    narrow = angles(9, 8, kind="transformers", dtype=torch.bfloat16)  # R / 2 = 4 columns: 8 bytes
    assert ext.rotary_plan(q, k, *narrow)["vec"] == 1
    assert ext.rotary_plan(q.float(), k.float(), cos.float(), sin.float())["vec"] == 4
    many = 1 << 25  # stride-0 tokens: more items than 65535 blocks of 256 lanes take in one pass
    tiny, angle = torch.zeros(1, 1, 2).expand(many, 1, 2), torch.zeros(1, 2).expand(many, 2)
    plan = ext.rotary_plan(tiny, tiny, angle, angle, out_q=tiny, out_k=tiny)  # in place: nothing allocated
    assert plan["items"] == many and plan["head_lanes"] == 256 and plan["blocks"] == 65535

    with pytest.raises(TypeError, match="k must have q's dtype"):
        ext.rotary_forward(q, k.float(), cos, sin)
    with pytest.raises(TypeError, match="q must have dtype float32, float16 or bfloat16"):
        ext.rotary_forward(q.to(torch.int32), k, cos, sin)
    with pytest.raises(TypeError, match="cos must have q's dtype"):
        ext.rotary_forward(q, k, cos.float(), sin)
    with pytest.raises(ValueError, match=r"k must be \(9, Hkv, 96\) like q"):
        ext.rotary_forward(q, k[..., :64], cos, sin)
    with pytest.raises(ValueError, match="q must be 3-D"):
        ext.rotary_forward(q[0], k, cos, sin)
    with pytest.raises(ValueError, match=r"cos must be 2-D \(T, R\) with T = 9"):
        ext.rotary_forward(q, k, cos[:4], sin)
    with pytest.raises(ValueError, match="sin must have cos's shape"):
        ext.rotary_forward(q, k, cos, sin[:, :16])
    with pytest.raises(ValueError, match="even width R with 0 < R <= D = 96, got R = 31"):
        ext.rotary_forward(q, k, cos[:, :31], sin[:, :31])
    too_wide = torch.cat((cos, cos, cos, cos[:, :2]), dim=-1)
    with pytest.raises(ValueError, match="got R = 98"):
        ext.rotary_forward(q, k, too_wide, too_wide)
    with pytest.raises(ValueError, match="out_q must have q's shape"):
        ext.rotary_forward(q, k, cos, sin, out_q=k)
    with pytest.raises(ValueError, match="out_k must have a unit-stride last dim"):
        ext.rotary_forward(q, k, cos, sin, out_k=torch.empty(9, 96, 2, dtype=k.dtype).transpose(1, 2))
    with pytest.raises(ValueError, match="q must be a CUDA tensor"):
        ext.rotary_forward(q, k, cos, sin, out_q=q, out_k=k)
    with pytest.raises(ValueError, match="grad_q must be a CUDA tensor"):
        ext.rotary_backward(q, k, cos, sin)
    with pytest.raises(TypeError, match="grad_k must have grad_q's dtype"):
        ext.rotary_backward(q, k.half(), cos, sin)


@needs_build
def test_cuda_cubin_rotary_kernels_use_16_byte_accesses_without_spills():
    """Every dtype x (16-byte, scalar) x (forward, backward) instantiation: no stack (no spills); the 16-byte ones
    load a group's 4 heads x 2 vectors and the token's 4 angle vectors with LDG.E.128 and store with STG.E.128; no
    FFMA (the products and sums must round separately) and no FMUL / FADD that flushes denormals (.FTZ)."""
    report = cubin_report(cuda_extension())["kernels"]
    seen = set()
    for name, kernel in report.items():
        found = re.search(r"rotary_kernelI(13__nv_bfloat16|6__half|f)Li(\d+)ELb([01])E", name)
        if not found or "sass" not in kernel:
            continue
        seen.add(found.groups())
        sass = kernel["sass"]
        assert kernel.get("stack", 0) == 0, name
        assert not re.search(r"\bFFMA\b|\bF(MUL|ADD)\.FTZ\b", sass), name
        if found.group(2) != "1":
            assert len(re.findall(r"LDG\.E\.128", sass)) >= 12, name
            assert len(re.findall(r"STG\.E\.128", sass)) >= 8, name
    assert len(seen) == 3 * 2 * 2, sorted(seen)  # 3 dtypes x (16-byte, scalar) x (forward, backward)


# ---------------------------------------------------------------------------------------------------
# on a GPU: the extension against torch's own CUDA kernels
# ---------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not dispatch._importable(dispatch.EXTENSION), reason=f"{dispatch.EXTENSION} is not built")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_rotary_matches_torch_bit_for_bit(dtype):
    """Fused bf16 / fp16 / fp32 qkv on the GPU, Phi-3's partial rotary, tiny values whose products are float32
    denormals: the kernel's bits are torch's (no FMA contraction, no flush to zero), forward, in place and
    backward."""
    tokens, dim, rot = 33, 96, 32
    buffer = fused_qkv(tokens, dim, seed=98, dtype=dtype).cuda()
    buffer[:3] *= 1e-37
    cos, sin = (t.cuda() for t in angles(tokens, rot, kind="random", dtype=dtype, seed=99))
    grads = tuple(g.cuda() for g in (randn(tokens, HEADS_Q, dim, seed=100, dtype=dtype),
                                     randn(tokens, HEADS_KV, dim, seed=101, dtype=dtype) * 1e-37))
    got = rotate_fused(buffer, dim, 0, cos, sin, grads, "cuda")
    want = rotate_fused(buffer, dim, 0, cos, sin, grads, "torch")
    for name, g, w in zip(("q", "k", "grad"), got, want):
        assert torch.equal(g, w), name
    assert torch.equal(rotate_fused_in_place(buffer, dim, 0, cos, sin, "cuda"),
                       rotate_fused_in_place(buffer, dim, 0, cos, sin, "torch"))


# ---------------------------------------------------------------------------------------------------
# 3. bad input, registration
# ---------------------------------------------------------------------------------------------------
BAD_INPUTS = [
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor, got list"),
    (dict(q=torch.ones(3, 8)), ValueError, r"q must be \(\.\.\., Hq, D\)"),
    (dict(k=torch.ones(3, 2, 4)), ValueError, r"k must be \(\.\.\., Hkv, D\) with q's token dims \(3,\) and D = 8"),
    (dict(cos=torch.ones(4, 8)), ValueError, r"cos must be \(\.\.\., R\) with q's token dims \(3,\)"),
    (dict(sin=torch.ones(3, 6)), ValueError, r"sin must have cos's shape \(3, 8\), got \(3, 6\)"),
    (dict(cos=torch.ones(3, 5), sin=torch.ones(3, 5)), ValueError, "even width R with 0 < R <= D = 8"),
    (dict(cos=torch.ones(3, 10), sin=torch.ones(3, 10)), ValueError, "got R = 10"),
    (dict(k=torch.ones(3, 2, 8, dtype=torch.float16)), TypeError, "k must have the same dtype as q"),
    (dict(q=torch.ones(3, 4, 8, dtype=torch.int32)), TypeError, "q must have dtype in"),
    (dict(inplace=1), TypeError, "inplace must be a bool, got int 1"),
    (dict(k=torch.ones(3, 0, 8)), ValueError, r"q and k must have at least one head each"),
    (dict(cos=torch.ones(3, 8, requires_grad=True)), ValueError, "must not require grad"),
    (dict(q=torch.ones(3, 4, 8, requires_grad=True), inplace=True), ValueError, "computes no gradients"),
    (dict(q=torch.ones(2, 3, 4, 8).transpose(0, 1), k=torch.ones(2, 3, 2, 8).transpose(0, 1),
          cos=torch.ones(3, 2, 8), sin=torch.ones(3, 2, 8), inplace=True), ValueError, "token dims to merge"),
    (dict(backend="flash_attn"), ValueError, "backend"),
]


@pytest.mark.parametrize("overrides,error,pattern", BAD_INPUTS)
def test_bad_input_raises_naming_argument_and_value(overrides, error, pattern):
    args = dict(q=torch.ones(3, 4, 8), k=torch.ones(3, 2, 8), cos=torch.ones(3, 8), sin=torch.ones(3, 8),
                backend="auto")
    args.update(overrides)
    with pytest.raises(error, match=pattern):
        lf.rotary_embedding(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), **args)


def test_opcheck_and_fullgraph_compile():
    q, k = randn(6, 4, 16, seed=50), randn(6, 2, 16, seed=51)
    cos, sin = angles(6, 16, seed=52)
    torch.library.opcheck(FWD_OP.default, (q.requires_grad_(True), k.requires_grad_(True), cos, sin, "torch"))
    torch.library.opcheck(INPLACE_OP.default, (q.detach().clone(), k.detach().clone(), cos, sin, "torch"))
    torch.library.opcheck(BWD_OP.default, (randn(6, 4, 16, seed=53), randn(6, 2, 16, seed=54), cos, sin, "torch"))
    torch._dynamo.reset()

    def fn(a, b):
        ra, rb = lf.rotary_embedding(a * 1.5, b, cos, sin)
        return ra.sum(-1).sum(-1) + rb.sum(-1).sum(-1)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    grad_out = randn(6, seed=55)
    for g, w in zip(grads_of(compiled, [q, k], grad_out), grads_of(fn, [q, k], grad_out)):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------
# 4. inside the models: lean attention modules run the op where FUSED_BACKENDS names the device
# ---------------------------------------------------------------------------------------------------
@pytest.fixture
def rotary_calls(monkeypatch):
    """Every rotary_embedding call's (inplace, backend), the lean layers' probes reset (attention and the fused
    ops'), and the op recorded where the lean layers call it."""
    from llm2vec_fast.models import lean
    from llm2vec_fast.ops import rotary as op_module

    calls = []
    real = op_module.rotary_embedding

    def recording(q, k, cos, sin, **kwargs):
        calls.append((kwargs["inplace"], kwargs["backend"]))
        return real(q, k, cos, sin, **kwargs)

    monkeypatch.setattr(op_module, "rotary_embedding", recording)
    monkeypatch.setattr(lean, "_ATTENTION_PLANS", __import__("weakref").WeakKeyDictionary())
    monkeypatch.setattr(lean, "_PROBES", {})
    return calls


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"])
def test_lean_attention_is_every_family_forward_bit_for_bit(monkeypatch, rotary_calls, family, dtype):
    """Every supported family: the lean attention forward (the torch backend of the op) reproduces the module's
    forward, so each module's probe passes and the packed forward gives the same bits (the fused norms and
    MLPs of the torch backend are transformers' bits too)."""
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed, lean

    model = bi_model(family).to(dtype)
    ids, mask = make_batch(seed=61)
    with torch.no_grad():
        plain = forward_packed(model, ids, mask).hidden
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    with torch.no_grad():
        fused = forward_packed(model, ids, mask).hidden
    attention = [m for m in model.modules() if lean.is_rotary_attention(m)]
    assert all(lean._ATTENTION_PLANS[m][(dtype, "cpu", 64)] is not None for m in attention)
    assert rotary_calls == [(True, "torch")] * (2 * len(attention))  # per module: its probe, then its call
    assert torch.equal(fused, plain)


@pytest.mark.skipif(triton_device() != "cpu", reason="runs the triton op on the CPU through the interpreter")
@pytest.mark.parametrize("family", ["mistral", "qwen3", "gemma2", "phi3"])
def test_lean_attention_runs_the_fused_op_in_the_models(monkeypatch, rotary_calls, family):
    """A packed forward whose attention modules rotate q and k with the triton kernel (interpreted; in place
    without gradients; Qwen3's normed q and k; Phi-3's q and k read inside its fused qkv output) gives the family
    forward's output, and with gradients (functional form, as training runs) its gradients. Each module
    passes its attention function what the family's forward passes (Mistral's window, Gemma 2's softcap)."""
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed, lean

    model = bi_model(family)
    attention = [m for m in model.modules() if lean.is_rotary_attention(m)]
    assert len(attention) == model.config.num_hidden_layers
    ids, mask = make_batch(seed=62)
    with torch.no_grad():
        plain = forward_packed(model, ids, mask).hidden
    assert not rotary_calls
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "triton"})
    monkeypatch.setenv("LLM2VEC_FAST_FUSED_OPS", "1")
    with torch.no_grad():
        fused = forward_packed(model, ids, mask).hidden
    # one probe per module (functional, no gradients), then the real call in place
    assert rotary_calls[-len(attention):] == [(True, "triton")] * len(attention)
    torch.testing.assert_close(fused, plain, atol=1e-4, rtol=1e-4)  # the fused norms sum in another order
    plans = [lean._ATTENTION_PLANS[m][(torch.float32, "cpu", 64)] for m in attention]
    assert all(plan["scaling"] == 0.125 for plan in plans)
    if family == "mistral":
        assert plans[0]["sliding_window"] == model.config.sliding_window
    if family == "gemma2":
        assert plans[0]["softcap"] == model.config.attn_logit_softcapping
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    grads = []
    for backends in ({"cpu": "triton"}, {}):
        monkeypatch.setattr(lean, "FUSED_BACKENDS", backends)
        rotary_calls.clear()
        with lean.lean_layers(model):
            out = forward_packed(model, ids, mask).hidden
            grads.append(torch.autograd.grad(out.square().sum(), weights))
        assert rotary_calls == ([(False, "triton")] * len(attention) if backends else [])
    for a, b in zip(*grads):  # the fused norms' and MLPs' backward sum in another order
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def test_lean_attention_keeps_a_forward_it_does_not_reproduce(monkeypatch, rotary_calls):
    """A family whose RoPE is not transformers' usual one (here Llama's apply_rotary_pos_emb patched to rotate
    the other way) is caught by the probe: a warning, and the module keeps its own forward (its own output)."""
    from test_models import bi_model, make_batch
    from transformers.models.llama import modeling_llama

    from llm2vec_fast.models import forward_packed, lean

    usual = modeling_llama.apply_rotary_pos_emb
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", lambda q, k, cos, sin: usual(q, k, cos, -sin))
    model = bi_model("llama")
    ids, mask = make_batch(seed=63)
    with torch.no_grad():
        plain = forward_packed(model, ids, mask).hidden
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    with pytest.warns(RuntimeWarning, match="lean attention forward does not reproduce LlamaAttention"):
        with torch.no_grad():
            kept = forward_packed(model, ids, mask).hidden
    assert torch.equal(kept, plain)
    assert all(plan == {(torch.float32, "cpu", 64): None} for plan in lean._ATTENTION_PLANS.values())
    assert len(rotary_calls) == model.config.num_hidden_layers  # the probes only


def test_lean_attention_is_off_with_fused_ops_switched_off_and_restores_the_modules(monkeypatch, rotary_calls):
    """LLM2VEC_FAST_FUSED_OPS=0 keeps transformers' RoPE; after the block the modules have their class's forward
    again; a module in training mode passes its attention dropout, and the probe leaves its mode as it was."""
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed, lean

    model = bi_model("qwen2")
    ids, mask = make_batch(seed=64)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setenv(lean.FUSED_OPS_ENV, "0")
    with torch.no_grad():
        forward_packed(model, ids, mask)
    assert not rotary_calls
    monkeypatch.setenv(lean.FUSED_OPS_ENV, "1")
    attention = [m for m in model.modules() if lean.is_rotary_attention(m)]
    model.train()
    model.config.attention_dropout = 0.25
    seen = []
    real = lean._attention_function

    def spying(attn):
        function = real(attn)

        def call(*args, **kwargs):
            seen.append((kwargs["dropout"], attn.training))
            return function(*args, **kwargs)
        return call

    monkeypatch.setattr(lean, "_attention_function", spying)
    for m in attention:
        m.attention_dropout = 0.25
    with lean.lean_layers(model) as changed:
        assert set(map(id, attention)) <= set(map(id, changed))
        forward_packed(model, ids, mask)
    assert seen == [(0.25, True)] * len(attention) and all(m.training for m in model.modules())
    assert all("forward" not in m.__dict__ for m in attention)


def test_lean_attention_keeps_the_family_forward_under_autocast(monkeypatch, rotary_calls):
    """Under autocast the projections come out in the autocast dtype while cos and sin keep the model's, and
    transformers' RoPE promotes: the lean attention forward hands such calls to the family's forward."""
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed, lean

    model = bi_model("mistral")
    ids, mask = make_batch(seed=65)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain = forward_packed(model, ids, mask).hidden
        monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
        fused = forward_packed(model, ids, mask).hidden
    assert not rotary_calls
    torch.testing.assert_close(fused, plain, atol=0, rtol=0)



def test_lean_attention_draws_the_random_numbers_the_family_forward_draws(monkeypatch, rotary_calls):
    """In training mode (LoRA dropout on the projections, attention dropout), the fused forward draws the same
    random numbers in the same order as the family's: the same dropout masks, so the same output bits and the same
    RNG state after (GradCache replays masks this way). The first call's probe draws none: it runs both forwards
    in eval mode, with the RNG state restored after."""
    from peft import LoraConfig, get_peft_model
    from test_models import bi_model, make_batch

    from llm2vec_fast.models import forward_packed, lean

    model = get_peft_model(bi_model("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2,
                                                         target_modules=["q_proj", "k_proj", "v_proj"]))
    for name, param in model.named_parameters():  # B = 0 would hide the dropout masks: give the adapters weight
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.5)
    model.train()
    for attn in (m for m in model.modules() if lean.is_rotary_attention(m)):
        attn.attention_dropout = 0.3
    ids, mask = make_batch(seed=66)
    runs = []
    for backends in ({}, {"cpu": "torch"}):
        monkeypatch.setattr(lean, "FUSED_BACKENDS", backends)
        torch.manual_seed(7)
        # peft's LoRA dropout (the fused lora_linear draws its own masks, by design): the attention's draws are tested
        with torch.no_grad(), lean.lean_layers(model, fuse_dropout=False):
            out = forward_packed(model.base_model.model, ids, mask).hidden
        runs.append((out, torch.get_rng_state()))
    assert rotary_calls, "the fused path did not run"
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])
