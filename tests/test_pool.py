"""Tests of ``llm2vec_fast.pool`` against a float64 oracle written here (one loop per sequence).

Covers every mode, both layouts (packed with cu_seqlens; padded with left or right padding), embed_mask,
normalize, fp32/fp16/bf16, gradients, edge cases (nothing to pool, T=0), bad input and opcheck.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import llm2vec_fast as lf
from llm2vec_fast import dispatch

MODES = ("mean", "weighted_mean", "last_token", "eos_token", "bos_token")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIM = 24
# Odd lengths, including sequences of length 0 (in the middle and at the end).
LENGTHS = (1, 17, 0, 113, 6, 0)


def _gen(seed: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _randn(*shape, seed, dtype=torch.float32):
    # Offset by 0.5 so that means are far from zero (normalisation well conditioned), never zeros.
    return (torch.randn(*shape, generator=_gen(seed)) + 0.5).to(dtype)


# ---------------------------------------------------------------------------------------------------
# The float64 oracle: one sequence at a time, straight from the definitions in DESIGN.md.
# ---------------------------------------------------------------------------------------------------
def oracle_sequence(tokens: torch.Tensor, real: torch.Tensor, embed: torch.Tensor, mode: str) -> torch.Tensor:
    """tokens (L, D) float64; real, embed (L,) bool. Returns (D,) float64."""
    dim = tokens.shape[-1]
    real_idx = [i for i in range(tokens.shape[0]) if bool(real[i])]
    pooled_idx = [i for i in real_idx if bool(embed[i])]
    if mode in ("last_token", "eos_token", "bos_token"):
        if not real_idx:
            return tokens.new_zeros(dim)
        return tokens[real_idx[-1] if mode != "bos_token" else real_idx[0]]
    n = len(pooled_idx)
    if n == 0:
        return tokens.new_zeros(dim)
    if mode == "mean":
        return sum(tokens[i] for i in pooled_idx) / n
    assert mode == "weighted_mean"
    return sum((rank + 1) * tokens[i] for rank, i in enumerate(pooled_idx)) / (n * (n + 1) / 2)


def _finish(rows, normalize):
    out = torch.stack(rows)
    return F.normalize(out, dim=-1, eps=1e-12) if normalize else out


def oracle_packed(hidden, cu_seqlens, embed_mask, mode, normalize):
    hidden = hidden.double()
    cu = [int(c) for c in cu_seqlens]
    rows = []
    for b in range(len(cu) - 1):
        tok = hidden[cu[b]:cu[b + 1]]
        real = torch.ones(tok.shape[0], dtype=torch.bool)
        emb = real if embed_mask is None else embed_mask[cu[b]:cu[b + 1]] != 0
        rows.append(oracle_sequence(tok, real, emb, mode))
    if not rows:
        return hidden.new_zeros(0, hidden.shape[-1])
    return _finish(rows, normalize)


def oracle_padded(hidden, attention_mask, embed_mask, mode, normalize):
    hidden = hidden.double()
    rows = []
    for b in range(hidden.shape[0]):
        tok = hidden[b]
        real = torch.ones(tok.shape[0], dtype=torch.bool) if attention_mask is None else attention_mask[b] != 0
        emb = torch.ones_like(real) if embed_mask is None else embed_mask[b] != 0
        rows.append(oracle_sequence(tok, real, emb, mode))
    return _finish(rows, normalize)


# ---------------------------------------------------------------------------------------------------
# Data: the same sequences in the packed layout and in the padded layout (left or right padding).
# ---------------------------------------------------------------------------------------------------
def make_sequences(lengths, seed, dtype=torch.float32, with_embed=True):
    """Per sequence: (tokens (L, D) in dtype, embed (L,) int64). Embed masks are random 0/1 with an
    instruction-like prefix of zeros, and some sequences with no pooled token at all."""
    g = _gen(seed + 1)
    seqs = []
    for b, length in enumerate(lengths):
        tokens = _randn(length, DIM, seed=seed * 100 + b, dtype=dtype)
        embed = (torch.rand(length, generator=g) < 0.7).long()
        embed[: length // 3] = 0  # instruction tokens
        if b == 1 and length:  # make sure one non-empty sequence has nothing to pool
            embed.zero_()
        seqs.append((tokens, embed if with_embed else None))
    return seqs


def to_packed(seqs):
    hidden = torch.cat([t for t, _ in seqs]) if seqs else torch.empty(0, DIM)
    cu = torch.tensor([0] + [t.shape[0] for t, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    embed = None if seqs[0][1] is None else torch.cat([e for _, e in seqs])
    return hidden, cu, embed


def to_padded(seqs, side, extra=3, mask_dtype=torch.int64, seed=7):
    """Padding positions hold random (non-zero) values and random embed flags: they must be ignored."""
    seqlen = max(t.shape[0] for t, _ in seqs) + extra
    batch = len(seqs)
    dtype = seqs[0][0].dtype
    hidden = _randn(batch, seqlen, seqs[0][0].shape[-1], seed=seed, dtype=dtype) * 10
    attention = torch.zeros(batch, seqlen, dtype=torch.int64)
    has_embed = seqs[0][1] is not None
    embed = (torch.rand(batch, seqlen, generator=_gen(seed + 1)) < 0.5).long() if has_embed else None
    for b, (tokens, emb) in enumerate(seqs):
        length = tokens.shape[0]
        sl = slice(seqlen - length, seqlen) if side == "left" else slice(0, length)
        hidden[b, sl] = tokens
        attention[b, sl] = 1
        if has_embed:
            embed[b, sl] = emb
    if mask_dtype == torch.bool:
        attention = attention.bool()
    else:
        attention = attention.to(mask_dtype)
    return hidden, attention, embed


def _tols(dtype):
    # Inputs in fp16/bf16 are exactly representable in float64: outputs are float32 in every case.
    return dict(rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------------------------------
# 1. Parity with the oracle.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_embed", (False, True))
def test_packed_matches_oracle(mode, normalize, dtype, with_embed):
    seqs = make_sequences(LENGTHS, seed=1, dtype=dtype, with_embed=with_embed)
    hidden, cu, embed = to_packed(seqs)
    out = lf.pool(hidden, cu_seqlens=cu, embed_mask=embed, mode=mode, normalize=normalize)
    assert out.dtype == torch.float32 and out.shape == (len(LENGTHS), DIM)
    expected = oracle_packed(hidden, cu, embed, mode, normalize)
    torch.testing.assert_close(out.double(), expected, **_tols(dtype))
    # Zero-length sequences pool to zero vectors.
    assert torch.all(out[[i for i, n in enumerate(LENGTHS) if n == 0]] == 0)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_embed", (False, True))
@pytest.mark.parametrize("side", ("left", "right"))
def test_padded_matches_oracle(side, mode, normalize, dtype, with_embed):
    seqs = make_sequences(LENGTHS, seed=2, dtype=dtype, with_embed=with_embed)
    hidden, attention, embed = to_padded(seqs, side)
    out = lf.pool(hidden, attention_mask=attention, embed_mask=embed, mode=mode, normalize=normalize)
    assert out.dtype == torch.float32 and out.shape == (len(LENGTHS), DIM)
    expected = oracle_padded(hidden, attention, embed, mode, normalize)
    torch.testing.assert_close(out.double(), expected, **_tols(dtype))


@pytest.mark.parametrize("mask_dtype", (torch.bool, torch.int32, torch.int64, torch.float32, torch.uint8), ids=str)
def test_padded_mask_dtypes(mask_dtype):
    seqs = make_sequences((3, 9, 1, 5), seed=3)
    hidden, attention, embed = to_padded(seqs, "left", mask_dtype=mask_dtype)
    embed = embed.to(mask_dtype) if mask_dtype != torch.bool else embed.bool()
    for mode in MODES:
        out = lf.pool(hidden, attention_mask=attention, embed_mask=embed, mode=mode)
        torch.testing.assert_close(out.double(), oracle_padded(hidden, attention, embed, mode, False),
                                   rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("mode", MODES)
def test_padded_without_attention_mask_pools_every_token(mode):
    hidden = _randn(3, 11, DIM, seed=4)
    out = lf.pool(hidden, mode=mode)
    torch.testing.assert_close(out.double(), oracle_padded(hidden, None, None, mode, False), rtol=2e-5, atol=2e-5)


def test_llm2vec_weighted_mean_left_padding():
    """llm2vec's definition: left padding, embed_mask over the last n tokens (the text without the
    instruction), weights 1..n in order: sum_i i * h_i / (n (n + 1) / 2)."""
    batch, seqlen = 3, 20
    real_lengths, text_lengths = (20, 13, 7), (9, 13, 1)
    hidden = _randn(batch, seqlen, DIM, seed=5)
    attention = torch.zeros(batch, seqlen, dtype=torch.long)
    embed = torch.zeros(batch, seqlen, dtype=torch.long)
    for b, (length, n) in enumerate(zip(real_lengths, text_lengths)):
        attention[b, seqlen - length:] = 1
        embed[b, seqlen - n:] = 1
    out = lf.pool(hidden, attention_mask=attention, embed_mask=embed, mode="weighted_mean")
    h = hidden.double()
    for b, n in enumerate(text_lengths):
        last = h[b, seqlen - n:]
        want = sum(i * last[i - 1] for i in range(1, n + 1)) / (n * (n + 1) / 2)
        torch.testing.assert_close(out[b].double(), want, rtol=1e-5, atol=1e-5)
    # And the mean is the plain mean of the same n tokens.
    out = lf.pool(hidden, attention_mask=attention, embed_mask=embed, mode="mean")
    for b, n in enumerate(text_lengths):
        torch.testing.assert_close(out[b].double(), h[b, seqlen - n:].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ("last_token", "eos_token", "bos_token"))
@pytest.mark.parametrize("layout", ("packed", "left", "right"))
def test_embed_mask_does_not_affect_token_modes(mode, layout):
    seqs = make_sequences(LENGTHS, seed=6)
    if layout == "packed":
        hidden, cu, embed = to_packed(seqs)
        kwargs = dict(cu_seqlens=cu)
    else:
        hidden, attention, embed = to_padded(seqs, layout)
        kwargs = dict(attention_mask=attention)
    with_embed = lf.pool(hidden, embed_mask=embed, mode=mode, **kwargs)
    without = lf.pool(hidden, mode=mode, **kwargs)
    torch.testing.assert_close(with_embed, without, rtol=0, atol=0)
    # And it is exactly the last / first real token.
    for b, (tokens, _) in enumerate(seqs):
        if tokens.shape[0]:
            want = tokens[0] if mode == "bos_token" else tokens[-1]
            torch.testing.assert_close(with_embed[b], want.float(), rtol=0, atol=0)


def test_eos_token_is_alias_of_last_token():
    seqs = make_sequences(LENGTHS, seed=8)
    hidden, cu, embed = to_packed(seqs)
    for normalize in (False, True):
        a = lf.pool(hidden, cu_seqlens=cu, mode="eos_token", normalize=normalize)
        b = lf.pool(hidden, cu_seqlens=cu, mode="last_token", normalize=normalize)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_normalize_gives_unit_rows():
    seqs = make_sequences((5, 17, 113), seed=9, with_embed=False)
    hidden, cu, _ = to_packed(seqs)
    for mode in MODES:
        out = lf.pool(hidden, cu_seqlens=cu, mode=mode, normalize=True)
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(3), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 2. Packed and padded layouts of the same data agree.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_packed_equals_padded(mode, normalize, dtype):
    for with_embed in (False, True):
        seqs = make_sequences(LENGTHS, seed=10, dtype=dtype, with_embed=with_embed)
        hidden, cu, embed = to_packed(seqs)
        packed = lf.pool(hidden, cu_seqlens=cu, embed_mask=embed, mode=mode, normalize=normalize)
        for side in ("left", "right"):
            hidden_p, attention, embed_p = to_padded(seqs, side)
            padded = lf.pool(hidden_p, attention_mask=attention, embed_mask=embed_p, mode=mode, normalize=normalize)
            torch.testing.assert_close(padded, packed, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# 3. Gradients against float64 autograd through the oracle, and gradcheck.
# ---------------------------------------------------------------------------------------------------
def _grad_tols(dtype):
    return {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-5),
            torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4)}[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ("packed", "left", "right"))
def test_grad_matches_oracle(layout, mode, normalize, dtype):
    seqs = make_sequences(LENGTHS, seed=11, dtype=dtype)
    if layout == "packed":
        hidden, cu, embed = to_packed(seqs)
        kwargs = dict(cu_seqlens=cu, embed_mask=embed)

        def oracle(h):
            return oracle_packed(h, cu, embed, mode, normalize)
    else:
        hidden, attention, embed = to_padded(seqs, layout)
        kwargs = dict(attention_mask=attention, embed_mask=embed)

        def oracle(h):
            return oracle_padded(h, attention, embed, mode, normalize)
    grad_out = _randn(len(LENGTHS), DIM, seed=12) - 0.5
    hidden = hidden.detach().requires_grad_(True)
    lf.pool(hidden, mode=mode, normalize=normalize, **kwargs).backward(grad_out)
    hidden64 = hidden.detach().double().requires_grad_(True)
    oracle(hidden64).backward(grad_out.double())
    assert hidden.grad.dtype == dtype and hidden.grad.shape == hidden.shape
    assert torch.isfinite(hidden.grad.float()).all()
    torch.testing.assert_close(hidden.grad.double(), hidden64.grad, **_grad_tols(dtype))


@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", ("mean", "weighted_mean", "last_token", "bos_token"))
@pytest.mark.parametrize("layout", ("packed", "padded"))
def test_gradcheck(layout, mode, normalize):
    """Finite differences in float64 (the op runs in float32 inside, hence eps and tolerances)."""
    seqs = make_sequences((3, 0, 5, 2), seed=13)
    if layout == "packed":
        hidden, cu, embed = to_packed(seqs)
        kwargs = dict(cu_seqlens=cu, embed_mask=embed)
    else:
        hidden, attention, embed = to_padded(seqs, "left", extra=1)
        kwargs = dict(attention_mask=attention, embed_mask=embed)
    hidden = hidden[..., :6].contiguous()

    def fn(h64):
        return lf.pool(h64.float(), mode=mode, normalize=normalize, **kwargs).double()

    h64 = hidden.double().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (h64,), eps=1e-3, atol=2e-3, rtol=2e-3)


# ---------------------------------------------------------------------------------------------------
# 4. Edge cases: nothing to pool, T = 0.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_no_pooled_token_gives_zeros_and_finite_grads(mode, normalize):
    # Padded: sequence 0 has attention all 0, sequence 1 has embed_mask all 0, sequence 2 is normal.
    hidden = _randn(3, 7, DIM, seed=14).requires_grad_(True)
    attention = torch.ones(3, 7, dtype=torch.long)
    attention[0] = 0
    embed = torch.ones(3, 7, dtype=torch.long)
    embed[1] = 0
    embed[2, :2] = 0
    out = lf.pool(hidden, attention_mask=attention, embed_mask=embed, mode=mode, normalize=normalize)
    assert torch.isfinite(out).all()
    assert torch.all(out[0] == 0)
    if mode in ("mean", "weighted_mean"):
        assert torch.all(out[1] == 0)
    else:  # embed_mask does not apply to the token modes
        assert not torch.all(out[1] == 0)
    assert not torch.all(out[2] == 0)
    out.backward(_randn(3, DIM, seed=15))
    assert torch.isfinite(hidden.grad).all()
    assert torch.all(hidden.grad[0] == 0)
    if mode in ("mean", "weighted_mean"):
        assert torch.all(hidden.grad[1] == 0)
        assert torch.all(hidden.grad[2, :2] == 0)

    # Packed: embed_mask all zero for the middle sequence.
    hidden = _randn(9, DIM, seed=16).requires_grad_(True)
    cu = torch.tensor([0, 4, 6, 9], dtype=torch.int32)
    embed = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1])
    out = lf.pool(hidden, cu_seqlens=cu, embed_mask=embed, mode=mode, normalize=normalize)
    assert torch.isfinite(out).all()
    if mode in ("mean", "weighted_mean"):
        assert torch.all(out[1] == 0)
    out.backward(_randn(3, DIM, seed=17))
    assert torch.isfinite(hidden.grad).all()
    if mode in ("mean", "weighted_mean"):
        assert torch.all(hidden.grad[4:6] == 0)


@pytest.mark.parametrize("normalize", (False, True))
@pytest.mark.parametrize("mode", MODES)
def test_zero_tokens(mode, normalize):
    # Packed with T = 0: every sequence is empty.
    hidden = torch.empty(0, DIM).requires_grad_(True)
    cu = torch.zeros(3, dtype=torch.int32)
    out = lf.pool(hidden, cu_seqlens=cu, embed_mask=torch.empty(0, dtype=torch.long), mode=mode,
                  normalize=normalize)
    assert out.shape == (2, DIM) and out.dtype == torch.float32 and torch.all(out == 0)
    out.backward(torch.ones(2, DIM))
    assert hidden.grad.shape == (0, DIM)
    # Padded with S = 0.
    hidden = torch.empty(2, 0, DIM, dtype=torch.bfloat16).requires_grad_(True)
    out = lf.pool(hidden, attention_mask=torch.empty(2, 0, dtype=torch.long), mode=mode, normalize=normalize)
    assert out.shape == (2, DIM) and out.dtype == torch.float32 and torch.all(out == 0)
    out.backward(torch.ones(2, DIM))
    assert hidden.grad.shape == (2, 0, DIM)


def test_single_token_sequences_all_modes_agree():
    hidden = _randn(4, DIM, seed=18)
    cu = torch.arange(5, dtype=torch.int32)
    outs = [lf.pool(hidden, cu_seqlens=cu, mode=m) for m in MODES]
    for out in outs:
        torch.testing.assert_close(out, hidden, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# 5. Bad input: the message names the argument and what was received.
# ---------------------------------------------------------------------------------------------------
def _padded_ok():
    return _randn(2, 5, 8, seed=19), torch.ones(2, 5, dtype=torch.long)


@pytest.mark.parametrize("hidden, exc, match", [
    (torch.ones(8), ValueError, r"hidden.*\(8,\)"),
    (torch.ones(2, 3, 4, 8), ValueError, r"hidden.*\(2, 3, 4, 8\)"),
    (torch.ones(2, 5, 8, dtype=torch.float64), TypeError, r"hidden.*float64"),
    (torch.ones(2, 5, 8, dtype=torch.int64), TypeError, r"hidden.*int64"),
    ([[1.0, 2.0]], TypeError, r"hidden.*list"),
    (torch.ones(2, 5, 8).to_sparse(), TypeError, r"hidden must be a dense \(strided\) tensor, got a torch\.sparse_coo"),
])
def test_bad_hidden(hidden, exc, match):
    with pytest.raises(exc, match=match):
        lf.pool(hidden)


def test_packed_hidden_without_cu_seqlens():
    with pytest.raises(ValueError, match=r"hidden.*\(10, 8\).*cu_seqlens=None"):
        lf.pool(_randn(10, 8, seed=20))


def test_cu_seqlens_with_padded_hidden():
    hidden, _ = _padded_ok()
    with pytest.raises(ValueError, match=r"hidden.*\(2, 5, 8\)"):
        lf.pool(hidden, cu_seqlens=torch.tensor([0, 5, 10], dtype=torch.int32))


def test_attention_mask_with_cu_seqlens():
    hidden = _randn(10, 8, seed=21)
    with pytest.raises(ValueError, match=r"attention_mask"):
        lf.pool(hidden, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
                attention_mask=torch.ones(10, dtype=torch.long))


@pytest.mark.parametrize("cu, exc, match", [
    (torch.tensor([0, 4, 10], dtype=torch.int64), TypeError, r"cu_seqlens.*int64"),
    (torch.tensor([0, 4, 9], dtype=torch.int32), ValueError, r"cu_seqlens.*T=10.*got 9"),
    (torch.tensor([1, 4, 10], dtype=torch.int32), ValueError, r"cu_seqlens.*start at 0.*got 1"),
    (torch.tensor([0, 6, 4, 10], dtype=torch.int32), ValueError, r"cu_seqlens.*non-decreasing.*6"),
    (torch.tensor([10], dtype=torch.int32), ValueError, r"cu_seqlens.*\(1,\)"),
    (torch.tensor([[0, 10]], dtype=torch.int32), ValueError, r"cu_seqlens.*\(1, 2\)"),
    ([0, 4, 10], TypeError, r"cu_seqlens.*list"),
    (torch.tensor([0, 4, 10], dtype=torch.int32).to_sparse(), TypeError, r"cu_seqlens must be a dense"),
])
def test_bad_cu_seqlens(cu, exc, match):
    with pytest.raises(exc, match=match):
        lf.pool(_randn(10, 8, seed=22), cu_seqlens=cu)


@pytest.mark.parametrize("name", ("attention_mask", "embed_mask"))
def test_mask_wrong_shape(name):
    hidden, attention = _padded_ok()
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 5\).*\(2, 4\)"):
        lf.pool(hidden, **{name: torch.ones(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match=rf"{name}.*\(2, 5\).*\(2, 5, 1\)"):
        lf.pool(hidden, **{name: torch.ones(2, 5, 1, dtype=torch.long)})


def test_embed_mask_wrong_shape_packed():
    with pytest.raises(ValueError, match=r"embed_mask.*\(10,\).*\(9,\)"):
        lf.pool(_randn(10, 8, seed=23), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32),
                embed_mask=torch.ones(9, dtype=torch.long))


@pytest.mark.parametrize("name", ("attention_mask", "embed_mask"))
@pytest.mark.parametrize("bad, shown", [(2, "2"), (-1, "-1"), (0.5, "0.5")])
def test_mask_not_zero_one(name, bad, shown):
    """A mask holding anything but 0/1 is rejected, and the message shows the offending value."""
    hidden, _ = _padded_ok()
    mask = torch.ones(2, 5, dtype=torch.float32 if isinstance(bad, float) else torch.long)
    mask[1, 3] = bad
    with pytest.raises(ValueError, match=name) as info:
        lf.pool(hidden, **{name: mask})
    assert shown in str(info.value), f"message does not show the received value {shown}: {info.value}"


@pytest.mark.parametrize("name", ("attention_mask", "embed_mask"))
def test_mask_bad_type_or_device(name):
    hidden, _ = _padded_ok()
    with pytest.raises(TypeError, match=rf"{name}.*list"):
        lf.pool(hidden, **{name: [[1] * 5] * 2})
    with pytest.raises(TypeError, match=rf"{name}.*complex64"):
        lf.pool(hidden, **{name: torch.ones(2, 5, dtype=torch.complex64)})
    with pytest.raises(ValueError, match=rf"{name}.*meta"):
        lf.pool(hidden, **{name: torch.ones(2, 5, dtype=torch.long, device="meta")})


@pytest.mark.parametrize("mode", ("median", "EOS_TOKEN", "", None))
def test_unknown_mode(mode):
    hidden, attention = _padded_ok()
    with pytest.raises(ValueError, match=rf"mode.*{mode!r}"):
        lf.pool(hidden, attention_mask=attention, mode=mode)


@pytest.mark.parametrize("normalize, shown", [(1, "int"), ("yes", "str"), (None, "NoneType")])
def test_normalize_not_bool(normalize, shown):
    hidden, attention = _padded_ok()
    with pytest.raises(TypeError, match=rf"normalize.*{shown}"):
        lf.pool(hidden, attention_mask=attention, normalize=normalize)


def test_unknown_backend():
    hidden, attention = _padded_ok()
    with pytest.raises(ValueError, match=r"backend='nope'.*torch"):
        lf.pool(hidden, attention_mask=attention, backend="nope")
    with pytest.raises(TypeError, match=r"backend.*int"):
        lf.pool(hidden, attention_mask=attention, backend=3)


def test_unavailable_backend_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, attention = _padded_ok()
    for backend in ("cuda", "triton", "flash_attn"):
        with pytest.raises(ValueError, match=rf"backend='{backend}'.*available.*'torch'"):
            lf.pool(hidden, attention_mask=attention, backend=backend)


# ---------------------------------------------------------------------------------------------------
# 6. opcheck of the custom ops (schema, fake tensors, autograd registration, AOT dispatch), and compile.
# ---------------------------------------------------------------------------------------------------
def _opcheck_cases():
    seqs = make_sequences((3, 0, 7, 2), seed=24)
    packed, cu, embed = to_packed(seqs)
    padded, attention, embed_p = to_padded(seqs, "left")
    return {"packed": (packed, cu, None, embed), "packed_noembed": (packed, cu, None, None),
            "padded": (padded, None, attention, embed_p), "padded_bf16": (padded.bfloat16(), None, attention.bool(), None)}


# Every mode with normalize off and on; each combination on two of the four layouts (opcheck is slow).
@pytest.mark.parametrize("mode, normalize, cases", [
    ("mean", False, ("packed", "padded_bf16")), ("mean", True, ("padded", "packed_noembed")),
    ("weighted_mean", False, ("padded", "packed_noembed")), ("weighted_mean", True, ("packed", "padded_bf16")),
    ("last_token", False, ("packed", "padded")), ("last_token", True, ("packed_noembed", "padded_bf16")),
    ("bos_token", False, ("packed_noembed", "padded_bf16")), ("bos_token", True, ("packed", "padded")),
])
def test_opcheck(mode, normalize, cases):
    all_cases = _opcheck_cases()
    for name in cases:
        hidden, cu, attention, embed = all_cases[name]
        hidden = hidden.detach().requires_grad_(True)
        args = (hidden, cu, attention, embed, mode, normalize, "torch")
        torch.library.opcheck(torch.ops.llm2vec_fast.pool_forward.default, args)
        grad_out = _randn(cu.numel() - 1 if cu is not None else hidden.shape[0], hidden.shape[-1], seed=25)
        torch.library.opcheck(torch.ops.llm2vec_fast.pool_backward.default,
                              (grad_out, hidden.detach(), cu, attention, embed, mode, normalize, "torch"))


def test_opcheck_non_contiguous_hidden():
    """A transposed (non-contiguous) hidden: fake and real outputs must agree on strides too."""
    hidden = _randn(6, 2, DIM, seed=26).transpose(0, 1)  # (B=2, S=6, D) non-contiguous
    assert not hidden.is_contiguous()
    attention = torch.ones(2, 6, dtype=torch.long)
    attention[0, :2] = 0
    torch.library.opcheck(torch.ops.llm2vec_fast.pool_forward.default,
                          (hidden.requires_grad_(True), None, attention, None, "mean", True, "torch"))
    torch.library.opcheck(torch.ops.llm2vec_fast.pool_backward.default,
                          (_randn(2, DIM, seed=27), hidden.detach(), None, attention, None, "mean", True, "torch"))


def test_torch_compile_fullgraph():
    seqs = make_sequences((3, 7, 2), seed=28)
    hidden, cu, embed = to_packed(seqs)

    def f(h):
        return lf.pool(h, cu_seqlens=cu, embed_mask=embed, mode="weighted_mean", normalize=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    h1 = hidden.clone().requires_grad_(True)
    h2 = hidden.clone().requires_grad_(True)
    out1, out2 = f(h1), compiled(h2)
    torch.testing.assert_close(out2, out1, rtol=0, atol=0)
    g = _randn(*out1.shape, seed=29)
    out1.backward(g)
    out2.backward(g)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------
# Every backend that runs on the CPU (torch; triton too when the suite runs with TRITON_INTERPRET=1, as
# `make test` does) against the oracle, forward and backward, on small inputs.
# ---------------------------------------------------------------------------------------------------
def cpu_backends(op):
    names = ["torch"]
    if dispatch.triton_interpreting():
        dispatch._load_backends()
        names += [b for b in dispatch.available_backends(op, torch.device("cpu")) if b not in ("torch",)]
    return names


@pytest.mark.parametrize("backend", cpu_backends("pool"))
def test_strided_cu_seqlens_pools_as_a_contiguous_one(backend):
    """cu_seqlens as every other element of a buffer (valid values, stride 2): the triton kernel read it as one
    int32 after another (garbage, NaN gradients); every backend now pools as with the contiguous tensor."""
    hidden, cu, embed = to_packed(make_sequences((3, 0, 7, 1), seed=34))
    strided = torch.stack([cu, torch.full_like(cu, 99)], dim=1).reshape(-1)[::2]
    assert not strided.is_contiguous() and strided.tolist() == cu.tolist()
    grad_out = _randn(4, DIM, seed=35)
    results = []
    for cu_given in (cu, strided):
        h = hidden.detach().clone().requires_grad_(True)
        out = lf.pool(h, cu_seqlens=cu_given, embed_mask=embed, mode="weighted_mean", normalize=True,
                      backend=backend)
        out.backward(grad_out)
        results.append((out, h.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("layout", ("packed", "left", "right"))
@pytest.mark.parametrize("backend", cpu_backends("pool"))
def test_cpu_backends_match_oracle(backend, layout, dtype):
    seqs = make_sequences((1, 17, 0, 33, 6), seed=32, dtype=dtype)
    if layout == "packed":
        hidden, cu, embed = to_packed(seqs)
        kwargs = dict(cu_seqlens=cu)
    else:
        hidden, attention, embed = to_padded(seqs, layout)
        kwargs = dict(attention_mask=attention)
        cu = None
    grad_out = _randn(len(seqs), DIM, seed=33) - 0.5
    for mode in MODES:
        for normalize in (False, True):
            for emb in (None, embed):
                h = hidden.detach().clone().requires_grad_(True)
                out = lf.pool(h, embed_mask=emb, mode=mode, normalize=normalize, backend=backend, **kwargs)
                out.backward(grad_out)
                h64 = hidden.detach().double().requires_grad_(True)
                if cu is not None:
                    want = oracle_packed(h64, cu, emb, mode, normalize)
                else:
                    want = oracle_padded(h64, attention, emb, mode, normalize)
                want.backward(grad_out.double())
                where = f"{backend} {mode} normalize={normalize} embed={emb is not None}"
                assert out.dtype == torch.float32 and out.shape == want.shape
                torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{where}: {m}")
                assert h.grad.dtype == dtype
                torch.testing.assert_close(h.grad.double(), h64.grad, **_grad_tols(dtype),
                                           msg=lambda m: f"{where} grad: {m}")


@pytest.mark.parametrize("layout", ("packed", "left", "right"))
@pytest.mark.parametrize("backend", cpu_backends("pool"))
def test_unpooled_tokens_holding_nan_or_inf_are_never_read(backend, layout):
    """Padding (and tokens outside embed_mask) may hold anything, as the kernels never read them: the torch
    backend multiplied them by a weight of 0, so one NaN or inf in the padding made the whole embedding NaN."""
    seqs = make_sequences((1, 17, 0, 33, 6), seed=36)
    if layout == "packed":
        hidden, cu, embed = to_packed(seqs)
        kwargs = dict(cu_seqlens=cu)
        unread = embed == 0  # real tokens, outside embed_mask
    else:
        hidden, attention, embed = to_padded(seqs, layout)
        kwargs = dict(attention_mask=attention)
        cu = None
        unread = attention == 0
    assert unread.any()
    poisoned = hidden.detach().clone()
    poisoned[unread] = torch.tensor([float("nan"), float("inf"), -float("inf")]).repeat(DIM)[:DIM]
    grad_out = _randn(len(seqs), DIM, seed=37)
    for mode in ("mean", "weighted_mean") if layout == "packed" else MODES:
        for normalize in (False, True):
            h = poisoned.clone().requires_grad_(True)
            out = lf.pool(h, embed_mask=embed, mode=mode, normalize=normalize, backend=backend, **kwargs)
            out.backward(grad_out)
            h64 = hidden.detach().double()
            want = oracle_packed(h64, cu, embed, mode, normalize) if cu is not None else \
                oracle_padded(h64, attention, embed, mode, normalize)
            where = f"{backend} {mode} normalize={normalize}"
            torch.testing.assert_close(out.double(), want, rtol=2e-5, atol=2e-5, msg=lambda m: f"{where}: {m}")
            assert torch.isfinite(h.grad).all() and torch.all(h.grad[unread] == 0), where


# ---------------------------------------------------------------------------------------------------
# 7. GPU: every backend that runs on CUDA against the torch reference.
# ---------------------------------------------------------------------------------------------------
def backends_vs_reference(device, mode, dtype, batch, dim, max_len, seed=30):
    """Every backend available on ``device`` (and "auto") against the torch backend, packed and padded
    (left padding), with embed_mask, normalize off and on; forward and backward."""
    cpu = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len, (batch,), generator=cpu)
    lengths[min(5, batch - 1)] = 0
    cu = torch.zeros(batch + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    total = int(cu[-1])
    hidden = torch.randn(total, dim, generator=cpu).to(dtype)
    embed = (torch.rand(total, generator=cpu) < 0.8).long()
    seqs = [(hidden[a:b], embed[a:b]) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
    padded, attention, embed_p = to_padded(seqs, "left", extra=1, seed=seed)
    grad_out = torch.randn(batch, dim, generator=cpu).to(device)
    layouts = {"packed": (hidden.to(device), dict(cu_seqlens=cu.to(device), embed_mask=embed.to(device))),
               "padded": (padded.to(device), dict(attention_mask=attention.to(device), embed_mask=embed_p.to(device)))}
    backends = dispatch.available_backends("pool", device) + ["auto"]
    assert backends[0] == "torch"
    for layout, (x, kwargs) in layouts.items():
        for normalize in (False, True):
            results = {}
            for backend in backends:
                h = x.clone().requires_grad_(True)
                out = lf.pool(h, mode=mode, normalize=normalize, backend=backend, **kwargs)
                out.backward(grad_out)
                results[backend] = (out, h.grad)
            ref_out, ref_grad = results["torch"]
            for backend, (out, grad) in results.items():
                where = f"{backend} {layout} normalize={normalize}"
                assert out.dtype == torch.float32 and grad.dtype == dtype, where
                torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5, msg=lambda m: f"{where}: {m}")
                torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=1e-2, atol=1e-5,
                                           msg=lambda m: f"{where} grad: {m}")


@pytest.mark.parametrize("mode", ("mean", "weighted_mean", "last_token", "bos_token"))
def test_backends_vs_reference_cpu_dry_run(mode):
    """The GPU test's code path at tiny sizes on the CPU."""
    backends_vs_reference(torch.device("cpu"), mode, torch.bfloat16, batch=7, dim=40, max_len=30)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16, torch.float32), ids=str)
@pytest.mark.parametrize("mode", ("mean", "weighted_mean", "last_token", "bos_token"))
def test_gpu_backends_match_reference(mode, dtype):
    backends_vs_reference(torch.device("cuda"), mode, dtype, batch=64, dim=4096, max_len=1024)
