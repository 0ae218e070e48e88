"""Tests of ``llm2vec_fast.rotary_embedding`` (RoPE of q and k): the reference against the float64 rotation and
transformers' ``apply_rotary_pos_emb`` (bit for bit, forward and autograd's backward, full and Phi-3's partial
rotary), every backend against them (the triton kernel through the interpreter under ``make test``, on a GPU
otherwise; the CUDA kernel through the emulator of csrc/), strided, dense and in-place forms, bad input, the
custom-op registration, and the lean attention modules that run it in the models.

The interpreter casts float32 to bfloat16 by truncation where a GPU rounds to nearest: there the bf16 results
are compared within the flash-attention bound instead of bit for bit (float16 and float32 stay exact).
"""
from __future__ import annotations

import pytest
import torch

import llm2vec_fast as lf
from llm2vec_fast import dispatch

from elementwise_support import assert_within_bound_of_torch, backends_and_devices, grads_of, randn

FWD_OP = torch.ops.llm2vec_fast.rotary_embedding_forward
INPLACE_OP = torch.ops.llm2vec_fast.rotary_embedding_inplace
BWD_OP = torch.ops.llm2vec_fast.rotary_embedding_backward


def angles(tokens: int, width: int, *, seed: int, dtype=torch.float32, device="cpu", base=10000.0, offset=0):
    """(cos, sin) as a family's rotary embedding makes them: positions offset.. times R/2 inverse frequencies,
    the two halves the same, computed in float32 and cast to ``dtype``; a random offset per test."""
    generator = torch.Generator().manual_seed(seed)
    start = offset + int(torch.randint(0, 1000, (1,), generator=generator))
    inverse = base ** (-torch.arange(0, width, 2, dtype=torch.float32) / width)
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
    cos, sin = angles(tokens, width, seed=12, device=device)
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
