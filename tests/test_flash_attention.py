"""Tests of ``llm2vec_fast.flash_attention``: its torch reference, the public op, and every backend.

The ground truth is ``oracle`` below: a float64 loop over sequences and heads that spells out the
definition (softcap, causal mask, softmax, explicit GQA index ``h // (Hq / Hkv)``). Everything else is
checked against it, directly or through the reference that it validates:

* the reference (``llm2vec_fast.reference.attention``) in float64 matches the oracle to rounding;
* the public op (forward, lse, backward) matches the oracle in float32;
* in fp16 / bf16 the op's error is within 2x (forward) / 3x (gradients) of PyTorch's own error when it
  computes in that dtype (flash-attention's test criterion);
* dropout, zero-length sequences, batch invariance, every validation error, the custom-op
  registration (opcheck, torch.compile), a hypothesis property test, and GPU backends at real sizes.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
from hypothesis import given, settings, strategies as st

import llm2vec_fast as lf
from llm2vec_fast import dispatch
from llm2vec_fast.reference import attention as ref_attn
from llm2vec_fast.reference.attention import attention, attention_backward, attention_forward, dropout_keep_mask

FWD_OP = torch.ops.llm2vec_fast.flash_attention_forward
BWD_OP = torch.ops.llm2vec_fast.flash_attention_backward

# Lengths with odd sizes, a 0-length sequence in the middle and one at the end.
ODD_LENGTHS = [1, 17, 0, 113, 0]


# ----------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------
def cu_from_lengths(lengths, device="cpu"):
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def rand_packed(lengths, hq, hkv, d, *, dtype=torch.float32, seed=0, device="cpu", requires_grad=False):
    """Random packed q (T, Hq, D), k, v (T, Hkv, D) and cu_seqlens; never constant tensors."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v = (torch.randn(total, h, d, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
               for h in (hq, hkv, hkv))
    if requires_grad:
        for x in (q, k, v):
            x.requires_grad_(True)
    return q, k, v, cu_from_lengths(lengths, device)


