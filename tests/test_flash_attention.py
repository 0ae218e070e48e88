"""Tests of ``llm2vec_fast.flash_attention``: its torch reference, the public op, and every backend.

The ground truth is ``oracle`` below: a float64 loop over sequences and heads that spells out the
definition (softcap, causal mask, softmax, explicit GQA index ``h // (Hq / Hkv)``). Everything else is
checked against it, directly or through the reference that it validates:

* the reference (``llm2vec_fast.reference.attention``) in float64 matches the oracle to rounding;
* the public op (forward, lse, backward) matches the oracle in float32;
* in fp16 / bf16 the op's error is within 2x (forward) / 3x (gradients) of PyTorch's own error when it
  computes in that dtype (flash-attention's test criterion);
* dropout, zero-length sequences, batch invariance, every validation error, the custom-op
  registration (opcheck, torch.compile), a hypothesis property test, and GPU backends at real sizes;
* the triton backend against the same oracle and reference, on the CPU through Triton's interpreter
  (``TRITON_INTERPRET=1``, as ``make test`` runs; skipped without it unless a GPU is present): parity
  by the same criterion (fp32: the fp32 reference to fp32 rounding), its philox dropout mask replayed
  exactly by the reference, bitwise batch invariance, empty sequences, errors and opcheck.
"""
from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
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


