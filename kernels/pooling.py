"""Fused pooling in Triton: one pass over the hidden states, straight from the packed or padded layout.

A program owns one sequence (grid axis 0) and one slice of the hidden dim (axis 1) and walks the
sequence's tokens in BLOCK_T chunks, deriving each token's weight on the fly from the masks:
- mean: sum of pooled tokens / n;
- weighted_mean: sum of rank * h / (n (n + 1) / 2), rank = 1..n over the pooled tokens in order;
- last_token / bos_token: the last / first real token, found by a scan of the attention mask only.
No (B, S, D) intermediate exists. With normalize=True one program holds the whole row (BLOCK_D >= D)
so the L2 normalisation happens in the same kernel. Output and accumulation are float32.

The backward writes d hidden[t] = weight[t] * d pooled[seq(t)] for every token (zeros for padding and
unpooled tokens); the normalisation's gradient is applied to the (B, D) gradient beforehand.
"""
import triton
import triton.language as tl

MODE_MEAN, MODE_WEIGHTED_MEAN, MODE_LAST, MODE_BOS = 0, 1, 2, 3  # MODE >= 2 selects one token


@triton.jit
def _sequence_span(CU_SEQLENS, seq, padded_len, PACKED: tl.constexpr):
    """(first flat token, token count) of sequence ``seq``: packed from cu_seqlens, padded rows of S."""
    if PACKED:
        start = tl.load(CU_SEQLENS + seq)
        return start, tl.load(CU_SEQLENS + seq + 1) - start
    else:
        return seq * padded_len, padded_len


@triton.jit
def _flags(ATTENTION_MASK, EMBED_MASK, tokens, in_seq, HAS_ATTENTION_MASK: tl.constexpr,
           HAS_EMBED_MASK: tl.constexpr):
    """(real, pooled) per token of a chunk. Masks are int8, flat in token order like the hidden states."""
    real = in_seq
    if HAS_ATTENTION_MASK:
        real = real & (tl.load(ATTENTION_MASK + tokens, mask=in_seq, other=0) != 0)
    pooled = real
    if HAS_EMBED_MASK:
        pooled = pooled & (tl.load(EMBED_MASK + tokens, mask=in_seq, other=0) != 0)
    return real, pooled


@triton.jit
def _selected_token(ATTENTION_MASK, start, length, MODE: tl.constexpr, HAS_ATTENTION_MASK: tl.constexpr,
                    BLOCK_T: tl.constexpr):
    """Flat index of the last (MODE_LAST) or first (MODE_BOS) real token, or -1 if there is none."""
    if HAS_ATTENTION_MASK:
        last = -1
        first = length
        for chunk in range(0, length, BLOCK_T):
            positions = chunk + tl.arange(0, BLOCK_T)
            in_seq = positions < length
            real = in_seq & (tl.load(ATTENTION_MASK + start + positions, mask=in_seq, other=0) != 0)
            last = tl.maximum(last, tl.max(tl.where(real, positions, -1), 0))
            first = tl.minimum(first, tl.min(tl.where(real, positions, length), 0))
        if MODE == 2:
            chosen = last
        else:
            chosen = first
        return tl.where((chosen >= 0) & (chosen < length), start + chosen, -1)
    else:
        if MODE == 2:
            chosen = start + length - 1
        else:
            chosen = start
        return tl.where(length > 0, chosen, -1)


@triton.jit
def _pooled_count(ATTENTION_MASK, EMBED_MASK, start, length, HAS_ATTENTION_MASK: tl.constexpr,
                  HAS_EMBED_MASK: tl.constexpr, BLOCK_T: tl.constexpr):
    """n, the number of pooled tokens of a sequence (a scan of the masks only)."""
    if HAS_ATTENTION_MASK or HAS_EMBED_MASK:
        count = 0
        for chunk in range(0, length, BLOCK_T):
            positions = chunk + tl.arange(0, BLOCK_T)
            in_seq = positions < length
            _, pooled = _flags(ATTENTION_MASK, EMBED_MASK, start + positions, in_seq, HAS_ATTENTION_MASK,
                               HAS_EMBED_MASK)
            count += tl.sum(pooled.to(tl.int32), 0)
        return count
    else:
        return length