def rand_like(x, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(x.shape, generator=gen, dtype=torch.float32).to(device=x.device, dtype=x.dtype)


def oracle(q, k, v, cu_seqlens, *, causal, scale, softcap, keep=None, dropout_p=0.0):
    """float64 attention by definition, one (sequence, head) at a time.

    ``keep`` (Hq, T, >= max length) bool is an explicit dropout keep mask: query token t of head h keeps
    key j (its position within the sequence) where keep[h, t, j]; kept probabilities are scaled by
    1 / (1 - dropout_p). Differentiable by autograd through q, k, v. Returns (out (T, Hq, D) float64,
    lse (Hq, T) float64).
    """
    q64, k64, v64 = (x.to(torch.float64) for x in (q, k, v))
    hq, hkv = q.shape[1], k.shape[1]
    group = hq // hkv
    bounds = cu_seqlens.tolist()
    outs, lses = [], []
    for b in range(len(bounds) - 1):
        start, end = bounds[b], bounds[b + 1]
        n = end - start
        if n == 0:
            continue
        head_outs, head_lses = [], []
        for h in range(hq):
            kv = h // group  # explicit GQA index: query head h reads key/value head h // (Hq / Hkv)
            logits = (q64[start:end, h] @ k64[start:end, kv].T) * scale
            if softcap > 0:
                logits = softcap * torch.tanh(logits / softcap)
            if causal:
                future = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(1)
                logits = logits.masked_fill(future, float("-inf"))
            probs = torch.softmax(logits, dim=-1)
            if keep is not None:
                probs = probs * keep[h, start:end, :n].to(torch.float64) / (1.0 - dropout_p)
            head_outs.append(probs @ v64[start:end, kv])
            head_lses.append(torch.logsumexp(logits, dim=-1))
        outs.append(torch.stack(head_outs, dim=1))
        lses.append(torch.stack(head_lses, dim=0))
    if not outs:
        return q64 * 0, q64.new_zeros((hq, 0))
    return torch.cat(outs, dim=0), torch.cat(lses, dim=1)


def default_scale(d, scale):
    return d ** -0.5 if scale is None else scale


def assert_close64(actual, expected, *, atol, rtol, what=""):
    """Compares in float64 and reports the largest error."""
    torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def max_err(a, b):
    if a.numel() == 0:
        return 0.0
    return (a.to(torch.float64) - b.to(torch.float64)).abs().max().item()


def check_error_bounds(q, k, v, cu, max_seqlen, *, causal, scale, softcap, backend, truth,
                       fwd_factor=2.0, bwd_factor=3.0, fwd_atol=1e-5, bwd_atol=1e-4):
    """flash-attention's criterion for low precision.

    |ours - truth| <= fwd_factor * |torch in the same dtype - truth| + fwd_atol, and bwd_factor for the
    gradients, with "torch in the same dtype" = the reference with ``compute_dtype=None`` (autograd).
    ``truth(q, k, v) -> out`` is a float64 differentiable function of the float64 copies of the inputs.
    """
    dout = rand_like(q, seed=99)
    q64, k64, v64 = (x.detach().to(torch.float64).requires_grad_(True) for x in (q, k, v))
    out_true = truth(q64, k64, v64)
    grads_true = torch.autograd.grad(out_true, (q64, k64, v64), dout.to(torch.float64))

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out = lf.flash_attention(*leaves, cu, max_seqlen, causal=causal, softmax_scale=scale, softcap=softcap,
                             backend=backend)
    grads = torch.autograd.grad(out, leaves, dout)
    assert out.dtype == q.dtype and out.shape == q.shape
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape

    base_leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    base_out, _ = attention(*base_leaves, cu, max_seqlen, causal, default_scale(q.shape[-1], scale), softcap, 0.0, 0,
                            compute_dtype=None)
    base_grads = torch.autograd.grad(base_out, base_leaves, dout)

    report = []
    for name, ours, base, true, factor, atol in [
        ("out", out, base_out, out_true, fwd_factor, fwd_atol),
        ("dq", grads[0], base_grads[0], grads_true[0], bwd_factor, bwd_atol),
        ("dk", grads[1], base_grads[1], grads_true[1], bwd_factor, bwd_atol),
        ("dv", grads[2], base_grads[2], grads_true[2], bwd_factor, bwd_atol),
    ]:
        assert torch.isfinite(ours).all(), f"{name} has non-finite values"
        ours_err, base_err = max_err(ours, true), max_err(base, true)
        # The bound must not be vacuous: torch in this dtype really does round.
        assert base_err > 0, f"{name}: the same-dtype torch baseline is exact, so the bound says nothing"
        report.append(f"{name}: ours {ours_err:.3g}, torch-{q.dtype} {base_err:.3g}")
        assert ours_err <= factor * base_err + atol, "; ".join(report)
    return report


# ----------------------------------------------------------------------------------------------------
# 1. forward: reference (float64) and public op (float32) vs the float64 oracle
# ----------------------------------------------------------------------------------------------------
# (lengths, Hq, Hkv, D, causal, softcap, softmax_scale)
FORWARD_CASES = [
    pytest.param(ODD_LENGTHS, 4, 4, 64, False, 0.0, None, id="mha-d64"),
    pytest.param(ODD_LENGTHS, 4, 2, 80, True, 0.0, None, id="gqa2-d80-causal"),
    pytest.param(ODD_LENGTHS, 8, 2, 96, False, 30.0, None, id="gqa4-d96-cap30"),
    pytest.param(ODD_LENGTHS, 8, 1, 128, True, 2.0, 0.3, id="mqa8-d128-causal-cap2-scale"),
    pytest.param(ODD_LENGTHS, 16, 2, 256, False, 2.0, None, id="gqa8-d256-cap2"),
    pytest.param(ODD_LENGTHS, 16, 2, 64, True, 0.0, 1.0, id="gqa8-d64-causal-scale1"),
    pytest.param([17, 1, 113], 8, 8, 64, True, 30.0, 0.05, id="mha-causal-cap30-smallscale"),
    pytest.param([17, 1, 113], 8, 4, 256, True, 0.0, 0.3, id="gqa2-d256-causal-scale"),
    pytest.param([0, 33, 5], 2, 1, 80, False, 2.0, 0.5, id="mqa2-leading-empty-cap2"),
    pytest.param([113], 1, 1, 128, False, 0.0, None, id="single-seq-single-head"),
]


@pytest.mark.parametrize("lengths,hq,hkv,d,causal,softcap,scale", FORWARD_CASES)
def test_forward_matches_fp64_oracle(lengths, hq, hkv, d, causal, softcap, scale):
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=hq * 1000 + d)
    sm = default_scale(d, scale)
    out_true, lse_true = oracle(q, k, v, cu, causal=causal, scale=sm, softcap=softcap)
    max_seqlen = max(lengths)

    # The reference computed in float64 equals the definition to rounding.
    q64, k64, v64 = (x.double() for x in (q, k, v))
    out_ref, lse_ref = attention(q64, k64, v64, cu, max_seqlen, causal, sm, softcap, 0.0, 0,
                                 compute_dtype=torch.float64)
    assert out_ref.dtype == torch.float64 and lse_ref.dtype == torch.float32
    assert_close64(out_ref, out_true, atol=1e-12, rtol=1e-12, what="reference fp64 out")
    assert_close64(lse_ref, lse_true, atol=1e-5, rtol=1e-6, what="reference lse")

    # The public op in float32 (q's dtype and shape out).
    out = lf.flash_attention(q, k, v, cu, max_seqlen, causal=causal, softmax_scale=scale, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close64(out, out_true, atol=2e-5, rtol=1e-5, what="flash_attention out")

    # The custom op's lse output (Hq, T) float32, and the reference's no-grad forward.
    out_op, lse_op = FWD_OP(q, k, v, cu, max_seqlen, causal, sm, softcap, 0.0, None, "torch")
    assert lse_op.shape == (hq, q.shape[0]) and lse_op.dtype == torch.float32
    assert torch.equal(out_op, out)
    assert_close64(lse_op, lse_true, atol=2e-5, rtol=1e-5, what="custom op lse")
    out_fwd, lse_fwd = attention_forward(q, k, v, cu, max_seqlen, causal, sm, softcap, 0.0, 0)
    assert torch.equal(out_fwd, out) and torch.equal(lse_fwd, lse_op)

    # The options in this case really change the answer (so the comparison above covers them).
    if softcap == 2.0:
        uncapped, _ = oracle(q, k, v, cu, causal=causal, scale=sm, softcap=0.0)
        assert max_err(uncapped, out_true) > 1e-2
    if causal:
        bidirectional, _ = oracle(q, k, v, cu, causal=False, scale=sm, softcap=softcap)
        assert max_err(bidirectional, out_true) > 1e-2


def test_oracle_agrees_with_sdpa():
    """The oracle itself against torch's SDPA (an independent implementation), GQA and causal."""
    torch.manual_seed(1)
    q, k, v, cu = rand_packed([23], 8, 2, 64, seed=5)
    for causal in (False, True):
        out_true, _ = oracle(q, k, v, cu, causal=causal, scale=0.2, softcap=0.0)
        sdpa = torch.nn.functional.scaled_dot_product_attention(
            q.double().transpose(0, 1), k.double().transpose(0, 1), v.double().transpose(0, 1),
            is_causal=causal, scale=0.2, enable_gqa=True).transpose(0, 1)
        assert_close64(out_true, sdpa, atol=1e-12, rtol=1e-12, what=f"oracle vs sdpa causal={causal}")


@pytest.mark.parametrize("causal,softcap,scale", [(False, 0.0, None), (True, 2.0, 0.4)])
def test_dense_layout_matches_oracle_and_packed(causal, softcap, scale):
    batch, seqlen, hq, hkv, d = 3, 19, 8, 2, 96
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(batch, seqlen, hq, d, generator=gen)
    k = torch.randn(batch, seqlen, hkv, d, generator=gen)
    v = torch.randn(batch, seqlen, hkv, d, generator=gen)
    out = lf.flash_attention(q, k, v, causal=causal, softmax_scale=scale, softcap=softcap)
    assert out.shape == q.shape and out.dtype == q.dtype
    flat = [x.reshape(batch * seqlen, *x.shape[2:]) for x in (q, k, v)]
    cu = cu_from_lengths([seqlen] * batch)
    out_true, _ = oracle(*flat, cu, causal=causal, scale=default_scale(d, scale), softcap=softcap)
    assert_close64(out.reshape(batch * seqlen, hq, d), out_true, atol=2e-5, rtol=1e-5, what="dense out")
    packed = lf.flash_attention(*flat, cu, seqlen, causal=causal, softmax_scale=scale, softcap=softcap)
    assert torch.equal(out.reshape(batch * seqlen, hq, d), packed)


def test_non_contiguous_inputs_from_fused_qkv():
    """q, k, v sliced out of one fused projection (strided views) give the contiguous answer."""
    hq, hkv, d = 8, 2, 64
    lengths = [9, 0, 30]
    gen = torch.Generator().manual_seed(11)
    fused = torch.randn(sum(lengths), hq + 2 * hkv, d, generator=gen, requires_grad=True)
    q, k, v = fused[:, :hq], fused[:, hq:hq + hkv], fused[:, hq + hkv:]
    assert not q.is_contiguous()
    cu = cu_from_lengths(lengths)
    out = lf.flash_attention(q, k, v, cu, causal=True)
    (g_fused,) = torch.autograd.grad(out, fused, rand_like(out, 3))
    qc, kc, vc = (x.detach().contiguous().requires_grad_(True) for x in (q, k, v))
    out_c = lf.flash_attention(qc, kc, vc, cu, causal=True)
    gq, gk, gv = torch.autograd.grad(out_c, (qc, kc, vc), rand_like(out, 3))
    torch.testing.assert_close(out, out_c, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g_fused, torch.cat([gq, gk, gv], dim=1), atol=1e-6, rtol=1e-6)


# ----------------------------------------------------------------------------------------------------
# 2. gradients
# ----------------------------------------------------------------------------------------------------
GRAD_CASES = [
    pytest.param(ODD_LENGTHS, 4, 4, 64, False, 0.0, None, id="mha"),
    pytest.param(ODD_LENGTHS, 8, 2, 80, True, 0.0, None, id="gqa4-causal"),
    pytest.param(ODD_LENGTHS, 8, 1, 128, False, 2.0, 0.3, id="mqa-cap2-scale"),
    pytest.param([17, 1, 40, 0], 16, 2, 96, True, 30.0, None, id="gqa8-causal-cap30"),
    pytest.param([33, 0, 7], 4, 2, 256, False, 0.0, 0.1, id="gqa2-d256"),
]


@pytest.mark.parametrize("lengths,hq,hkv,d,causal,softcap,scale", GRAD_CASES)
def test_backward_matches_fp64_autograd(lengths, hq, hkv, d, causal, softcap, scale):
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=d + hq, requires_grad=True)
    out = lf.flash_attention(q, k, v, cu, causal=causal, softmax_scale=scale, softcap=softcap)
    dout = rand_like(out, seed=4)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out_true, _ = oracle(q64, k64, v64, cu, causal=causal, scale=default_scale(d, scale), softcap=softcap)
    grads_true = torch.autograd.grad(out_true, (q64, k64, v64), dout.double())
    for name, g, g_true, x in zip("qkv", grads, grads_true, (q, k, v)):
        assert g.shape == x.shape and g.dtype == x.dtype
        assert g_true.abs().max() > 1e-3  # a real gradient, not zeros
        assert_close64(g, g_true, atol=5e-5, rtol=1e-4, what=f"d{name}")