def oracle(q, k, v, cu_seqlens, *, causal, scale, softcap, keep=None, dropout_p=0.0, window=None):
    """float64 attention by definition, one (sequence, head) at a time; ``window`` w: key j of query i
    only where |i - j| < w.

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
            if window is not None:
                far = torch.ones(n, n, dtype=torch.bool, device=q.device).triu(window) | \
                    torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-window)
                logits = logits.masked_fill(far, float("-inf"))
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
                       fwd_factor=2.0, bwd_factor=3.0, fwd_atol=1e-5, bwd_atol=1e-4, call=None, window=None,
                       with_lse=False):
    """flash-attention's criterion for low precision.

    |ours - truth| <= fwd_factor * |torch in the same dtype - truth| + fwd_atol, and bwd_factor for the
    gradients, with "torch in the same dtype" = the reference with ``compute_dtype=None`` (autograd).
    ``truth(q, k, v) -> out`` is a float64 differentiable function of the float64 copies of the inputs.
    ``call(q, k, v) -> out`` (packed), when given, replaces the packed ``flash_attention`` call under test
    (e.g. to go through the dense layout). ``with_lse``: ``truth`` and ``call`` return (out, lse), ours
    runs with ``return_lse=True``, the loss weighs lse too (random weights) and lse is bounded like out.
    """
    dout = rand_like(q, seed=99)
    q64, k64, v64 = (x.detach().to(torch.float64).requires_grad_(True) for x in (q, k, v))
    true = truth(q64, k64, v64)
    out_true, lse_true = true if with_lse else (true, None)
    dlse = rand_like(lse_true, seed=98).float() if with_lse else None

    def loss(out, lse):  # <out, dout> (+ <lse, dlse>) in float64
        value = (out.to(torch.float64) * dout.to(torch.float64)).sum()
        return value + (lse.to(torch.float64) * dlse.to(torch.float64)).sum() if with_lse else value

    grads_true = torch.autograd.grad(loss(out_true, lse_true), (q64, k64, v64))

    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    if call is None:
        result = lf.flash_attention(*leaves, cu, max_seqlen, causal=causal, softmax_scale=scale, softcap=softcap,
                                    sliding_window=window, return_lse=with_lse, backend=backend)
    else:
        result = call(*leaves)
    out, lse = result if with_lse else (result, None)
    grads = torch.autograd.grad(loss(out, lse), leaves)
    assert out.dtype == q.dtype and out.shape == q.shape
    for g, x in zip(grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape

    base_leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    base_out, base_lse = attention(*base_leaves, cu, max_seqlen, causal, default_scale(q.shape[-1], scale), softcap,
                                   0.0, 0, window or 0, compute_dtype=None)
    base_grads = torch.autograd.grad(loss(base_out, base_lse), base_leaves)

    report = []
    checks = [("lse", lse, base_lse, lse_true, fwd_factor, fwd_atol)] if with_lse else []
    for name, ours, base, true, factor, atol in checks + [
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
    # non-causal, uncapped GQA: on the CPU the G query heads of a K/V head run as one folded query
    pytest.param(ODD_LENGTHS, 8, 2, 64, False, 0.0, None, id="gqa4-d64-folded"),
    pytest.param([17, 0, 1, 113], 6, 3, 80, False, 0.0, 0.3, id="gqa2-d80-folded-empty"),
    pytest.param([113, 1, 17], 8, 1, 128, False, 0.0, None, id="mqa8-d128-folded"),
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
    """The custom op returns lse as an output. Without lse_grad it is marked non-differentiable (a loss
    cannot use it by mistake); with lse_grad a loss that uses it gets the true gradient d lse / d q."""
    q, k, v, cu = rand_packed([5, 12], 4, 2, 64, seed=31, requires_grad=True)
    sm = 0.125
    _, lse = FWD_OP(q, k, v, cu, 12, False, sm, 0.0, 0.0, None, "torch")
    assert not lse.requires_grad
    _, lse = FWD_OP(q, k, v, cu, 12, False, sm, 0.0, 0.0, None, "torch", 0, True)
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
    pytest.param([17, 113, 0, 1], 8, 2, 64, False, 0.0, None, id="gqa4-folded"),
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


def directional_derivative_check(backend, device="cpu", dtype=torch.float32, eps=1e-2, rtol=2e-3, with_lse=False):
    """Backend-agnostic: with the RNG re-seeded before each call (same mask), the gradient's directional
    derivative matches central differences. A backward with any other mask would be far off. ``with_lse``:
    the loss weighs the lse output too (its gradient under dropout: lse is taken before dropout)."""
    lengths, hq, hkv, d, p = [24, 0, 9], 4, 2, 64, 0.3
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=43, device=device, dtype=dtype, requires_grad=True)
    dout = rand_like(q, 7)
    dlse = rand_like(torch.empty(hq, q.shape[0], device=device), 8) * 10 if with_lse else None

    def loss(qq, kk, vv):
        torch.manual_seed(2024)
        out = lf.flash_attention(qq, kk, vv, cu, dropout_p=p, causal=True, return_lse=with_lse, backend=backend)
        if with_lse:
            out, lse = out
            return (out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()
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


@pytest.mark.parametrize("with_lse", [False, True])
def test_dropout_backward_is_derivative_of_forward(with_lse):
    directional_derivative_check("auto", with_lse=with_lse)


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
    pytest.param(dict(cu_seqlens=_cu([0, 4, 10]).to_sparse()), TypeError,
                 r"cu_seqlens must be a dense \(strided\) tensor, got a torch\.sparse_coo one", id="cu-sparse"),
    pytest.param(dict(q=_t(10, 4, 64).to_sparse()), TypeError,
                 r"q must be a dense \(strided\) tensor, got a torch\.sparse_coo one", id="q-sparse"),
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
    pytest.param(dict(softmax_scale=math.inf), ValueError, r"softmax_scale must be <= 3\.4\d*e\+38, got inf",
                 id="scale-inf"),
    pytest.param(dict(softmax_scale=1e39), ValueError, r"softmax_scale must be <= 3\.4\d*e\+38, got 1e\+39",
                 id="scale-over-float32"),
    pytest.param(dict(softmax_scale=10 ** 400), ValueError, r"softmax_scale must fit a float, got an int of 401 digits",
                 id="scale-huge-int"),
    pytest.param(dict(softmax_scale=math.nan), ValueError, r"softmax_scale must be a number, got nan", id="scale-nan"),
    pytest.param(dict(softmax_scale="0.1"), TypeError, r"softmax_scale must be a number, got str", id="scale-str"),
    pytest.param(dict(softcap=-1.0), ValueError, r"softcap must be >= 0, got -1\.0", id="softcap-negative"),
    pytest.param(dict(softcap=math.inf), ValueError, r"softcap must be <= 3\.4\d*e\+38, got inf", id="softcap-inf"),
    pytest.param(dict(softcap=None), TypeError, r"softcap must be a number, got NoneType", id="softcap-none"),
    # below float32's normal range it is 0 in the kernels, which divide by it: NaN where a logit is 0
    pytest.param(dict(softcap=1e-50), ValueError, r"softcap must be 0 \(no cap\) or >= 1\.17\d*e-38 \(float32's "
                 r"smallest normal\), got 1e-50", id="softcap-below-float32"),
    pytest.param(dict(dropout_p=-0.1), ValueError, r"dropout_p must be >= 0, got -0\.1", id="dropout-negative"),
    pytest.param(dict(dropout_p=1.0), ValueError, r"dropout_p must be < 1, got 1\.0", id="dropout-one"),
    pytest.param(dict(dropout_p=1.5), ValueError, r"dropout_p must be < 1, got 1\.5", id="dropout-over"),
    pytest.param(dict(sliding_window=0), ValueError, r"sliding_window must be >= 1, got 0", id="window-zero"),
    pytest.param(dict(sliding_window=-4), ValueError, r"sliding_window must be >= 1, got -4", id="window-negative"),
    pytest.param(dict(sliding_window=2.5), TypeError, r"sliding_window must be an int, got float", id="window-float"),
    pytest.param(dict(sliding_window=True), TypeError, r"sliding_window must be an int, got bool", id="window-bool"),
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
    dict(softmax_scale=1e-6), dict(causal=True, softcap=50.0), dict(softcap=1.2e-38), dict(backend="torch"),
    dict(backend="auto"),
    dict(cu_seqlens=_cu([0, 0, 4, 4, 10, 10])),
])
def test_valid_edge_arguments_are_accepted(overrides):
    out = _good(**overrides)
    assert out.shape == (10, 4, 64) and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not dispatch.triton_interpreting(), reason="the CPU runs triton only in the interpreter"))])
def test_strided_cu_seqlens_and_a_loose_max_seqlen(backend):
    """cu_seqlens as every other element of a buffer (valid values, stride 2: the triton kernels read it as one
    int32 after another and gave garbage), and a max_seqlen far above the longest sequence (a bound, as
    flash-attn takes it: the torch backend sized (B, H, max_seqlen^2) scores by it) give the exact call's
    output and gradients."""
    q, k, v, cu = rand_packed([4, 6, 1], 4, 2, 64, seed=71, requires_grad=True)
    strided = torch.stack([cu, torch.full_like(cu, 99)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and strided.tolist() == cu.tolist()
    grad = rand_like(q, 72)
    want = lf.flash_attention(q, k, v, cu, backend=backend)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    for cu_given, max_seqlen in ((strided, None), (cu, 2 ** 40), (strided, 10 ** 6)):
        got = lf.flash_attention(q, k, v, cu_given, max_seqlen, backend=backend)
        assert torch.equal(got, want), max_seqlen
        for g, w in zip(torch.autograd.grad(got, (q, k, v), grad), want_grads):
            assert torch.equal(g, w), max_seqlen


def test_cu_seqlens_refilled_in_place_without_a_new_version_is_read_again():
    """A CPU cu_seqlens refilled through numpy (no version bump) and an inference tensor refilled inside
    inference_mode (no version counter) are checked and read with their new values: a remembered check would
    have run the old bounds (wrong rows on triton, a crash deep in torch) or let invalid values through."""
    q, k, v, _ = rand_packed([4, 6], 4, 2, 64, seed=73)
    buffer = np.array([0, 4, 10], dtype=np.int32)
    shared = torch.from_numpy(buffer)
    first = lf.flash_attention(q, k, v, shared)
    buffer[1] = 7
    torch.testing.assert_close(lf.flash_attention(q, k, v, shared), lf.flash_attention(q, k, v, _cu([0, 7, 10])),
                               atol=0, rtol=0)
    assert not torch.equal(first, lf.flash_attention(q, k, v, shared))
    buffer[1] = 11
    with pytest.raises(ValueError, match="non-decreasing"):
        lf.flash_attention(q, k, v, shared)
    with torch.inference_mode():
        frozen = _cu([0, 4, 10])
        lf.flash_attention(q, k, v, frozen)
        frozen.copy_(_cu([0, 9, 10]))
        torch.testing.assert_close(lf.flash_attention(q, k, v, frozen), lf.flash_attention(q, k, v, _cu([0, 9, 10])),
                                   atol=0, rtol=0)
        frozen.copy_(_cu([0, 12, 10]))
        with pytest.raises(ValueError, match="non-decreasing"):
            lf.flash_attention(q, k, v, frozen)


# ----------------------------------------------------------------------------------------------------
# 8. custom-op integration: opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dropout", [False, True])
def test_opcheck_forward_and_backward(dropout):
    q, k, v, cu = rand_packed([3, 0, 9], 4, 2, 64, seed=80, requires_grad=True)
    p, seed = (0.2, torch.tensor([77])) if dropout else (0.0, None)
    window = 4 if dropout else 0  # the window argument too, once; and a differentiable lse with its gradient
    args = (q, k, v, cu, 9, True, 0.125, 4.0, p, seed, "torch", window, dropout)
    torch.library.opcheck(FWD_OP.default, args)
    out, lse = FWD_OP(*args)
    dout = rand_like(out, 10)
    bargs = (dout, q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 9, True, 0.125, 4.0, p, seed,
             "torch", window, rand_like(lse, 11) if dropout else None)
    torch.library.opcheck(BWD_OP.default, bargs)


@pytest.mark.parametrize("window", [None, 6])
def test_torch_compile_fullgraph_matches_eager(window):
    """A model-like function (packed, GQA, causal, softcap, with and without a sliding window; the second
    also uses the lse output) compiled with inductor, fullgraph: same output and gradients as eager."""
    torch._dynamo.reset()
    lengths, hq, hkv, d = [11, 0, 20], 4, 2, 64
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=81, requires_grad=True)
    w = rand_like(torch.empty(d, d), 82) * 0.1

    def fn(q, k, v, cu):
        if window is None:
            out = lf.flash_attention(q @ w, k, v, cu, 20, causal=True, softcap=5.0)
            return out.sum(dim=-1)
        out, lse = lf.flash_attention(q @ w, k, v, cu, 20, causal=True, softcap=5.0, sliding_window=window,
                                      return_lse=True)
        return out.sum(dim=-1) + lse.t()

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
       scale=st.one_of(st.none(), st.floats(0.01, 1.0)), window=st.one_of(st.none(), st.integers(1, 45)),
       seed=st.integers(0, 2**31 - 1))
def test_property_matches_oracle(lengths, hkv, ratio, d, causal, softcap, scale, window, seed):
    hq = hkv * ratio
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=seed, requires_grad=True)
    out = lf.flash_attention(q, k, v, cu, causal=causal, softmax_scale=scale, softcap=softcap, sliding_window=window)
    sm = default_scale(d, scale)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out_true, _ = oracle(q64, k64, v64, cu, causal=causal, scale=sm, softcap=softcap, window=window)
    assert out.shape == q.shape
    assert_close64(out, out_true, atol=2e-5, rtol=1e-5, what="out")
    if sum(lengths) > 0:
        dout = rand_like(out, seed % 1000)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        grads_true = torch.autograd.grad(out_true, (q64, k64, v64), dout.double())
        for name, g, g_true in zip("qkv", grads, grads_true):
            # fp32 rounding grows with the gradients' size (a sharp softmax at scale ~1 gives entries ~30)
            atol = 5e-5 * max(1.0, float(g_true.abs().max()))
            assert_close64(g, g_true, atol=atol, rtol=1e-4, what=f"d{name}")


# ----------------------------------------------------------------------------------------------------
# 10. the triton backend against the reference: on the CPU through Triton's interpreter
#     (TRITON_INTERPRET=1, as `make test` and CI run), or on a CUDA GPU
# ----------------------------------------------------------------------------------------------------
def _triton_skip_reason():
    """Why the triton tests cannot run here, or None. The one place that decides it."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if dispatch.triton_interpreting() or torch.cuda.is_available():
        return None
    return ("the triton backend runs on the CPU only with TRITON_INTERPRET=1 (set before triton is imported; "
            "`make test` sets it) and there is no CUDA GPU: run TRITON_INTERPRET=1 python -m pytest tests")