@triton.jit
def _pool_fwd(
    HIDDEN, OUT, CU_SEQLENS, ATTENTION_MASK, EMBED_MASK,
    padded_len, dim, stride_ht, stride_ob,
    MODE: tl.constexpr, PACKED: tl.constexpr, HAS_ATTENTION_MASK: tl.constexpr, HAS_EMBED_MASK: tl.constexpr,
    NORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    start, length = _sequence_span(CU_SEQLENS, seq, padded_len, PACKED)
    if MODE >= 2:
        token = _selected_token(ATTENTION_MASK, start, length, MODE, HAS_ATTENTION_MASK, BLOCK_T)
        acc = tl.load(HIDDEN + token.to(tl.int64) * stride_ht + dims, mask=dim_ok & (token >= 0), other=0.0)
        acc = acc.to(tl.float32)
    else:
        acc = tl.zeros([BLOCK_D], tl.float32)
        count = 0  # pooled tokens seen so far: the rank offset of the next chunk
        for chunk in range(0, length, BLOCK_T):
            positions = chunk + tl.arange(0, BLOCK_T)
            in_seq = positions < length
            tokens = start + positions
            _, pooled = _flags(ATTENTION_MASK, EMBED_MASK, tokens, in_seq, HAS_ATTENTION_MASK, HAS_EMBED_MASK)
            weight = pooled.to(tl.float32)
            if MODE == 1:
                weight = weight * (count + tl.cumsum(pooled.to(tl.int32), 0)).to(tl.float32)
            count += tl.sum(pooled.to(tl.int32), 0)
            h = tl.load(HIDDEN + tokens.to(tl.int64)[:, None] * stride_ht + dims[None, :],
                        mask=pooled[:, None] & dim_ok[None, :], other=0.0)
            acc += tl.sum(h.to(tl.float32) * weight[:, None], 0)
        n = count.to(tl.float32)
        if MODE == 0:
            acc = acc / tl.maximum(n, 1.0)
        else:
            acc = acc / tl.maximum(n * (n + 1.0) * 0.5, 1.0)
    if NORMALIZE:  # BLOCK_D covers the whole row here
        norm = tl.sqrt(tl.sum(acc * acc, 0))
        acc = acc / tl.maximum(norm, 1e-12)
    tl.store(OUT + seq * stride_ob + dims, acc, mask=dim_ok)


@triton.jit
def _pool_bwd(
    GRAD_OUT, GRAD_HIDDEN, CU_SEQLENS, ATTENTION_MASK, EMBED_MASK,
    padded_len, dim, stride_gb, stride_ght,
    MODE: tl.constexpr, PACKED: tl.constexpr, HAS_ATTENTION_MASK: tl.constexpr, HAS_EMBED_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    dims = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dim_ok = dims < dim
    start, length = _sequence_span(CU_SEQLENS, seq, padded_len, PACKED)
    grad = tl.load(GRAD_OUT + seq * stride_gb + dims, mask=dim_ok, other=0.0)
    if MODE >= 2:
        token = _selected_token(ATTENTION_MASK, start, length, MODE, HAS_ATTENTION_MASK, BLOCK_T)
        norm = 1.0
    else:
        token = -1
        n = _pooled_count(ATTENTION_MASK, EMBED_MASK, start, length, HAS_ATTENTION_MASK, HAS_EMBED_MASK,
                          BLOCK_T).to(tl.float32)
        if MODE == 0:
            norm = tl.maximum(n, 1.0)
        else:
            norm = tl.maximum(n * (n + 1.0) * 0.5, 1.0)
    count = 0
    for chunk in range(0, length, BLOCK_T):
        positions = chunk + tl.arange(0, BLOCK_T)
        in_seq = positions < length
        tokens = start + positions
        if MODE >= 2:
            weight = (tokens == token).to(tl.float32)
        else:
            _, pooled = _flags(ATTENTION_MASK, EMBED_MASK, tokens, in_seq, HAS_ATTENTION_MASK, HAS_EMBED_MASK)
            weight = pooled.to(tl.float32)
            if MODE == 1:
                weight = weight * (count + tl.cumsum(pooled.to(tl.int32), 0)).to(tl.float32)
            count += tl.sum(pooled.to(tl.int32), 0)
        value = (weight / norm)[:, None] * grad[None, :]
        tl.store(GRAD_HIDDEN + tokens.to(tl.int64)[:, None] * stride_ght + dims[None, :],
                 value.to(GRAD_HIDDEN.dtype.element_ty), mask=in_seq[:, None] & dim_ok[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers: the "triton" backend of llm2vec_fast.pool.
# ----------------------------------------------------------------------------------------------------
import torch  # noqa: E402

from ..reference.norm import l2_normalize_backward, l2_normalized  # noqa: E402
from .common import interpreting  # noqa: E402

MODES = {"mean": MODE_MEAN, "weighted_mean": MODE_WEIGHTED_MEAN, "last_token": MODE_LAST, "bos_token": MODE_BOS}
BLOCK_T = 16  # tokens per chunk
WHOLE_ROW_BLOCK_T = 2  # tokens per chunk when one program holds a whole (up to 16k wide) row
BLOCK_D = 256  # hidden-dim slice per program when the row need not be whole
MAX_WHOLE_ROW = 16384  # widest row one program holds (normalize=True); wider rows normalise afterwards
# One program per sequence leaves most of an H100's 132 SMs idle for small batches: below this many
# sequences the rows are pooled in D slices (B x D/BLOCK_D programs) and normalised afterwards (a
# (B, D) pass, small beside the hidden states). The interpreter always fuses, so tests cover both.
MIN_SEQUENCES_TO_FUSE_NORM = 256
NUM_WARPS = 4


def _layout(hidden, cu_seqlens, attention_mask, embed_mask):
    """(flat hidden (N, D), batch, padded_len, int8 masks or None) for both layouts."""
    if cu_seqlens is not None:
        return hidden, cu_seqlens.numel() - 1, 0, None, _int8(embed_mask)
    batch, seqlen, dim = hidden.shape
    return hidden.reshape(batch * seqlen, dim), batch, seqlen, _int8(attention_mask), _int8(embed_mask)


def _int8(mask):
    return None if mask is None else (mask != 0).to(torch.int8).reshape(-1).contiguous()


def _launch_options(mode, cu_seqlens, attention_mask, embed_mask, block_d):
    return dict(MODE=MODES[mode], PACKED=cu_seqlens is not None, HAS_ATTENTION_MASK=attention_mask is not None,
                HAS_EMBED_MASK=embed_mask is not None, BLOCK_T=BLOCK_T if block_d <= 1024 else WHOLE_ROW_BLOCK_T)


def forward(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    flat, batch, padded_len, am, em = _layout(hidden, cu_seqlens, attention_mask, embed_mask)
    flat = flat if flat.stride(-1) == 1 else flat.contiguous()
    dim = flat.shape[-1]
    out = torch.empty((batch, dim), device=hidden.device, dtype=torch.float32)
    if batch == 0 or dim == 0:
        return out
    fuse_norm = normalize and dim <= MAX_WHOLE_ROW and (interpreting() or batch >= MIN_SEQUENCES_TO_FUSE_NORM)
    block_d = triton.next_power_of_2(dim) if fuse_norm else min(BLOCK_D, triton.next_power_of_2(dim))
    cu = cu_seqlens if cu_seqlens is not None else out  # unused pointer in the padded layout
    _pool_fwd[(batch, triton.cdiv(dim, block_d))](
        flat, out, cu, am if am is not None else out, em if em is not None else out,
        padded_len, dim, flat.stride(0), out.stride(0),
        NORMALIZE=fuse_norm, BLOCK_D=block_d, num_warps=NUM_WARPS if block_d <= 1024 else 8,
        **_launch_options(mode, cu_seqlens, am, em, block_d))
    if normalize and not fuse_norm:
        out = l2_normalized(out)[0]
    return out


def backward(grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    grad = grad_out.float()
    if normalize:  # through x / max(|x|, eps), on the small (B, D) pooled rows (recomputed: one more read)
        pooled = forward(hidden, cu_seqlens, attention_mask, embed_mask, mode, False)
        grad = l2_normalize_backward(grad, *l2_normalized(pooled))
    grad = grad.contiguous()
    flat, batch, padded_len, am, em = _layout(hidden, cu_seqlens, attention_mask, embed_mask)
    grad_hidden = torch.empty_like(flat, memory_format=torch.contiguous_format)
    dim = flat.shape[-1]
    if batch and dim:
        block_d = min(BLOCK_D, triton.next_power_of_2(dim))
        cu = cu_seqlens if cu_seqlens is not None else grad
        _pool_bwd[(batch, triton.cdiv(dim, block_d))](
            grad, grad_hidden, cu, am if am is not None else grad, em if em is not None else grad,
            padded_len, dim, grad.stride(0), grad_hidden.stride(0),
            BLOCK_D=block_d, num_warps=NUM_WARPS, **_launch_options(mode, cu_seqlens, am, em, block_d))
    return grad_hidden.reshape(hidden.shape)


def AOT_CONFIGS():
    """The shipped launch shapes of both kernels (bf16, D = 4096): every mode, packed and padded with
    both masks; the forward also with the whole-row normalisation (the most registers)."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for name, mode in MODES.items():
        for packed in (True, False):
            for fn, normalize in ((_pool_fwd, False), (_pool_fwd, True), (_pool_bwd, None)):
                block_d = 4096 if normalize else BLOCK_D
                constexprs = dict(MODE=mode, PACKED=packed, HAS_ATTENTION_MASK=not packed, HAS_EMBED_MASK=True,
                                  BLOCK_T=BLOCK_T if block_d <= 1024 else WHOLE_ROW_BLOCK_T, BLOCK_D=block_d)
                if normalize is not None:
                    constexprs["NORMALIZE"] = normalize
                pointers = dict(HIDDEN="*bf16", OUT="*fp32", GRAD_OUT="*fp32", GRAD_HIDDEN="*bf16", CU_SEQLENS="*i32",
                                ATTENTION_MASK="*i8", EMBED_MASK="*i8")
                configs.append(KernelConfig(
                    fn, aot_signature(fn, pointers, constexprs), constexprs,
                    num_warps=8 if block_d > 1024 else NUM_WARPS, num_stages=2,
                    name=f"pool_{'fwd' if normalize is not None else 'bwd'}_{name}_{'packed' if packed else 'padded'}"
                         f"{'_normalize' if normalize else ''}"))
    return configs