def test_dense_backward_matches_fp64_autograd():
    batch, seqlen, hq, hkv, d = 2, 21, 4, 1, 64
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(batch, seqlen, hq, d, generator=gen, requires_grad=True)
    k = torch.randn(batch, seqlen, hkv, d, generator=gen, requires_grad=True)
    v = torch.randn(batch, seqlen, hkv, d, generator=gen, requires_grad=True)
    out = lf.flash_attention(q, k, v, causal=True, softcap=3.0)
    dout = rand_like(out, 1)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [x.detach().double().reshape(batch * seqlen, *x.shape[2:]).requires_grad_(True) for x in (q, k, v)]
    out_true, _ = oracle(*leaves, cu_from_lengths([seqlen] * batch), causal=True, scale=d ** -0.5, softcap=3.0)
    grads_true = torch.autograd.grad(out_true, leaves, dout.double().reshape(batch * seqlen, hq, d))
    for name, g, g_true in zip("qkv", grads, grads_true):
        assert_close64(g.reshape(g_true.shape), g_true, atol=5e-5, rtol=1e-4, what=f"dense d{name}")


@pytest.mark.parametrize("causal,softcap,dropout_p", [
    (False, 0.0, 0.0), (True, 2.0, 0.0), (False, 30.0, 0.2), (True, 2.0, 0.3), (True, 0.0, 0.5)])
def test_reference_manual_backward_matches_autograd_fp64(causal, softcap, dropout_p):
    """attention_backward's written-out formulas (the kernels' oracle) equal autograd, dropout included."""
    lengths, hq, hkv, d, scale, seed = ODD_LENGTHS, 8, 2, 64, 0.35, 1234
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=torch.float64, seed=21, requires_grad=True)
    max_seqlen = max(lengths)
    out, lse = attention(q, k, v, cu, max_seqlen, causal, scale, softcap, dropout_p, seed,
                         compute_dtype=torch.float64)
    dout = rand_like(out, seed=2)
    grads_auto = torch.autograd.grad(out, (q, k, v), dout)
    grads_manual = attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, max_seqlen,
                                      causal, scale, softcap, dropout_p, seed, compute_dtype=torch.float64)
    for name, g_manual, g_auto in zip("qkv", grads_manual, grads_auto):
        assert g_manual.dtype == torch.float64
        assert_close64(g_manual, g_auto, atol=1e-11, rtol=1e-10, what=f"manual d{name}")
    if dropout_p > 0:  # dropout really acted, and a different seed gives different gradients
        no_drop, _ = attention(q, k, v, cu, max_seqlen, causal, scale, softcap, 0.0, seed,
                               compute_dtype=torch.float64)
        assert max_err(no_drop, out) > 1e-3
        other = attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, max_seqlen,
                                   causal, scale, softcap, dropout_p, seed + 1, compute_dtype=torch.float64)
        assert max_err(other[0], grads_manual[0]) > 1e-3


def test_reference_explicit_dropout_mask_matches_oracle():
    """attention(..., dropout_mask=M) (a kernel's replayed mask): forward and both backwards (autograd and the
    written-out one) equal the float64 oracle with the same explicit mask."""
    lengths, hq, hkv, d, p = [6, 0, 19, 1], 4, 2, 64, 0.3
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=torch.float64, seed=22, requires_grad=True)
    gen = torch.Generator().manual_seed(23)
    mask = torch.rand(hq, q.shape[0], 24, generator=gen) >= p  # wider than max_seqlen, as allowed
    out, lse = attention(q, k, v, cu, 19, True, 0.3, 2.0, p, 0, compute_dtype=torch.float64, dropout_mask=mask)
    q64, k64, v64 = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out_true, _ = oracle(q64, k64, v64, cu, causal=True, scale=0.3, softcap=2.0, keep=mask, dropout_p=p)
    assert_close64(out, out_true, atol=1e-12, rtol=1e-12, what="out with explicit mask")
    dout = rand_like(out, 24)
    grads_true = torch.autograd.grad(out_true, (q64, k64, v64), dout)
    grads_auto = torch.autograd.grad(out, (q, k, v), dout)
    grads_manual = attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, 19, True, 0.3,
                                      2.0, p, 0, compute_dtype=torch.float64, dropout_mask=mask)
    for name, g_auto, g_manual, g_true in zip("qkv", grads_auto, grads_manual, grads_true):
        assert_close64(g_auto, g_true, atol=1e-11, rtol=1e-10, what=f"autograd d{name}")
        assert_close64(g_manual, g_true, atol=1e-11, rtol=1e-10, what=f"manual d{name}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_reference_manual_backward_in_input_dtype(dtype, dropout_p):
    """compute_dtype=None (PyTorch's own low-precision path): the written-out backward runs, keeps the
    dtype, and agrees with autograd through attention(compute_dtype=None) to that dtype's rounding."""
    lengths, hq, hkv, d, seed = [9, 0, 30], 4, 2, 64, 55
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=dtype, seed=25, requires_grad=True)
    out, lse = attention(q, k, v, cu, 30, False, 0.125, 0.0, dropout_p, seed, compute_dtype=None)
    dout = rand_like(out, 26)
    grads_auto = torch.autograd.grad(out, (q, k, v), dout)
    grads_manual = attention_backward(dout, q.detach(), k.detach(), v.detach(), out.detach(), lse, cu, 30, False,
                                      0.125, 0.0, dropout_p, seed, compute_dtype=None)
    for name, g_manual, g_auto in zip("qkv", grads_manual, grads_auto):
        assert g_manual.dtype == dtype
        scale = g_auto.abs().max().item()
        assert_close64(g_manual, g_auto, atol=0.03 * scale, rtol=0.0, what=f"manual d{name}")