TRITON_SKIP_REASON = _triton_skip_reason()
needs_triton = pytest.mark.skipif(TRITON_SKIP_REASON is not None, reason=str(TRITON_SKIP_REASON))
# The interpreter runs the kernels on CPU tensors; without it they need CUDA tensors.
TRITON_DEVICE = "cpu" if dispatch.triton_interpreting() else "cuda"


@pytest.fixture
def kfa():
    """The triton kernels module (imported lazily: triton decides at import whether it interprets)."""
    from llm2vec_fast.kernels import flash_attention as module
    return module


def triton_packed(lengths, hq, hkv, d, *, dtype=torch.float32, seed=0, requires_grad=False):
    return rand_packed(lengths, hq, hkv, d, dtype=dtype, seed=seed, device=TRITON_DEVICE,
                       requires_grad=requires_grad)


def triton_run(q, k, v, cu, max_seqlen=None, dout=None, **options):
    """flash_attention(backend="triton") on fresh leaves: (out, (dq, dk, dv) or None)."""
    leaves = [x.detach().clone().requires_grad_(dout is not None) for x in (q, k, v)]
    out = lf.flash_attention(*leaves, cu, max_seqlen, backend="triton", **options)
    if dout is None:
        return out.detach(), None
    return out.detach(), torch.autograd.grad(out, leaves, dout)


def reference_run(q, k, v, cu, max_seqlen, dout, *, causal, scale, softcap, dropout_p=0.0, mask=None,
                  compute_dtype=torch.float32, window=0):
    """The torch reference (autograd) on fresh leaves, optionally replaying a kernel's dropout mask."""
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = attention(*leaves, cu, max_seqlen, causal, scale, softcap, dropout_p, 0, window,
                         compute_dtype=compute_dtype, dropout_mask=mask)
    return out.detach(), lse, torch.autograd.grad(out, leaves, dout)


# fp32: the kernels take full-fp32 ("ieee") products, so they agree with the fp32 reference to fp32
# rounding. tf32 products (10-bit mantissa) would miss these bounds by about two orders of magnitude.
FP32_OUT_TOL = dict(atol=1e-5, rtol=1e-5)
FP32_GRAD_TOL = dict(atol=5e-5, rtol=1e-4)

TRITON_ODD = [1, 17, 0, 113, 203]  # odd lengths and an empty sequence
TRITON_MIXED = [1, 203, 1, 0, 1, 1]  # one long sequence among length-1 ones and an empty one

# (dtype, lengths, Hq, Hkv, D, causal, softcap, softmax_scale). A covering design rather than a cross
# product (the interpreter takes seconds per case): each dtype on the odd-length pack, each head dim
# once (256 also in fp32, whose GPU configs differ), each GQA ratio (1, 2, 4, 8) once, and causal,
# softcap and a custom scale each on and off.
TRITON_CASES = [
    pytest.param(torch.float16, TRITON_ODD, 2, 2, 64, False, 0.0, None, id="fp16-odd-mha-d64"),
    pytest.param(torch.bfloat16, TRITON_ODD, 2, 1, 128, True, 0.0, None, id="bf16-odd-gqa2-d128-causal"),
    pytest.param(torch.float32, TRITON_ODD, 1, 1, 80, False, 30.0, 0.3, id="fp32-odd-d80-cap30-scale"),
    pytest.param(torch.bfloat16, [1, 40, 0, 17, 1], 8, 1, 96, False, 2.0, None, id="bf16-gqa8-d96-cap2"),
    pytest.param(torch.float16, TRITON_MIXED, 4, 1, 256, True, 5.0, 0.05, id="fp16-mixed-gqa4-d256-causal-cap5"),
    pytest.param(torch.float32, [1, 50, 0, 3], 2, 1, 256, True, 0.0, None, id="fp32-gqa2-d256-causal"),
]


@needs_triton
@pytest.mark.parametrize("dtype,lengths,hq,hkv,d,causal,softcap,scale", TRITON_CASES)
def test_triton_matches_reference(dtype, lengths, hq, hkv, d, causal, softcap, scale):
    """fp16/bf16: within 2x (out) / 3x (grads) of PyTorch's own error in that dtype, against the float64
    oracle; fp32: the fp32 reference to fp32 rounding. lse against the oracle's."""
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, dtype=dtype, seed=100 + d)
    max_seqlen, sm = max(lengths), default_scale(d, scale)
    lses = []

    def custom_op(qq, kk, vv):  # the custom op itself, to read its lse from the same call
        out, lse = FWD_OP(qq, kk, vv, cu, max_seqlen, causal, sm, softcap, 0.0, None, "triton")
        lses.append(lse)
        return out

    if dtype == torch.float32:
        dout = rand_like(q, 99)
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out = custom_op(*leaves)
        grads = torch.autograd.grad(out, leaves, dout)
        out_ref, _, grads_ref = reference_run(q, k, v, cu, max_seqlen, dout, causal=causal, scale=sm, softcap=softcap)
        assert out.dtype == dtype and out.shape == q.shape
        assert_close64(out, out_ref, **FP32_OUT_TOL, what="triton fp32 out")
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            assert g.dtype == dtype and g.shape == g_ref.shape and g_ref.abs().max() > 1e-3
            assert_close64(g, g_ref, **FP32_GRAD_TOL, what=f"triton fp32 d{name}")
    else:
        def truth(q64, k64, v64):
            return oracle(q64, k64, v64, cu, causal=causal, scale=sm, softcap=softcap)[0]

        check_error_bounds(q, k, v, cu, max_seqlen, causal=causal, scale=scale, softcap=softcap, backend="triton",
                           truth=truth, call=custom_op)
    _, lse_true = oracle(q, k, v, cu, causal=causal, scale=sm, softcap=softcap)
    assert lses[0].shape == (hq, q.shape[0]) and lses[0].dtype == torch.float32
    assert_close64(lses[0], lse_true, atol=2e-5, rtol=1e-5, what="triton lse")


@needs_triton
def test_triton_dense_layout():
    """Dense (B, S, H, D) through the triton backend: within the bf16 bound, and bitwise the packed result."""
    batch, seqlen, hq, hkv, d, scale = 3, 37, 2, 1, 64, 0.2
    q, k, v, cu = triton_packed([seqlen] * batch, hq, hkv, d, dtype=torch.bfloat16, seed=110)

    def dense(qq, kk, vv):
        q4, k4, v4 = (x.view(batch, seqlen, *x.shape[1:]) for x in (qq, kk, vv))
        out = lf.flash_attention(q4, k4, v4, causal=True, softmax_scale=scale, backend="triton")
        assert out.shape == q4.shape
        return out.reshape(qq.shape)

    def truth(q64, k64, v64):
        return oracle(q64, k64, v64, cu, causal=True, scale=scale, softcap=0.0)[0]

    check_error_bounds(q, k, v, cu, seqlen, causal=True, scale=scale, softcap=0.0, backend="triton", truth=truth,
                       call=dense)
    with torch.no_grad():
        packed, _ = triton_run(q, k, v, cu, seqlen, causal=True, softmax_scale=scale)
        assert torch.equal(dense(q, k, v), packed)


# ---- dropout ----
def _valid_pairs(cu, max_seqlen):
    """(T, max_seqlen) bool: key j exists in query token t's sequence."""
    lengths = (cu[1:] - cu[:-1]).long()
    per_token = torch.repeat_interleave(lengths, lengths)
    return torch.arange(max_seqlen, device=cu.device)[None, :] < per_token[:, None]


@needs_triton
def test_triton_dropout_mask_statistics(kfa):
    """The philox keep mask: rate 1 - p over the valid (row, key) pairs, deterministic in the seed,
    independent across heads, and different for another seed."""
    lengths, hq, n = [1, 17, 0, 77], 2, 77
    cu = cu_from_lengths(lengths, TRITON_DEVICE)
    valid = _valid_pairs(cu, n)
    for p, seed in ((0.2, 5), (0.5, 2**62 - 3)):
        mask = kfa.dropout_mask(cu, n, hq, p, seed)
        assert mask.shape == (hq, sum(lengths), n) and mask.dtype == torch.bool
        kept = mask[:, valid]  # (hq, number of valid pairs)
        fraction = kept.double().mean().item()
        assert abs(fraction - (1 - p)) < 6 * math.sqrt(p * (1 - p) / kept.numel()), (p, fraction)
        # Heads draw independent masks: two heads agree with probability p^2 + (1-p)^2.
        agree = (kept[0] == kept[1]).double().mean().item()
        expected = p * p + (1 - p) ** 2
        assert abs(agree - expected) < 6 * math.sqrt(expected * (1 - expected) / kept.shape[1]), (p, agree)
        # Rows of a sequence draw different masks (not one mask broadcast over rows).
        assert not torch.equal(mask[0, 20, :n], mask[0, 21, :n])
    assert torch.equal(kfa.dropout_mask(cu, n, hq, 0.5, 2**62 - 3), mask)
    other = kfa.dropout_mask(cu, n, hq, 0.5, 2**62 - 4)
    assert (other[:, valid] != kept).double().mean().item() > 0.4


@needs_triton
@pytest.mark.parametrize("causal,softcap,p,seed", [(False, 0.0, 0.3, 7), (True, 5.0, 0.6, 2**62 - 11)],
                         ids=["p0.3-small-seed", "causal-cap5-p0.6-large-seed"])
def test_triton_dropout_replays_kernel_mask_exactly(kfa, causal, softcap, p, seed):
    """The custom op with an explicit seed: forward, lse and gradients equal the fp32 reference given the
    mask that dropout_mask() returns for that seed, so forward and backward draw that very mask."""
    lengths, hq, hkv, d, scale = [40, 0, 1, 23], 4, 2, 64, 0.2
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, seed=120, requires_grad=True)
    out, lse = FWD_OP(q, k, v, cu, 40, causal, scale, softcap, p, torch.tensor([seed]), "triton")
    dout = rand_like(out, 121)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    mask = kfa.dropout_mask(cu, 40, hq, p, seed)
    out_ref, lse_ref, grads_ref = reference_run(q, k, v, cu, 40, dout, causal=causal, scale=scale, softcap=softcap,
                                                dropout_p=p, mask=mask)
    assert_close64(out, out_ref, **FP32_OUT_TOL, what="dropout out")
    assert_close64(lse, lse_ref, atol=1e-5, rtol=1e-5, what="dropout lse")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close64(g, g_ref, **FP32_GRAD_TOL, what=f"dropout d{name}")
    # Not vacuous: dropout acted, and the next seed's mask gives another output.
    no_drop, _ = attention(q.detach(), k.detach(), v.detach(), cu, 40, causal, scale, softcap, 0.0, 0)
    assert max_err(out, no_drop) > 1e-2
    other, _, _ = reference_run(q, k, v, cu, 40, dout, causal=causal, scale=scale, softcap=softcap, dropout_p=p,
                                mask=kfa.dropout_mask(cu, 40, hq, p, seed + 1))
    assert max_err(out, other) > 1e-2


@needs_triton
def test_triton_public_op_dropout_backward_uses_forward_seed(kfa, monkeypatch):
    """Through the public op: the seed it draws from torch.randint (captured here) gives the mask that
    both the forward and the backward used; re-seeding torch reproduces the output bitwise."""
    drawn = []
    original = torch.randint

    def recording(*args, **kwargs):
        value = original(*args, **kwargs)
        drawn.append(int(value.item()))
        return value

    monkeypatch.setattr(torch, "randint", recording)
    lengths, hq, hkv, d, p = [21, 4, 0], 4, 1, 80, 0.4
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, seed=130)
    dout = rand_like(q, 131)
    torch.manual_seed(7)
    out, grads = triton_run(q, k, v, cu, dout=dout, dropout_p=p, softcap=10.0)
    assert len(drawn) == 1, drawn
    mask = kfa.dropout_mask(cu, 21, hq, p, drawn[0])
    out_ref, _, grads_ref = reference_run(q, k, v, cu, 21, dout, causal=False, scale=d ** -0.5, softcap=10.0,
                                          dropout_p=p, mask=mask)
    assert_close64(out, out_ref, **FP32_OUT_TOL, what="public op dropout out")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close64(g, g_ref, **FP32_GRAD_TOL, what=f"public op dropout d{name}")
    torch.manual_seed(7)
    again, _ = triton_run(q, k, v, cu, dropout_p=p, softcap=10.0)
    assert torch.equal(again, out) and drawn[1] == drawn[0]


@needs_triton
@pytest.mark.parametrize("with_lse", [False, True])
def test_triton_dropout_backward_is_derivative_of_forward(with_lse):
    """Central differences of the public op, re-seeded before each call, match its gradient."""
    directional_derivative_check("triton", device=TRITON_DEVICE, with_lse=with_lse)


@needs_triton
def test_triton_dropout_is_unbiased():
    """E[out with dropout] = out without. 16 copies of one sequence in a pack draw independent masks (the
    counter holds the query token), so 3 seeds give 48 draws: their mean is ~1/7 as far off as one draw."""
    n, copies, hq, hkv, d, scale = 17, 16, 2, 1, 64, 0.05
    one = triton_packed([n], hq, hkv, d, seed=140)[:3]
    q, k, v = (x.repeat(copies, 1, 1) for x in one)
    cu = cu_from_lengths([n] * copies, TRITON_DEVICE)
    plain, _ = FWD_OP(*one, cu[:2], n, False, scale, 0.0, 0.0, None, "triton")
    draws = torch.cat([FWD_OP(q, k, v, cu, n, False, scale, 0.0, 0.3, torch.tensor([seed]), "triton")[0]
                       .view(copies, n, hq, d) for seed in (1, 2, 2**40 + 5)])
    assert torch.isfinite(draws).all()
    single_err = (draws - plain).abs().mean().item()
    mean_err = (draws.mean(0) - plain).abs().mean().item()
    assert single_err > 0.05
    assert mean_err < 0.25 * single_err, (mean_err, single_err)  # expected about 0.14 * single_err


# ---- batch invariance ----
def run_in_pack(mine, before, after, *, max_seqlen=None, my_dout=None, **options):
    """flash_attention(backend="triton") on one sequence ``mine`` = (q, k, v) packed between random
    sequences of lengths ``before`` and ``after``: its rows of out, and of dq, dk, dv when ``my_dout``
    (its rows of the output gradient) is given."""
    q_mine = mine[0]
    hq, hkv, d = q_mine.shape[1], mine[1].shape[1], q_mine.shape[2]
    n = q_mine.shape[0]
    parts = []
    for lengths, seed in ((before, 1), (None, None), (after, 2)):
        if lengths is None:
            parts.append(mine)
        elif sum(lengths):
            parts.append(rand_packed(lengths, hq, hkv, d, dtype=q_mine.dtype, seed=seed, device=q_mine.device)[:3])
    q, k, v = (torch.cat([p[i] for p in parts]) for i in range(3))
    cu = cu_from_lengths(list(before) + [n] + list(after), q.device)
    start = sum(before)
    dout = None
    if my_dout is not None:
        dout = rand_like(q, 3)
        dout[start:start + n] = my_dout
    out, grads = triton_run(q, k, v, cu, max_seqlen, dout, **options)
    return [x[start:start + n] for x in (out, *(grads or ()))]