def test_lse_output_gradient_is_not_silently_dropped():
    """The custom op returns lse as an output. Either it is marked non-differentiable, or a loss that uses it
    gets the true gradient d lse / d q; a silent zero gradient is wrong."""
    q, k, v, cu = rand_packed([5, 12], 4, 2, 64, seed=31, requires_grad=True)
    sm = 0.125
    _, lse = FWD_OP(q, k, v, cu, 12, False, sm, 0.0, 0.0, None, "torch")
    if not lse.requires_grad:
        return  # marked non-differentiable: acceptable
    (dq,) = torch.autograd.grad(lse.sum(), q, allow_unused=True)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    _, lse_true = oracle(q64, k64, v64, cu, causal=False, scale=sm, softcap=0.0)
    (dq_true,) = torch.autograd.grad(lse_true.sum(), q64)
    assert dq is not None
    assert_close64(dq, dq_true, atol=1e-5, rtol=1e-4, what="d lse / d q")


# ----------------------------------------------------------------------------------------------------
# 3. low precision: flash-attention-style error bounds
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,softcap,scale", [
    pytest.param(ODD_LENGTHS, 8, 2, 128, True, 0.0, None, id="gqa4-causal-d128"),
    pytest.param([40, 0, 77, 1], 4, 1, 64, False, 2.0, 0.3, id="mqa-cap2"),
])
def test_low_precision_error_within_bound_of_torch(dtype, lengths, hq, hkv, d, causal, softcap, scale):
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=dtype, seed=17)
    sm = default_scale(d, scale)

    def truth(q64, k64, v64):
        return oracle(q64, k64, v64, cu, causal=causal, scale=sm, softcap=softcap)[0]

    check_error_bounds(q, k, v, cu, max(lengths), causal=causal, scale=scale, softcap=softcap, backend="auto",
                       truth=truth)


# ----------------------------------------------------------------------------------------------------
# 4. dropout
# ----------------------------------------------------------------------------------------------------
def test_dropout_changes_output_and_is_reproducible_under_manual_seed():
    q, k, v, cu = rand_packed([30, 0, 11], 4, 2, 64, seed=40)
    plain = lf.flash_attention(q, k, v, cu)
    torch.manual_seed(123)
    a = lf.flash_attention(q, k, v, cu, dropout_p=0.3)
    torch.manual_seed(123)
    b = lf.flash_attention(q, k, v, cu, dropout_p=0.3)
    torch.manual_seed(124)
    c = lf.flash_attention(q, k, v, cu, dropout_p=0.3)
    assert max_err(a, plain) > 1e-2
    assert torch.equal(a, b)
    assert max_err(a, c) > 1e-2
    assert torch.isfinite(a).all()
    # dropout_p=0 draws nothing and is deterministic.
    assert torch.equal(lf.flash_attention(q, k, v, cu, dropout_p=0.0), plain)


def test_dropout_backward_uses_forward_mask_custom_op_with_seed():
    """The custom op with an explicit seed equals autograd through the reference with that seed."""
    lengths, hq, hkv, d, p, seed = [13, 0, 29], 8, 2, 64, 0.25, 987654321
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=41, requires_grad=True)
    out, _ = FWD_OP(q, k, v, cu, 29, True, 0.2, 5.0, p, torch.tensor([seed]), "torch")
    dout = rand_like(out, 5)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out_ref, _ = attention(*leaves, cu, 29, True, 0.2, 5.0, p, seed)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def test_dropout_public_op_backward_uses_forward_seed(monkeypatch):
    """Through the public op: the forward and backward draw the mask from the same seed, and the gradients
    equal autograd through the reference with that seed."""
    seen = []
    original = ref_attn.dropout_keep_mask

    def recording(shape, dropout_p, seed, device):
        seen.append((tuple(shape), dropout_p, seed))
        return original(shape, dropout_p, seed, device)

    monkeypatch.setattr(ref_attn, "dropout_keep_mask", recording)
    q, k, v, cu = rand_packed([21, 4, 0], 4, 1, 80, seed=42, requires_grad=True)
    torch.manual_seed(7)
    out = lf.flash_attention(q, k, v, cu, dropout_p=0.4, softcap=10.0)
    dout = rand_like(out, 6)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert len(seen) == 2, seen  # one mask in the forward, the same one regenerated in the backward
    assert seen[0] == seen[1]
    seed = seen[0][2]
    monkeypatch.setattr(ref_attn, "dropout_keep_mask", original)
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out_ref, _ = attention(*leaves, cu, 21, False, 80 ** -0.5, 10.0, 0.4, seed)
    grads_ref = torch.autograd.grad(out_ref, leaves, dout)
    torch.testing.assert_close(out, out_ref, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)


def directional_derivative_check(backend, device="cpu", dtype=torch.float32, eps=1e-2, rtol=2e-3):
    """Backend-agnostic: with the RNG re-seeded before each call (same mask), the gradient's directional
    derivative matches central differences. A backward with any other mask would be far off."""
    lengths, hq, hkv, d, p = [24, 0, 9], 4, 2, 64, 0.3
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=43, device=device, dtype=dtype, requires_grad=True)
    dout = rand_like(q, 7)

    def loss(qq, kk, vv):
        torch.manual_seed(2024)
        out = lf.flash_attention(qq, kk, vv, cu, dropout_p=p, causal=True, backend=backend)
        return (out.double() * dout.double()).sum()

    grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    directions = [rand_like(x, 50 + i) for i, x in enumerate((q, k, v))]
    with torch.no_grad():
        plus = loss(*(x + eps * dx for x, dx in zip((q, k, v), directions)))
        minus = loss(*(x - eps * dx for x, dx in zip((q, k, v), directions)))
    numeric = ((plus - minus) / (2 * eps)).item()
    analytic = sum((g.double() * dx.double()).sum() for g, dx in zip(grads, directions)).item()
    assert abs(numeric - analytic) <= rtol * abs(analytic) + 1e-2, (numeric, analytic)
    # Without re-seeding the mask, the finite difference would not match: the check can fail.
    torch.manual_seed(1)
    with torch.no_grad():
        other = (lf.flash_attention(q + eps * directions[0], k, v, cu, dropout_p=p, causal=True, backend=backend)
                 .double() * dout.double()).sum()
    assert abs(other.item() - plus.item()) > 1e-3