@needs_triton
@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 2.0)])
def test_triton_batch_invariance_bitwise(kfa, causal, softcap):
    """A sequence's output is bitwise the same whichever sequences share its pack, wherever it sits, and
    whatever the pack's max_seqlen (the kernels tile each sequence from its own start). So are its
    gradients while the autotune key (the max_seqlen bucket) is the same; the interpreter has one config."""
    hq, hkv, d, n = 2, 1, 64, 70  # 70 tokens: a partial last tile
    dtype = torch.bfloat16
    mine = [rand_like(torch.empty(n, h, d, device=TRITON_DEVICE, dtype=dtype), 150 + i)
            for i, h in enumerate((hq, hkv, hkv))]
    my_dout = rand_like(mine[0], 153)
    alone = run_in_pack(mine, [], [], my_dout=my_dout, causal=causal, softcap=softcap)
    for before, after, max_seqlen in [([5], [], None), ([], [0, 97], None), ([1, 0, 33], [2, 0], 300),
                                      ([0] * 3, [1] * 5, None)]:
        got = run_in_pack(mine, before, after, max_seqlen=max_seqlen, my_dout=my_dout, causal=causal,
                          softcap=softcap)
        same_key = kfa._seqlen_bucket(max_seqlen or max(before + [n] + after)) == kfa._seqlen_bucket(n)
        checked = ("out", "dq", "dk", "dv") if dispatch.triton_interpreting() or same_key else ("out",)
        for name, x, y in zip(checked, got, alone):
            assert torch.equal(x, y), (name, before, after, max_seqlen, max_err(x, y))


@needs_triton
@pytest.mark.parametrize("causal,window,sign", [(False, None, -1.0), (True, None, -1.0), (False, 6, -1.0),
                                                (False, 6, 1.0)])
def test_triton_extreme_scores_stay_finite_and_accurate(causal, window, sign):
    """Every real score near -110 (or +110), so each row's lse is too. Near -110: the dK/dV kernel
    recomputes P without a key-padding mask, and for the padding keys of a partial tile exp(0 - lse)
    overflows to inf. Those rows are never stored; the stored gradients must stay finite and close to float64. With a window
    smaller than the block, rows whose window starts past the first tile keep a running max of -inf
    until they see a key (a max of 0 there made every later exp2(-160) underflow: zero outputs).
    Bound: 3x the fp32 reference's error plus 2e-3 of the largest value, the precision of recomputing P
    as exp2(s - lse) with s and lse near -160 (fp32 spacing there 1.5e-5, amplified through dQ = dS K
    with |K| = 30 where dS nearly cancels)."""
    lengths, hq, hkv, d = [17, 5, 40], 2, 1, 64
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, seed=7)
    direction = torch.nn.functional.normalize(rand_like(torch.empty(d, device=TRITON_DEVICE), 8), dim=0)
    k = 30.0 * direction + 0.1 * k  # all keys along one direction, all queries against it: q.k ~ -900
    q = sign * 30.0 * direction + 0.1 * q  # (sign +1: scores near +110, which only the running max keeps finite)
    dout = rand_like(q, 9)
    out, grads = triton_run(q, k, v, cu, max(lengths), dout, causal=causal, sliding_window=window)
    runs = {dtype: reference_run(*(x.to(dtype) for x in (q, k, v)), cu, max(lengths), dout.to(dtype), causal=causal,
                                 scale=d ** -0.5, softcap=0.0, window=window or 0, compute_dtype=dtype)
            for dtype in (torch.float32, torch.float64)}
    assert (runs[torch.float64][1].abs() > 90).all()  # the premise: exp(-lse) or exp(s) overflows fp32
    for name, got, ref32, ref64 in zip(["out", "dq", "dk", "dv"], [out, *grads], [runs[torch.float32][0],
                                       *runs[torch.float32][2]], [runs[torch.float64][0], *runs[torch.float64][2]]):
        assert torch.isfinite(got).all(), name
        bound = 3 * max_err(ref32, ref64) + 2e-3 * ref64.abs().max().item()
        assert max_err(got, ref64) <= bound, (name, max_err(got, ref64), bound)


# ---- empty, length-1 and T = 0 ----
@needs_triton
@pytest.mark.parametrize("causal,softcap,dropout_p", [(False, 0.0, 0.0), (True, 2.0, 0.3)])
def test_triton_zero_length_sequences(causal, softcap, dropout_p):
    lengths, hq, hkv, d = [0, 5, 0, 0, 1, 9, 0], 4, 2, 64
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, seed=160)
    out, grads = triton_run(q, k, v, cu, dout=rand_like(q, 161), causal=causal, softcap=softcap,
                            dropout_p=dropout_p)
    assert out.shape == q.shape and torch.isfinite(out).all()
    for g, x in zip(grads, (q, k, v)):
        assert g.shape == x.shape and torch.isfinite(g).all()
    _, lse = FWD_OP(q, k, v, cu, 9, causal, d ** -0.5, softcap, 0.0, None, "triton")
    assert torch.isfinite(lse).all()
    if dropout_p == 0:
        out_true, _ = oracle(q, k, v, cu, causal=causal, scale=d ** -0.5, softcap=softcap)
        assert_close64(out, out_true, atol=2e-5, rtol=1e-5, what="out")


@needs_triton
@pytest.mark.parametrize("lengths,max_seqlen", [([0], None), ([0, 0, 0], 0), ([0], 4)])
def test_triton_all_zero_length_batch(lengths, max_seqlen):
    q, k, v, cu = triton_packed(lengths, 4, 2, 64, seed=162)
    out, grads = triton_run(q, k, v, cu, max_seqlen, dout=torch.zeros_like(q), causal=True, dropout_p=0.1)
    assert out.shape == (0, 4, 64) and out.dtype == q.dtype
    assert [g.shape for g in grads] == [x.shape for x in (q, k, v)]
    for shape in ((2, 0, 4, 64), (0, 5, 4, 64)):  # dense S = 0 and B = 0
        dense = [torch.zeros(shape[:2] + (h, 64), device=TRITON_DEVICE) for h in (4, 2, 2)]
        assert lf.flash_attention(*dense, backend="triton").shape == shape


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_length_one_sequences_copy_their_value(dtype):
    """One token attends only to itself: out = v bitwise, lse = its capped logit, dq = dk = 0 (to rounding
    of rowsum(dO * O) against dO . V), dv = the sum of its query heads' dO."""
    lengths, hq, hkv, d = [1, 1, 0, 1], 8, 2, 80
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, dtype=dtype, seed=163)
    dout = rand_like(q, 164)
    out, (dq, dk, dv) = triton_run(q, k, v, cu, dout=dout, causal=True, softcap=2.0)
    heads = torch.arange(hq, device=q.device) // (hq // hkv)
    assert torch.equal(out, v[:, heads])
    _, lse = FWD_OP(q, k, v, cu, 1, True, 0.5, 2.0, 0.0, None, "triton")
    logit = 2.0 * torch.tanh((q.double() * k.double()[:, heads]).sum(-1) * 0.5 / 2.0)
    assert_close64(lse, logit.t(), atol=1e-5, rtol=1e-5, what="lse of single tokens")
    assert dq.abs().max() <= 1e-5 and dk.abs().max() <= 1e-5, (dq.abs().max(), dk.abs().max())
    expected_dv = dout.float().view(3, hkv, hq // hkv, d).sum(2)
    assert_close64(dv, expected_dv, atol=1e-6 if dtype == torch.float32 else 2e-2, rtol=1e-2, what="dv")


# ---- bad input, availability, custom-op registration ----
@needs_triton
@pytest.mark.parametrize("overrides,error,pattern", [
    pytest.param(dict(q=_t(10, 4, 32), k=_t(10, 2, 32), v=_t(10, 2, 32)), ValueError,
                 r"head dim \(q\.shape\[-1\]\) must be one of \(64, 80, 96, 128, 256\), got 32", id="head-dim-32"),
    pytest.param(dict(q=_t(10, 6, 64), k=_t(10, 4, 64), v=_t(10, 4, 64)), ValueError, r"Hq=6 .*Hkv=4",
                 id="hq-not-multiple"),
    pytest.param(dict(cu_seqlens=_cu([0, 8, 5, 10])), ValueError,
                 r"cu_seqlens must be non-decreasing, got cu_seqlens\[1\]=8 > cu_seqlens\[2\]=5", id="cu-decreasing"),
    pytest.param(dict(max_seqlen=5), ValueError,
                 r"max_seqlen must be >= the longest sequence in cu_seqlens \(6\), got 5", id="max-seqlen-small"),
    pytest.param(dict(dropout_p=1.0), ValueError, r"dropout_p must be < 1, got 1\.0", id="dropout-one"),
])
def test_triton_bad_input_raises_same_errors(overrides, error, pattern):
    """Validation runs before dispatch: backend="triton" reports bad input exactly as the reference does."""
    with pytest.raises(error, match=pattern):
        _good(backend="triton", **overrides)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_on_cpu_without_interpreter_names_the_variable(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"backend='triton': backend cannot run flash_attention on cpu "
                                         r"\(on the CPU, Triton kernels run only with TRITON_INTERPRET=1\); "
                                         r"available backends for flash_attention on cpu: \['auto', 'torch'\]"):
        _good(backend="triton")


@needs_triton
def test_triton_opcheck_forward_and_backward():
    q, k, v, cu = triton_packed([3, 0, 9], 2, 1, 64, seed=170, requires_grad=True)
    seed = torch.tensor([2**61 + 1])
    args = (q, k, v, cu, 9, True, 0.125, 4.0, 0.2, seed, "triton")
    torch.library.opcheck(FWD_OP.default, args)
    out, lse = FWD_OP(*args)
    bargs = (rand_like(out, 171), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), cu, 9, True, 0.125,
             4.0, 0.2, seed, "triton")
    torch.library.opcheck(BWD_OP.default, bargs)


# ----------------------------------------------------------------------------------------------------
# 11. sliding windows (|i - j| < w): reference, public op, triton
# ----------------------------------------------------------------------------------------------------
WINDOW_LENGTHS = [70, 1, 0, 33, 5]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 5, 32, 33])
def test_window_reference_matches_oracle(causal, window):
    """The reference's window mask is the definition (float64), and the window changes the result."""
    q, k, v, cu = rand_packed(WINDOW_LENGTHS, 4, 2, 64, dtype=torch.float64, seed=200 + window)
    out, lse = attention(q, k, v, cu, 70, causal, 0.125, 0.0, 0.0, 0, window, compute_dtype=torch.float64)
    out_true, lse_true = oracle(q, k, v, cu, causal=causal, scale=0.125, softcap=0.0, window=window)
    assert_close64(out, out_true, atol=1e-12, rtol=1e-12, what="windowed out")
    assert_close64(lse, lse_true, atol=1e-6, rtol=1e-6, what="windowed lse (float32)")
    unwindowed, _ = oracle(q, k, v, cu, causal=causal, scale=0.125, softcap=0.0)
    assert max_err(out, unwindowed) > 1e-3


@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 2.0)])
def test_window_public_op_matches_fp64_autograd(causal, softcap):
    """flash_attention(sliding_window=w) on the default backend: forward and gradients vs the float64 oracle."""
    q, k, v, cu = rand_packed(WINDOW_LENGTHS, 8, 2, 64, seed=210, requires_grad=True)
    out = lf.flash_attention(q, k, v, cu, causal=causal, softcap=softcap, sliding_window=7)
    dout = rand_like(out, 211)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out_true, _ = oracle(q64, k64, v64, cu, causal=causal, scale=0.125, softcap=softcap, window=7)
    grads_true = torch.autograd.grad(out_true, (q64, k64, v64), dout.double())
    assert_close64(out, out_true, atol=2e-6, rtol=1e-5, what="out")
    for name, g, g_true in zip("qkv", grads, grads_true):
        assert_close64(g, g_true, atol=1e-5, rtol=1e-4, what=f"d{name}")


def test_window_reaching_every_key_is_no_window():
    """A window no shorter than the longest sequence changes nothing: the same bits as without one."""
    q, k, v, cu = rand_packed(WINDOW_LENGTHS, 4, 2, 64, seed=220)
    plain = lf.flash_attention(q, k, v, cu)
    for window in (70, 71, 10**12):
        assert torch.equal(lf.flash_attention(q, k, v, cu, sliding_window=window), plain)
    assert not torch.equal(lf.flash_attention(q, k, v, cu, sliding_window=69), plain)


# (dtype, lengths, Hq, Hkv, D, causal, softcap, window). The interpreter tiles by 32: windows of 2, 5, 33
# have no tile inside every row's window; 40 and 64 do (the unmasked middle phase runs).
TRITON_WINDOW_CASES = [
    pytest.param(torch.float32, WINDOW_LENGTHS, 4, 2, 64, False, 0.0, 5, id="fp32-gqa2-w5"),
    pytest.param(torch.float32, [100, 64, 1], 2, 2, 64, True, 0.0, 33, id="fp32-causal-w33"),
    pytest.param(torch.float32, [130, 17, 0], 8, 1, 128, False, 2.0, 40, id="fp32-gqa8-d128-cap2-w40"),
    pytest.param(torch.bfloat16, [130, 17, 1], 4, 1, 64, False, 0.0, 40, id="bf16-gqa4-w40"),
    pytest.param(torch.float16, [150, 0, 3], 4, 4, 64, True, 0.0, 64, id="fp16-causal-w64"),
    pytest.param(torch.bfloat16, [65, 0, 3], 2, 1, 96, False, 0.0, 2, id="bf16-d96-w2"),
]


@needs_triton
@pytest.mark.parametrize("dtype,lengths,hq,hkv,d,causal,softcap,window", TRITON_WINDOW_CASES)
def test_triton_window_matches_reference(dtype, lengths, hq, hkv, d, causal, softcap, window):
    """fp32: the windowed fp32 reference to fp32 rounding (forward, lse and gradients); fp16/bf16: within 2x / 3x
    of PyTorch's own error in that dtype against the float64 oracle."""
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, dtype=dtype, seed=230 + window)
    max_seqlen, sm = max(lengths), d ** -0.5
    if dtype == torch.float32:
        dout = rand_like(q, 231)
        leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        out, lse = FWD_OP(*leaves, cu, max_seqlen, causal, sm, softcap, 0.0, None, "triton", window)
        grads = torch.autograd.grad(out, leaves, dout)
        out_ref, lse_ref, grads_ref = reference_run(q, k, v, cu, max_seqlen, dout, causal=causal, scale=sm,
                                                    softcap=softcap, window=window)
        assert_close64(out, out_ref, **FP32_OUT_TOL, what="windowed out")
        assert_close64(lse, lse_ref, atol=1e-5, rtol=1e-5, what="windowed lse")
        for name, g, g_ref in zip("qkv", grads, grads_ref):
            assert g_ref.abs().max() > 1e-3
            assert_close64(g, g_ref, **FP32_GRAD_TOL, what=f"windowed d{name}")
    else:
        def truth(q64, k64, v64):
            return oracle(q64, k64, v64, cu, causal=causal, scale=sm, softcap=softcap, window=window)[0]

        check_error_bounds(q, k, v, cu, max_seqlen, causal=causal, scale=None, softcap=softcap, backend="triton",
                           truth=truth, window=window)