def test_dropout_backward_is_derivative_of_forward():
    directional_derivative_check("auto")


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keep_fraction_and_scaling(p):
    """v = identity exposes the dropped probabilities: out[i, h, j] = P[i, j] * Z[i, j] / (1 - p)."""
    n, hq = 256, 4
    gen = torch.Generator().manual_seed(44)
    q = torch.randn(n, hq, n, generator=gen)
    k = torch.randn(n, 1, n, generator=gen)
    v = torch.eye(n).unsqueeze(1)  # value j is the j-th unit vector
    cu = cu_from_lengths([n])
    scale = 1e-3  # every probability is well above 0
    torch.manual_seed(45)
    out = lf.flash_attention(q, k, v, cu, softmax_scale=scale, dropout_p=p)
    probs, _ = oracle(q, k, v, cu, causal=False, scale=scale, softcap=0.0)  # = P since v = I
    kept = out != 0
    fraction = kept.double().mean().item()
    sigma = math.sqrt(p * (1 - p) / kept.numel())
    assert abs(fraction - (1 - p)) < 6 * sigma + 1e-3, fraction
    assert_close64(out[kept], (probs / (1 - p))[kept], atol=1e-7, rtol=1e-5, what="kept probabilities")
    # Masks differ across heads and rows (not one mask broadcast).
    assert not torch.equal(kept[:, 0], kept[:, 1])
    assert not torch.equal(kept[0], kept[1])
    # The reference mask helper agrees on the keep rate.
    mask = dropout_keep_mask((1 << 16,), p, 3, "cpu")
    assert abs(mask.double().mean().item() - (1 - p)) < 6 * math.sqrt(p * (1 - p) / mask.numel())


def test_dropout_is_unbiased():
    """E[out with dropout] = out without: the mean of many draws approaches it like 1/sqrt(N)."""
    q, k, v, cu = rand_packed([7, 17], 2, 1, 64, seed=46)
    plain = lf.flash_attention(q, k, v, cu, softmax_scale=0.05)
    torch.manual_seed(47)
    draws = torch.stack([lf.flash_attention(q, k, v, cu, softmax_scale=0.05, dropout_p=0.3) for _ in range(100)])
    single_err = (draws[0] - plain).abs().mean().item()
    mean_err = (draws.mean(0) - plain).abs().mean().item()
    assert single_err > 0.05
    assert mean_err < 0.25 * single_err, (mean_err, single_err)  # expected about 0.1 * single_err


# ----------------------------------------------------------------------------------------------------
# 5. zero-length and length-1 sequences
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,softcap,dropout_p", [(False, 0.0, 0.0), (True, 2.0, 0.0), (False, 0.0, 0.3)])
def test_zero_length_sequences_give_nothing_and_no_nan(causal, softcap, dropout_p):
    lengths, hq, hkv, d = [0, 5, 0, 0, 1, 9, 0], 4, 2, 64
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=50, requires_grad=True)
    out = lf.flash_attention(q, k, v, cu, causal=causal, softcap=softcap, dropout_p=dropout_p)
    assert out.shape == (15, hq, d)
    grads = torch.autograd.grad(out, (q, k, v), rand_like(out, 8))
    assert torch.isfinite(out).all()
    for g in grads:
        assert torch.isfinite(g).all()
    _, lse = FWD_OP(q, k, v, cu, 9, causal, d ** -0.5, softcap, 0.0, None, "torch")
    assert torch.isfinite(lse).all()
    if dropout_p == 0:
        out_true, _ = oracle(q, k, v, cu, causal=causal, scale=d ** -0.5, softcap=softcap)
        assert_close64(out, out_true, atol=2e-5, rtol=1e-5, what="out")


@pytest.mark.parametrize("lengths,max_seqlen", [([0], None), ([0, 0, 0], None), ([0, 0], 0), ([0], 4)])
def test_all_zero_length_batch(lengths, max_seqlen):
    """T = 0: an empty output of q's shape, and empty gradients, without error or NaN."""
    hq, hkv, d = 4, 2, 64
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=51, requires_grad=True)
    assert q.shape == (0, hq, d)
    out = lf.flash_attention(q, k, v, cu, max_seqlen, causal=True)
    assert out.shape == (0, hq, d) and out.dtype == q.dtype
    grads = torch.autograd.grad(out.sum() * 1.0, (q, k, v), allow_unused=True)
    for g, x in zip(grads, (q, k, v)):
        assert g is None or (g.shape == x.shape and torch.isfinite(g).all())


@pytest.mark.parametrize("shape", [(2, 0, 4, 64), (0, 5, 4, 64)], ids=["S=0", "B=0"])
def test_dense_empty_batch(shape):
    gen = torch.Generator().manual_seed(52)
    q = torch.randn(shape, generator=gen, requires_grad=True)
    kv_shape = shape[:2] + (2, shape[3])
    k = torch.randn(kv_shape, generator=gen, requires_grad=True)
    v = torch.randn(kv_shape, generator=gen, requires_grad=True)
    out = lf.flash_attention(q, k, v)
    assert out.shape == shape
    out.sum().backward()
    assert q.grad is None or q.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_length_one_sequences_copy_their_value(dtype, causal):
    """A sequence of one token attends only to itself: out = v exactly, lse = its (capped) logit."""
    lengths, hq, hkv, d = [1, 1, 0, 1], 8, 2, 80
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=dtype, seed=53, requires_grad=True)
    out = lf.flash_attention(q, k, v, cu, causal=causal, softcap=2.0)
    heads = torch.arange(hq) // (hq // hkv)
    assert torch.equal(out, v[:, heads].detach())
    _, lse = FWD_OP(q, k, v, cu, 1, causal, 0.5, 2.0, 0.0, None, "torch")
    logit = 2.0 * torch.tanh((q.double() * k.double()[:, heads]).sum(-1) * 0.5 / 2.0)
    assert_close64(lse, logit.t(), atol=1e-5, rtol=1e-5, what="lse of single tokens")
    # q and k cannot matter (softmax over one key is 1), so their gradients are 0; dv sums its heads' dout.
    dout = rand_like(out, 9)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.isfinite(dq).all() and dq.abs().max() == 0 and dk.abs().max() == 0
    expected_dv = dout.float().view(3, hkv, hq // hkv, d).sum(2)
    assert_close64(dv, expected_dv, atol=1e-2 if dtype != torch.float32 else 1e-6, rtol=1e-2, what="dv")


# ----------------------------------------------------------------------------------------------------
# 6. batch invariance of the reference
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 2.0)])
def test_batch_invariance(causal, softcap):
    """One sequence's output does not depend on its neighbours or its place in the pack.

    Bitwise equal whenever the padded size max_seqlen is the same (given explicitly); when max_seqlen
    differs the matmul reduction length changes with the padding, and only tiny rounding differences remain.
    """
    hq, hkv, d, n = 4, 2, 64, 37
    mine = [rand_like(torch.empty(n, h, d), 60 + i) for i, h in enumerate((hq, hkv, hkv))]

    def run(before, after, max_seqlen):
        others_b = rand_packed(before, hq, hkv, d, seed=61)[:3] if before else None
        others_a = rand_packed(after, hq, hkv, d, seed=62)[:3] if after else None
        parts = [p for p in (others_b, mine, others_a) if p is not None]
        q, k, v = (torch.cat([p[i] for p in parts]) for i in range(3))
        cu = cu_from_lengths(list(before) + [n] + list(after))
        if max_seqlen is None:
            max_seqlen = max(list(before) + [n] + list(after))
        out = lf.flash_attention(q, k, v, cu, max_seqlen, causal=causal, softcap=softcap)
        start = sum(before)
        return out[start:start + n]

    packs = [([], []), ([5], []), ([], [5]), ([1, 0, 30], [2, 0]), ([0] * 3, [1] * 10), ([36], [36, 0])]
    alone = run([], [], 200)
    for before, after in packs:
        assert torch.equal(run(before, after, 200), alone), (before, after)
    # Neighbours that change the padded length: equal up to float32 rounding only.
    alone_tight = run([], [], None)
    for before, after in [([100, 3], []), ([], [0, 200, 0]), ([150], [1])]:
        torch.testing.assert_close(run(before, after, None), alone_tight, atol=1e-6, rtol=1e-6)
    assert_close64(alone, oracle(*mine, cu_from_lengths([n]), causal=causal, scale=d ** -0.5, softcap=softcap)[0],
                   atol=2e-5, rtol=1e-5, what="alone")


# ----------------------------------------------------------------------------------------------------
# 7. bad input
# ----------------------------------------------------------------------------------------------------
def _good(**overrides):
    """A valid packed call (T=10, Hq=4, Hkv=2, D=64), with some arguments replaced."""
    q, k, v, cu = rand_packed([4, 6], 4, 2, 64, seed=70)
    args = dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=None)
    args.update(overrides)
    q, k, v, cu, ms = args.pop("q"), args.pop("k"), args.pop("v"), args.pop("cu_seqlens"), args.pop("max_seqlen")
    return lf.flash_attention(q, k, v, cu, ms, **args)


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(shape).to(dtype=dtype, device=device)


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