@needs_triton
@pytest.mark.skipif(not dispatch.triton_interpreting(), reason="sets the interpreter's block shape")
@pytest.mark.parametrize("block_m,block_n", [(64, 32), (32, 64), (16, 64)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [70, None])
def test_triton_with_the_gpu_block_shapes(kfa, monkeypatch, block_m, block_n, causal, window):
    """The GPU configs tile queries and keys differently (BLOCK_M != BLOCK_N); the interpreter's one config
    does not. Here it runs those shapes, so every bound (the causal diagonal; the window's left edge, unmasked
    middle and right edge; the dK/dV row range) is exercised where tiles of the two kinds do not line up."""
    original = kfa._kernel

    def shaped(kernel, tables, block_d, fp32):
        fn, fixed = original(kernel, tables, block_d, fp32)
        return fn, dict(fixed, BLOCK_M=block_m, BLOCK_N=block_n)
    monkeypatch.setattr(kfa, "_kernel", shaped)
    lengths = [200, 1, 0, 77]
    q, k, v, cu = triton_packed(lengths, 4, 2, 64, seed=260 + block_m)
    dout = rand_like(q, 261)
    out, grads = triton_run(q, k, v, cu, None, dout, causal=causal, sliding_window=window)
    out_ref, _, grads_ref = reference_run(q, k, v, cu, 200, dout, causal=causal, scale=0.125, softcap=0.0,
                                          window=window or 0)
    assert_close64(out, out_ref, **FP32_OUT_TOL, what=f"{block_m}x{block_n} out")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close64(g, g_ref, **FP32_GRAD_TOL, what=f"{block_m}x{block_n} d{name}")


@needs_triton
def test_triton_window_with_dropout_replays_kernel_mask(kfa):
    """Window, softcap and dropout together: the reference given the kernel's mask and the same window."""
    lengths, hq, hkv, d, p, seed, window = [90, 0, 7], 4, 2, 64, 0.3, 11, 40
    q, k, v, cu = triton_packed(lengths, hq, hkv, d, seed=240, requires_grad=True)
    out, lse = FWD_OP(q, k, v, cu, 90, False, 0.2, 3.0, p, torch.tensor([seed]), "triton", window)
    dout = rand_like(out, 241)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    mask = kfa.dropout_mask(cu, 90, hq, p, seed)
    out_ref, lse_ref, grads_ref = reference_run(q, k, v, cu, 90, dout, causal=False, scale=0.2, softcap=3.0,
                                                dropout_p=p, mask=mask, window=window)
    assert_close64(out, out_ref, **FP32_OUT_TOL, what="out")
    assert_close64(lse, lse_ref, atol=1e-5, rtol=1e-5, what="lse")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert_close64(g, g_ref, **FP32_GRAD_TOL, what=f"d{name}")


@needs_triton
@pytest.mark.parametrize("causal", [False, True])
def test_triton_window_batch_invariance_bitwise(kfa, causal):
    """With a window, too, a sequence's outputs and gradients do not depend on its neighbours in the pack."""
    hq, hkv, d, n = 2, 1, 64, 75
    mine = [rand_like(torch.empty(n, h, d, device=TRITON_DEVICE, dtype=torch.bfloat16), 250 + i)
            for i, h in enumerate((hq, hkv, hkv))]
    my_dout = rand_like(mine[0], 253)
    alone = run_in_pack(mine, [], [], my_dout=my_dout, causal=causal, sliding_window=40)
    for before, after in [([5], []), ([1, 0, 33], [2, 0]), ([0] * 3, [1] * 5)]:
        got = run_in_pack(mine, before, after, my_dout=my_dout, causal=causal, sliding_window=40)
        same_key = kfa._seqlen_bucket(max(before + [n] + after)) == kfa._seqlen_bucket(n)
        checked = ("out", "dq", "dk", "dv") if dispatch.triton_interpreting() or same_key else ("out",)
        for name, x, y in zip(checked, got, alone):
            assert torch.equal(x, y), (name, before, after, max_err(x, y))


# ----------------------------------------------------------------------------------------------------
# 12. GPU: every backend that runs on CUDA, at real sizes
# ----------------------------------------------------------------------------------------------------
GPU_LENGTHS = [1000, 7, 513, 0, 1200, 1, 800, 575]  # T = 4096, varlen with empty and length-1 sequences


def _cuda_backend_or_skip(backend):
    available = dispatch.available_backends("flash_attention", torch.device("cuda"))
    if backend not in available:
        pytest.skip(f"backend {backend!r} cannot run flash_attention on cuda here (available: {available})")
    if backend == "triton" and dispatch.triton_interpreting():
        pytest.skip("TRITON_INTERPRET is set: the triton kernels would run in the CPU interpreter, far too slowly at "
                    "GPU sizes; run the gpu tests without it (as benchmarks/device_check.sh does)")


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
@pytest.mark.parametrize("causal,window", [(False, 256), (True, 100), (False, 64)])
def test_gpu_window_within_bound_of_torch(backend, causal, window):
    """Sliding windows at real sizes (GQA 4, bf16): every backend (cuda through its Triton fallback) within
    the bound, lse included; the window matters on these lengths."""
    _cuda_backend_or_skip(backend)
    hq, hkv, d = 32, 8, 128
    q, k, v, cu = rand_packed(GPU_LENGTHS, hq, hkv, d, dtype=torch.bfloat16, seed=95, device="cuda")
    max_seqlen = max(GPU_LENGTHS)
    sm = d ** -0.5

    def truth(q64, k64, v64):
        return attention(q64, k64, v64, cu, max_seqlen, causal, sm, 0.0, 0.0, 0, window,
                         compute_dtype=torch.float64)[0]

    check_error_bounds(q, k, v, cu, max_seqlen, causal=causal, scale=None, softcap=0.0, backend=backend,
                       truth=truth, window=window)
    _, lse = FWD_OP(q, k, v, cu, max_seqlen, causal, sm, 0.0, 0.0, None, backend, window)
    _, lse_true = attention(q.double(), k.double(), v.double(), cu, max_seqlen, causal, sm, 0.0, 0.0, 0, window,
                            compute_dtype=torch.float64)
    torch.testing.assert_close(lse, lse_true, atol=1e-2, rtol=1e-3)
    unwindowed = lf.flash_attention(q, k, v, cu, max_seqlen, causal=causal, backend=backend)
    assert max_err(lf.flash_attention(q, k, v, cu, max_seqlen, causal=causal, sliding_window=window,
                                      backend=backend), unwindowed) > 1e-3


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


@pytest.mark.gpu
@pytest.mark.parametrize("causal,softcap", [(False, 0.0), (True, 0.0), (False, 30.0)])
def test_gpu_triton_long_sequence_within_bound_of_torch(causal, softcap):
    """bf16, head dim 128, an 8192-token sequence packed with a length-1, an empty and a mid-size one:
    the flash-attention bound against the float64 oracle (one sequence and head at a time, a few GB)."""
    _cuda_backend_or_skip("triton")
    lengths, hq, hkv, d = [8192, 1, 0, 777], 4, 1, 128
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=torch.bfloat16, seed=94, device="cuda")

    def truth(q64, k64, v64):
        return oracle(q64, k64, v64, cu, causal=causal, scale=d ** -0.5, softcap=softcap)[0]

    check_error_bounds(q, k, v, cu, max(lengths), causal=causal, scale=None, softcap=softcap, backend="triton",
                       truth=truth)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_triton_batch_invariance_bitwise(causal):
    """bf16, head dim 128, a 3001-token sequence: its output is bitwise the same alone (max_seqlen bucket
    4096) and in packs up to 8192 long (another autotune key, so maybe another config: all forward configs
    of a head dim share BLOCK_N), wherever it sits. Its gradients are bitwise the same for a fixed
    max_seqlen (one autotune key) whatever its neighbours and position."""
    _cuda_backend_or_skip("triton")
    hq, hkv, d, n, dtype = 16, 4, 128, 3001, torch.bfloat16
    mine = [rand_like(torch.empty(n, h, d, device="cuda", dtype=dtype), 95 + i) for i, h in enumerate((hq, hkv, hkv))]
    alone = run_in_pack(mine, [], [], causal=causal)[0]
    for before, after in [([8192], []), ([], [7, 5000]), ([1] * 64 + [0], [2048]), ([4095, 1], [])]:
        out = run_in_pack(mine, before, after, causal=causal)[0]
        assert torch.equal(out, alone), (before, after, max_err(out, alone))
    my_dout = rand_like(mine[0], 98)
    first = run_in_pack(mine, [], [], max_seqlen=8192, my_dout=my_dout, causal=causal)
    assert torch.equal(first[0], alone)
    for before, after in [([8192], []), ([1] * 64, [3000, 0])]:
        got = run_in_pack(mine, before, after, max_seqlen=8192, my_dout=my_dout, causal=causal)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, first):
            assert torch.equal(x, y), (name, before, after, max_err(x, y))