BAD_INPUTS = [
    # (overrides, error type, regex that must name the argument and the received value)
    pytest.param(dict(q=[[1.0]]), TypeError, r"q must be a torch\.Tensor, got list", id="q-not-tensor"),
    pytest.param(dict(k=3.0), TypeError, r"k must be a torch\.Tensor, got float", id="k-not-tensor"),
    pytest.param(dict(q=_t(1, 10, 4, 64)), ValueError, r"q must be \(T, H, D\) with cu_seqlens, got shape \(1, 10, 4, 64\)",
                 id="packed-q-4d"),
    pytest.param(dict(v=_t(10, 2, 64, 1)), ValueError, r"v must be \(T, H, D\) with cu_seqlens, got shape \(10, 2, 64, 1\)",
                 id="packed-v-4d"),
    pytest.param(dict(q=_t(10, 4, 64), k=_t(10, 2, 64), v=_t(10, 2, 64), cu_seqlens=None), ValueError,
                 r"q must be \(B, S, H, D\) without cu_seqlens, got shape \(10, 4, 64\)", id="dense-q-3d"),
    pytest.param(dict(q=_t(10, 4, 64, dtype=torch.float64), k=_t(10, 2, 64, dtype=torch.float64),
                      v=_t(10, 2, 64, dtype=torch.float64)), TypeError, r"q must have dtype in .*got float64",
                 id="float64"),
    pytest.param(dict(q=torch.randint(0, 5, (10, 4, 64), dtype=torch.int32)), TypeError,
                 r"q must have dtype in \['float16', 'bfloat16', 'float32'\], got int32", id="int-q"),
    pytest.param(dict(v=_t(10, 2, 64, dtype=torch.float16)), TypeError,
                 r"v must have the same dtype as q \(float32\), got float16", id="mixed-dtypes"),
    pytest.param(dict(v=_t(10, 4, 64)), ValueError, r"v must have k's shape \(10, 2, 64\), got \(10, 4, 64\)",
                 id="kv-shape"),
    pytest.param(dict(k=_t(9, 2, 64), v=_t(9, 2, 64)), ValueError, r"k must have q's token dims \(10,\), got \(9,\)",
                 id="token-dims"),
    pytest.param(dict(q=_t(2, 5, 4, 64), k=_t(2, 6, 2, 64), v=_t(2, 6, 2, 64), cu_seqlens=None), ValueError,
                 r"k must have q's token dims \(2, 5\), got \(2, 6\)", id="dense-token-dims"),
    pytest.param(dict(k=_t(10, 2, 80), v=_t(10, 2, 80)), ValueError, r"k must have q's head dim 64, got 80",
                 id="k-head-dim"),
    pytest.param(dict(q=_t(10, 4, 32), k=_t(10, 2, 32), v=_t(10, 2, 32)), ValueError,
                 r"head dim \(q\.shape\[-1\]\) must be one of \(64, 80, 96, 128, 256\), got 32", id="head-dim-32"),
    pytest.param(dict(q=_t(10, 4, 192), k=_t(10, 2, 192), v=_t(10, 2, 192)), ValueError,
                 r"must be one of \(64, 80, 96, 128, 256\), got 192", id="head-dim-192"),
    pytest.param(dict(q=_t(10, 6, 64), k=_t(10, 4, 64), v=_t(10, 4, 64)), ValueError, r"Hq=6 .*Hkv=4",
                 id="hq-not-multiple"),
    pytest.param(dict(k=_t(10, 0, 64), v=_t(10, 0, 64)), ValueError, r"Hq=4 .*Hkv=0", id="hkv-zero"),
    pytest.param(dict(cu_seqlens=[0, 4, 10]), TypeError, r"cu_seqlens must be a torch\.Tensor of dtype int32, got list",
                 id="cu-list"),
    pytest.param(dict(cu_seqlens=_cu([0, 4, 10], torch.int64)), TypeError, r"cu_seqlens must have dtype int32, got int64",
                 id="cu-int64"),
    pytest.param(dict(cu_seqlens=_cu([[0, 4, 10]])), ValueError, r"cu_seqlens must be 1-D .*got shape \(1, 3\)",
                 id="cu-2d"),
    pytest.param(dict(cu_seqlens=_cu([10])), ValueError, r"cu_seqlens must be 1-D with B\+1 >= 2 entries, got shape \(1,\)",
                 id="cu-one-entry"),
    pytest.param(dict(cu_seqlens=_cu([1, 4, 10])), ValueError, r"cu_seqlens must start at 0, got 1", id="cu-start"),
    pytest.param(dict(cu_seqlens=_cu([0, 4, 9])), ValueError, r"cu_seqlens must end at the total token count T=10, got 9",
                 id="cu-end"),
    pytest.param(dict(cu_seqlens=_cu([0, 4, 11])), ValueError, r"cu_seqlens must end at .*T=10, got 11", id="cu-end-over"),
    pytest.param(dict(cu_seqlens=_cu([0, 8, 5, 10])), ValueError,
                 r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\]=8 > cu_seqlens\[2\]=5", id="cu-decreasing"),
    pytest.param(dict(cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32, device="meta")), ValueError,
                 r"cu_seqlens must be on the same device as the inputs \(cpu\), got meta", id="cu-device-meta"),
    pytest.param(dict(k=_t(10, 2, 64, device="meta")), ValueError,
                 r"k must be on the same device as q \(cpu\), got meta", id="k-device-meta"),
    pytest.param(dict(max_seqlen=5), ValueError,
                 r"max_seqlen must be >= the longest sequence in cu_seqlens \(6\), got 5", id="max-seqlen-small"),
    pytest.param(dict(max_seqlen=6.0), TypeError, r"max_seqlen must be an int, got float", id="max-seqlen-float"),
    pytest.param(dict(max_seqlen=True), TypeError, r"max_seqlen must be an int, got bool", id="max-seqlen-bool"),
    pytest.param(dict(max_seqlen=-1), ValueError, r"max_seqlen must be >= 0, got -1", id="max-seqlen-negative"),
    pytest.param(dict(q=_t(2, 5, 4, 64), k=_t(2, 5, 2, 64), v=_t(2, 5, 2, 64), cu_seqlens=None, max_seqlen=5),
                 ValueError, r"max_seqlen goes with cu_seqlens .*max_seqlen=5 without cu_seqlens",
                 id="max-seqlen-without-cu"),
    pytest.param(dict(causal=1), TypeError, r"causal must be a bool, got int", id="causal-int"),
    pytest.param(dict(causal="yes"), TypeError, r"causal must be a bool, got str", id="causal-str"),
    pytest.param(dict(softmax_scale=0.0), ValueError, r"softmax_scale must be > 0, got 0\.0", id="scale-zero"),
    pytest.param(dict(softmax_scale=-0.5), ValueError, r"softmax_scale must be > 0, got -0\.5", id="scale-negative"),
    pytest.param(dict(softmax_scale=math.inf), ValueError, r"softmax_scale must be < inf, got inf", id="scale-inf"),
    pytest.param(dict(softmax_scale=math.nan), ValueError, r"softmax_scale must be a number, got nan", id="scale-nan"),
    pytest.param(dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a number, got str", id="scale-str"),
    pytest.param(dict(softcap=-1.0), ValueError, r"softcap must be >= 0, got -1\.0", id="softcap-negative"),
    pytest.param(dict(softcap=math.inf), ValueError, r"softcap must be < inf, got inf", id="softcap-inf"),
    pytest.param(dict(softcap=None), TypeError, r"softcap must be a number, got NoneType", id="softcap-none"),
    pytest.param(dict(dropout_p=-0.1), ValueError, r"dropout_p must be >= 0, got -0\.1", id="dropout-negative"),
    pytest.param(dict(dropout_p=1.0), ValueError, r"dropout_p must be < 1, got 1\.0", id="dropout-one"),
    pytest.param(dict(dropout_p=1.5), ValueError, r"dropout_p must be < 1, got 1\.5", id="dropout-over"),
    pytest.param(dict(backend="nope"), ValueError,
                 r"backend='nope': unknown backend; available backends for flash_attention on cpu: \['auto', 'torch'",
                 id="backend-unknown"),
    pytest.param(dict(backend=None), TypeError, r"backend must be a str.*got NoneType", id="backend-none"),
]


@pytest.mark.parametrize("overrides,error,pattern", BAD_INPUTS)
def test_bad_input_raises_naming_argument_and_value(overrides, error, pattern):
    with pytest.raises(error, match=pattern):
        _good(**overrides)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_unavailable_backend_lists_available_ones():
    with pytest.raises(ValueError, match=r"backend='cuda': backend cannot run flash_attention on cpu; "
                                         r"available backends for flash_attention on cpu: \['auto', 'torch'"):
        _good(backend="cuda")
    with pytest.raises(ValueError, match=r"backend='flash_attn'.*available backends .*\['auto', 'torch'"):
        _good(backend="flash_attn")


@pytest.mark.parametrize("overrides", [
    dict(), dict(max_seqlen=6), dict(max_seqlen=500), dict(softcap=0), dict(dropout_p=0), dict(softmax_scale=1),
    dict(softmax_scale=1e-6), dict(causal=True, softcap=50.0), dict(backend="torch"), dict(backend="auto"),
    dict(cu_seqlens=_cu([0, 0, 4, 4, 10, 10])),
])
def test_valid_edge_arguments_are_accepted(overrides):
    out = _good(**overrides)
    assert out.shape == (10, 4, 64) and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------------------
# 8. custom-op integration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_forward_and_backward(dropout):
    q, k, v, cu = rand_packed([3, 0, 9], 4, 2, 64, seed=80, requires_grad=True)
    p, seed = (0.2, torch.tensor([77])) if dropout else (0.0, None)
    args = (q, k, v, cu, 9, True, 0.125, 4.0, p, seed, "torch")
    torch.library.opcheck(FWD_OP.default, args)
    out, lse = FWD_OP(*args)
    dout = rand_like(out, 10)
    bargs = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 9, True, 0.125, 4.0, p, seed,
             "torch")
    torch.library.opcheck(BWD_OP.default, bargs)