# ----------------------------------------------------------------------------------------------------
# 13. return_lse: the logsumexp as a differentiable output (flash-attn's softmax_lse, with its gradient)
# ----------------------------------------------------------------------------------------------------
LSE_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton),
                pytest.param("cuda", marks=pytest.mark.gpu), pytest.param("flash_attn", marks=pytest.mark.gpu)]
LSE_FP32_BACKENDS = LSE_BACKENDS[:3]  # flash-attn takes fp16/bf16 only
# (lengths, Hq, Hkv, D, causal, softcap, softmax_scale, window): GQA ratios 1, 2, 4 and 8, odd lengths
# with empty sequences, causal, softcap, a custom scale and a window each on and off.
LSE_CASES = [
    pytest.param(ODD_LENGTHS, 4, 4, 64, False, 0.0, None, None, id="mha-d64"),
    pytest.param(ODD_LENGTHS, 4, 2, 80, True, 0.0, None, None, id="gqa2-d80-causal"),
    pytest.param([40, 0, 77, 1], 4, 1, 64, False, 2.0, 0.3, None, id="gqa4-cap2-scale"),
    pytest.param([17, 113, 0, 1], 8, 1, 128, False, 0.0, None, 9, id="gqa8-d128-window9"),
]


def _lse_device(backend):
    """Where ``backend`` runs these tests: cuda and flash_attn on the GPU (skipped where they cannot)."""
    if backend in ("cuda", "flash_attn"):
        _cuda_backend_or_skip(backend)
        return "cuda"
    return TRITON_DEVICE if backend == "triton" else "cpu"


@pytest.mark.parametrize("backend", LSE_FP32_BACKENDS)
@pytest.mark.parametrize("lengths,hq,hkv,d,causal,softcap,scale,window", LSE_CASES)
def test_lse_and_its_gradient_match_fp64_autograd(backend, lengths, hq, hkv, d, causal, softcap, scale, window):
    """fp32: lse and the gradients of <out, dout> + <lse, dlse> equal float64 autograd through the oracle."""
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, seed=200 + d, device=_lse_device(backend), requires_grad=True)
    sm = default_scale(d, scale)
    out, lse = lf.flash_attention(q, k, v, cu, causal=causal, softmax_scale=scale, softcap=softcap,
                                  sliding_window=window, return_lse=True, backend=backend)
    assert lse.shape == (hq, q.shape[0]) and lse.dtype == torch.float32 and lse.requires_grad
    dout, dlse = rand_like(out, 201), rand_like(lse, 202)
    grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    out_true, lse_true = oracle(q64, k64, v64, cu, causal=causal, scale=sm, softcap=softcap, window=window)
    loss_true = (out_true * dout.double()).sum() + (lse_true * dlse.double()).sum()
    grads_true = torch.autograd.grad(loss_true, (q64, k64, v64), retain_graph=True)
    assert_close64(lse, lse_true, atol=2e-5, rtol=1e-5, what=f"{backend} lse")
    assert_close64(out, out_true, **FP32_OUT_TOL, what=f"{backend} out")
    # The lse term is not negligible: without it the gradients are far off (the check can fail).
    (dq_without,) = torch.autograd.grad((out_true * dout.double()).sum(), (q64,))
    assert max_err(dq_without, grads_true[0]) > 1e-2
    for name, g, g_true in zip("qkv", grads, grads_true):
        assert_close64(g, g_true, **FP32_GRAD_TOL, what=f"{backend} d{name} with dlse")


@pytest.mark.parametrize("backend", LSE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_lse_gradient_low_precision_within_bound_of_torch(backend, dtype):
    """fp16/bf16, GQA 4 with a window and softcap: lse and out within 2x, the gradients (lse term included)
    within 3x of PyTorch's own error in that dtype, against the float64 oracle."""
    lengths, hq, hkv, d, softcap, window = [1, 57, 0, 33], 8, 2, 64, 3.0, 12
    q, k, v, cu = rand_packed(lengths, hq, hkv, d, dtype=dtype, seed=210, device=_lse_device(backend))

    def truth(q64, k64, v64):
        return oracle(q64, k64, v64, cu, causal=False, scale=d ** -0.5, softcap=softcap, window=window)

    check_error_bounds(q, k, v, cu, max(lengths), causal=False, scale=None, softcap=softcap, backend=backend,
                       truth=truth, window=window, with_lse=True)


@pytest.mark.parametrize("backend", LSE_FP32_BACKENDS)
def test_return_lse_layouts_and_unused_lse(backend):
    """Dense inputs give lse (B, Hq, S), the packed lse rearranged; out is the same bits with or without
    return_lse, and so are the gradients when the loss does not use lse."""
    batch, seqlen, hq, hkv, d = 3, 19, 4, 2, 64
    device = _lse_device(backend)
    q, k, v, cu = rand_packed([seqlen] * batch, hq, hkv, d, seed=220, device=device, requires_grad=True)
    out, lse = lf.flash_attention(q, k, v, cu, return_lse=True, backend=backend)
    dense = [x.detach().reshape(batch, seqlen, *x.shape[1:]).requires_grad_(True) for x in (q, k, v)]
    dense_out, dense_lse = lf.flash_attention(*dense, return_lse=True, backend=backend)
    assert dense_out.shape == (batch, seqlen, hq, d) and dense_lse.shape == (batch, hq, seqlen)
    assert torch.equal(dense_lse, lse.reshape(hq, batch, seqlen).transpose(0, 1))
    assert torch.equal(dense_out.reshape(out.shape), out)
    plain = lf.flash_attention(q, k, v, cu, backend=backend)
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, out)
    dout = rand_like(out, 221)
    assert all(torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                                   torch.autograd.grad(plain, (q, k, v), dout)))
    # Dense lse carries its gradient too (to the dense inputs).
    dlse = rand_like(dense_lse, 222)
    grads = torch.autograd.grad((dense_out * dout.reshape(dense_out.shape)).sum() + (dense_lse * dlse).sum(), dense)
    packed = torch.autograd.grad((out * dout).sum() + (lse * dlse.transpose(0, 1).reshape(hq, -1)).sum(), (q, k, v))
    for g, g_packed in zip(grads, packed):
        assert_close64(g.reshape(g_packed.shape), g_packed, atol=1e-6, rtol=1e-6, what="dense vs packed")


def test_return_lse_must_be_a_bool():
    q, k, v, cu = rand_packed([5], 2, 1, 64, seed=230)
    with pytest.raises(TypeError, match="return_lse must be a bool, got str 'yes'"):
        lf.flash_attention(q, k, v, cu, return_lse="yes")


def test_lse_gradient_through_flash_attn_and_cuda_backends_takes_the_fallback(monkeypatch):
    """flash-attn's backward drops dlse, and the CUDA extension has no backward: with a dlse both hand the
    whole backward to dispatch.fallback (Triton, else torch); without one flash-attn's own backward runs."""
    from llm2vec_fast import cuda_backend, flash_attn_backend
    q, k, v, cu = rand_packed([9, 4], 4, 2, 64, seed=240)
    out, lse = attention_forward(q, k, v, cu, 9, False, 0.125, 0.0, 0.0, 0)
    dout, dlse = rand_like(out, 241), rand_like(lse, 242)
    want = attention_backward(dout, q, k, v, out, lse, cu, 9, False, 0.125, 0.0, 0.0, 0, dlse=dlse)
    reference = dispatch.implementation("flash_attention", "torch")
    monkeypatch.setattr(dispatch, "fallback", lambda op: reference)
    for module in (flash_attn_backend, cuda_backend):
        backward = module.backward if module is flash_attn_backend else module.flash_attention_backward
        got = backward(dout, q, k, v, out, lse, cu, 9, False, 0.125, 0.0, 0.0, 0, dlse=dlse)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), module.__name__
    called = []
    monkeypatch.setattr(flash_attn_backend, "_interface", lambda: called.append(True) or pytest.fail("stop"))
    with pytest.raises(pytest.fail.Exception):
        flash_attn_backend.backward(dout, q, k, v, out, lse, cu, 9, False, 0.125, 0.0, 0.0, 0)
    assert called == [True]