def test_torch_compile_fullgraph_matches_eager():
    """A model-like function (packed, GQA, causal, softcap) compiled with inductor, fullgraph: same output
    and gradients as eager."""
    torch._dynamo.reset()
    lengths, hq, hkv, d = [11, 0, 20], 4, 2, 64
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=81, requires_grad=True)
    w = rand_like(torch.empty(d, d), 82) * 0.1

    def fn(q, k, v, cu):
        out = lf.flash_attention(q @ w, k, v, cu, 20, causal=True, softcap=5.0)
        return out.sum(dim=-1)

    compiled = torch.compile(fn, fullgraph=True, backend="inductor")
    out_c = compiled(q, k, v, cu)
    dout = rand_like(out_c, 11)
    grads_c = torch.autograd.grad(out_c, (q, k, v), dout)
    out_e = fn(q, k, v, cu)
    grads_e = torch.autograd.grad(out_e, (q, k, v), dout)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, atol=1e-5, rtol=1e-5)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# 9. property test
# ----------------------------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4),
       hkv=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 4, 8]), d=st.sampled_from([64, 80, 96, 128, 256]),
       causal=st.booleans(), softcap=st.sampled_from([0.0, 2.0, 30.0]),
       scale=st.one_of(st.none(), st.floats(0.01, 1.0)), seed=st.integers(0, 2**31 - 1))
def test_property_matches_oracle(lengths, hkv, ratio, d, causal, softcap, scale, seed):
    hq = hkv * ratio
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=seed, requires_grad=True)
    out = lf.flash_attention(q, k, v, cu, causal=causal, softmax_scale=scale, softcap=softcap)
    sm = default_scale(d, scale)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out_true, _ = oracle(q64, k64, v64, cu, causal=causal, scale=sm, softcap=softcap)
    assert out.shape == q.shape
    assert_close64(out, out_true, atol=2e-5, rtol=1e-5, what="out")
    if sum(lengths) > 0:
        dout = rand_like(out, seed % 1000)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        grads_true = torch.autograd.grad(out_true, (q64, k64, v64), dout.double())
        for name, g, g_true in zip("qkv", grads, grads_true):
            assert_close64(g, g_true, atol=5e-5, rtol=1e-4, what=f"d{name}")


# ----------------------------------------------------------------------------------------------------
# 10. GPU: every backend that runs on CUDA, at real sizes
# ----------------------------------------------------------------------------------------------------
GPU_LENGTHS = [1000, 7, 513, 0, 1200, 1, 800, 575]  # T = 4096, varlen with empty and length-1 sequences


def _cuda_backend_or_skip(backend):
    available = dispatch.available_backends("flash_attention", torch.device("cuda"))
    if backend not in available:
        pytest.skip(f"backend {backend!r} cannot run flash_attention on cuda here (available: {available})")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 0.0), (False, 30.0)])
def test_gpu_backend_within_bound_of_torch(backend, dtype, causal, softcap):
    _cuda_backend_or_skip(backend)
    hq, hkv, d = 32, 8, 128
    q, k, v, cu = rand_packed(GPU_LENGTHS, hq, hkv, d, dtype=dtype, seed=90, device="cuda")
    max_seqlen = max(GPU_LENGTHS)
    sm = d ** -0.5

    def truth(q64, k64, v64):  # the float64 reference, validated against the oracle above
        return attention(q64, k64, v64, cu, max_seqlen, causal, sm, softcap, 0.0, 0, compute_dtype=torch.float64)[0]

    check_error_bounds(q, k, v, cu, max_seqlen, causal=causal, scale=None, softcap=softcap, backend=backend,
                       truth=truth)
    # lse from the custom op, against the float64 reference's.
    _, lse = FWD_OP(q, k, v, cu, max_seqlen, causal, sm, softcap, 0.0, None, backend)
    _, lse_true = attention(q.double(), k.double(), v.double(), cu, max_seqlen, causal, sm, softcap, 0.0, 0,
                            compute_dtype=torch.float64)
    assert lse.shape == (hq, q.shape[0]) and lse.dtype == torch.float32
    torch.testing.assert_close(lse, lse_true, atol=1e-2, rtol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_gpu_backend_dense_gqa_and_head_dims(backend):
    _cuda_backend_or_skip(backend)
    for d, (hq, hkv) in [(64, (16, 16)), (80, (16, 2)), (96, (8, 1)), (256, (8, 4))]:
        batch, seqlen = 2, 512
        gen = torch.Generator().manual_seed(d)
        q = torch.randn(batch, seqlen, hq, d, generator=gen).to("cuda", torch.bfloat16)
        k = torch.randn(batch, seqlen, hkv, d, generator=gen).to("cuda", torch.bfloat16)
        v = torch.randn(batch, seqlen, hkv, d, generator=gen).to("cuda", torch.bfloat16)
        flat = [x.reshape(batch * seqlen, *x.shape[2:]) for x in (q, k, v)]
        cu = cu_from_lengths([seqlen] * batch, "cuda")

        def truth(q64, k64, v64):
            return attention(q64, k64, v64, cu, seqlen, True, d ** -0.5, 0.0, 0.0, 0,
                             compute_dtype=torch.float64)[0]

        check_error_bounds(*flat, cu, seqlen, causal=True, scale=None, softcap=0.0, backend=backend, truth=truth)
        dense = lf.flash_attention(q, k, v, causal=True, backend=backend)
        packed = lf.flash_attention(*flat, cu, seqlen, causal=True, backend=backend)
        assert dense.shape == q.shape
        torch.testing.assert_close(dense.reshape(packed.shape), packed, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", dispatch.BACKENDS)
def test_gpu_backend_dropout_and_empty_sequences(backend):
    _cuda_backend_or_skip(backend)
    # Kernels may round products to tf32 / accumulate differently: a looser, still mask-sensitive check.
    directional_derivative_check(backend, device="cuda", eps=5e-2, rtol=2e-2)
    q, k, v, cu = rand_packed([0, 3, 0, 1, 300, 0], 8, 2, 128, dtype=torch.bfloat16, seed=91, device="cuda",
                              requires_grad=True)
    for p in (0.0, 0.2):
        out = lf.flash_attention(q, k, v, cu, causal=True, dropout_p=p, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), rand_like(out, 12))
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    empty = rand_packed([0, 0], 8, 2, 128, dtype=torch.bfloat16, seed=92, device="cuda")
    assert lf.flash_attention(*empty, backend=backend).shape == (0, 8, 128)


@pytest.mark.gpu
def test_gpu_cu_seqlens_on_wrong_device_is_rejected():
    q, k, v, cu = rand_packed([4, 6], 4, 2, 64, seed=93, device="cuda")
    with pytest.raises(ValueError, match=re.escape("cu_seqlens must be on the same device as the inputs (cuda:0), "
                                                   "got cpu")):
        lf.flash_attention(q, k, v, cu.cpu())
