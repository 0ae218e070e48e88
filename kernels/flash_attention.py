"""Flash attention for packed (varlen) batches in Triton: forward and backward, GQA, softcap, dropout,
sliding windows.

Layout: q (T, Hq, D), k/v (T, Hkv, D), int32 cu_seqlens (B+1); lse (Hq, T) float32, natural log.
Every program works inside one sequence (grid axis 1) and one head (axis 2), with its tiles aligned to
the sequence's own start, so a sequence's result never depends on its neighbours in the pack
(batch invariance), provided the block shape along the reduction (BLOCK_N in the forward) is the same:
the autotune configs of one head dim therefore all share BLOCK_N.

Forward: online softmax in base 2 (log2(e) folded into the scale), the logsumexp saved for the
backward. Backward (no atomics, deterministic): a preprocess computes delta = rowsum(dO * O); one
kernel owns a block of keys of one KV head and loops over the G query heads of its group and all query
blocks to accumulate dK and dV; a separate kernel owns a block of queries and accumulates dQ.

Dropout keeps P[h, i, j] when philox(seed; key j, query token i, head h) >= p, so the backward
regenerates the forward's mask. With dropout_p == 0 the DROPOUT branch is compiled out.

Sliding window (WINDOW, ``window`` = w >= 1): query i sees key j only where |i - j| < w (and j <= i when
causal; Mistral's, Gemma2's and Gemma3's sliding layers made symmetric). Every kernel visits only the
tiles a block's window reaches, so the cost grows with w, not with the sequence: the forward masks the
tiles on the window's two edges and runs the tiles that every row of the block sees without a mask.

Precision: fp16/bf16 tiles go to the tensor cores with fp32 accumulation; fp32 inputs use full-fp32
("ieee") dots, not tf32. Softmax statistics are fp32 throughout.
"""
import triton
import triton.language as tl

from .common import dropout_keep, interpreting, mma, unit_last_dim

LOG2E = 1.4426950408889634


@triton.jit
def _softcap(x, softcap):
    """softcap * tanh(x / softcap), with tanh from exp2 (the interpreter has no libdevice)."""
    y = x / softcap
    e = tl.exp2(-2.0 * 1.4426950408889634 * tl.abs(y))  # exp(-2|y|) in (0, 1]: never overflows
    t = (1.0 - e) / (1.0 + e)
    return softcap * tl.where(y < 0, -t, t)


@triton.jit
def _scores_to_log2(s, scale, softcap, SOFTCAP: tl.constexpr):
    """Raw q.k -> (logits in base-2 units, capped logits in natural units for the softcap gradient)."""
    if SOFTCAP:
        capped = _softcap(s * scale, softcap)
        return capped * 1.4426950408889634, capped
    else:
        return s * (scale * 1.4426950408889634), s


@triton.jit
def _sequence_span(CU_SEQLENS, seq):
    """(first token, length) of packed sequence ``seq``."""
    start = tl.load(CU_SEQLENS + seq)
    return start, tl.load(CU_SEQLENS + seq + 1) - start


@triton.jit
def _in_window(rows, cols, window):
    """|row - col| < window, broadcast over the tile, as one unsigned compare (fewer registers):
    -window < row - col < window  <=>  0 <= row - col + window - 1 < 2 * window - 1."""
    return (rows - cols + (window - 1)).to(tl.uint32) < (2 * window - 1).to(tl.uint32)


@triton.jit
def _key_range(first_row, seqlen, window, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               WINDOW: tl.constexpr):
    """[lo, end): the keys that the query block starting at ``first_row`` can see, lo on a BLOCK_N tile edge
    (tiles start at multiples of BLOCK_N from the sequence's start, whatever the block)."""
    lo = 0
    end = seqlen
    if CAUSAL:
        end = tl.minimum(seqlen, first_row + BLOCK_M)
    if WINDOW:
        lo = (tl.maximum(first_row - window + 1, 0) // BLOCK_N) * BLOCK_N  # the tile of the first row's first key
        end = tl.minimum(end, first_row + BLOCK_M + window - 1)  # past the last row's last key
    return lo, end


@triton.jit
def _attn_fwd_tiles(acc, m_i, l_i, q, K, V, start, seqlen, rows, tokens, dims, kv_head, head, seed, scale, softcap,
                    dropout_p, window, stride_kt, stride_kh, stride_vt, stride_vh, lo, hi, gap_lo, gap_hi,
                    MASKED: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                    SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr, IEEE: tl.constexpr,
                    INTERPRET: tl.constexpr):
    """Online softmax over the key tiles [lo, gap_lo) and then [gap_hi, hi) of one query block (one loop,
    so that a window's two masked edges cost one copy of the loop's registers); MASKED adds the
    key-padding, causal and window masks, which tiles wholly inside the sequence, below the diagonal and
    inside every row's window do not need."""
    dim_ok = dims < HEAD_DIM
    gap = gap_hi - gap_lo  # a multiple of BLOCK_N
    for tile_start in range(lo, hi - gap, BLOCK_N):
        block_start = tile_start
        if MASKED:  # past the gap: continue from its end
            block_start = tile_start + tl.where(tile_start >= gap_lo, gap, 0)
        cols = block_start + tl.arange(0, BLOCK_N)
        key_tokens = (start + cols).to(tl.int64)
        k_ptrs = K + key_tokens[None, :] * stride_kt + kv_head * stride_kh + dims[:, None]  # K^T: (BLOCK_D, BLOCK_N)
        v_ptrs = V + key_tokens[:, None] * stride_vt + kv_head * stride_vh + dims[None, :]
        if MASKED:
            col_ok = cols < seqlen
            k_t = tl.load(k_ptrs, mask=col_ok[None, :] & dim_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        elif HEAD_DIM == BLOCK_D:
            k_t = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k_t = tl.load(k_ptrs, mask=dim_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=dim_ok[None, :], other=0.0)
        s = mma(q, k_t, tl.zeros([q.shape[0], BLOCK_N], tl.float32), IEEE, INTERPRET)
        s, _ = _scores_to_log2(s, scale, softcap, SOFTCAP)
        if MASKED:
            keep = col_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[None, :] <= rows[:, None])
            if WINDOW:
                keep = keep & _in_window(rows[:, None], cols[None, :], window)
            s = tl.where(keep, s, float("-inf"))
        # Without a window every row sees a real key in the block's first tile (key 0 <= row under causal),
        # so the running max is finite from the first tile on. With one, a row's window may start past the
        # first tiles: there subtract 0 instead of -inf (its p and l stay 0), never exp2(-inf - -inf). The
        # running max itself stays -inf: were it 0, a later tile's scores below -126 (base 2) would all
        # underflow against it.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_subtracted = m_new
        if WINDOW and MASKED:
            m_subtracted = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_subtracted)
        p = tl.exp2(s - m_subtracted[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            kept = dropout_keep(seed, head, tokens[:, None].to(tl.int32), cols[None, :], dropout_p)
            p = tl.where(kept, p * (1.0 / (1.0 - dropout_p)), 0.0)
        acc = mma(p.to(v.dtype), v, acc, IEEE, INTERPRET)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, CU_SEQLENS,
    seed, scale, softcap, dropout_p, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh, stride_lh,
    group, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):
    block_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start, seqlen = _sequence_span(CU_SEQLENS, seq)
    if block_m * BLOCK_M >= seqlen:  # the grid covers max_seqlen; shorter sequences stop early
        return
    kv_head = head // group  # GQA: the G = Hq/Hkv query heads of a group read the same K/V head

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)  # positions inside the sequence
    dims = tl.arange(0, BLOCK_D)  # BLOCK_D is HEAD_DIM rounded up to a power of two (80, 96 -> 128)
    row_ok = rows < seqlen
    dim_ok = dims < HEAD_DIM
    tokens = (start + rows).to(tl.int64)  # row index into the packed (T, H, D) tensors
    q = tl.load(Q + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running row sum of exp2(s - m_i), before dropout
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key tiles in two phases, each in ascending order (batch invariance: every bound below is a position
    # inside the sequence): first the tiles that need no mask [unmasked_start, unmasked_end) (every key
    # real, under causal at or before every row of this block, inside every row's window), then the rest
    # with masks, as one loop over [lo, end) that skips the first phase's tiles: a window's left edge, then
    # its right edge, the causal diagonal and the sequence's last partial tile. Without a window the left
    # edge is empty. One masked loop, not one per edge: with softcap, dropout and a window, two masked
    # copies spilled registers on Hopper under triton 3.6.
    first_row = block_m * BLOCK_M
    lo, end = _key_range(first_row, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    unmasked_end = (seqlen // BLOCK_N) * BLOCK_N
    if CAUSAL:
        unmasked_end = tl.minimum(unmasked_end, ((first_row + 1) // BLOCK_N) * BLOCK_N)
    unmasked_start = lo
    if WINDOW:
        # Tiles every row sees whole: start >= (last row) - window + 1 and start + BLOCK_N <= first row + window.
        unmasked_start = tl.minimum(tl.cdiv(tl.maximum(first_row + BLOCK_M - window, lo), BLOCK_N) * BLOCK_N, end)
        unmasked_end = tl.maximum(unmasked_start, tl.minimum(unmasked_end, ((first_row + window) // BLOCK_N) * BLOCK_N))
    acc, m_i, l_i = _attn_fwd_tiles(acc, m_i, l_i, q, K, V, start, seqlen, rows, tokens, dims, kv_head, head, seed,
                                    scale, softcap, dropout_p, window, stride_kt, stride_kh, stride_vt, stride_vh,
                                    unmasked_start, unmasked_end, unmasked_end, unmasked_end, False, HEAD_DIM, BLOCK_D,
                                    BLOCK_N, CAUSAL, SOFTCAP, DROPOUT, WINDOW, IEEE, INTERPRET)
    acc, m_i, l_i = _attn_fwd_tiles(acc, m_i, l_i, q, K, V, start, seqlen, rows, tokens, dims, kv_head, head, seed,
                                    scale, softcap, dropout_p, window, stride_kt, stride_kh, stride_vt, stride_vh,
                                    lo, end, unmasked_start, unmasked_end, True, HEAD_DIM, BLOCK_D, BLOCK_N, CAUSAL,
                                    SOFTCAP, DROPOUT, WINDOW, IEEE, INTERPRET)

    if WINDOW:  # the block's rows past the sequence's end may reach no key: keep them finite (never stored)
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_i[:, None]
    tl.store(O + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :], acc.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dim_ok[None, :])
    lse = (m_i + tl.log2(l_i)) / 1.4426950408889634  # back to natural log
    tl.store(LSE + head * stride_lh + tokens, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA, total, stride_ot, stride_oh, stride_dot, stride_doh, stride_deltah,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32): the softmax backward's row term."""
    head = tl.program_id(1)
    tokens = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    mask = (tokens < total)[:, None] & (dims < HEAD_DIM)[None, :]
    o = tl.load(O + tokens[:, None] * stride_ot + head * stride_oh + dims[None, :], mask=mask, other=0.0)
    do = tl.load(DO + tokens[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + head * stride_deltah + tokens, delta, mask=tokens < total)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, CU_SEQLENS,
    seed, scale, softcap, dropout_p, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lh,
    group, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr, BLOCK_DOUT: tl.constexpr,
):
    """One block of keys of one KV head: dK, dV summed over its query heads and every query block.

    Works on transposed score tiles (keys x queries) so that dV = P^T dO and dK = dS^T Q need no
    transposes of the big operands. A program writes BLOCK_DOUT of the head dim's columns of dK and dV
    (grid axis 2 = KV head x column slice): for head dim 256 two programs share a key block, each
    recomputing the scores, so that their two fp32 accumulators fit in registers.
    """
    block_n = tl.program_id(0)
    seq = tl.program_id(1)
    kv_head = tl.program_id(2) // (BLOCK_D // BLOCK_DOUT)
    out_dims = (tl.program_id(2) % (BLOCK_D // BLOCK_DOUT)) * BLOCK_DOUT + tl.arange(0, BLOCK_DOUT)
    start, seqlen = _sequence_span(CU_SEQLENS, seq)
    if block_n * BLOCK_N >= seqlen:
        return

    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)  # key positions inside the sequence
    dims = tl.arange(0, BLOCK_D)
    col_ok = cols < seqlen
    dim_ok = dims < HEAD_DIM
    key_tokens = (start + cols).to(tl.int64)
    kv_mask = col_ok[:, None] & dim_ok[None, :]
    k = tl.load(K + key_tokens[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + key_tokens[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
    out_dim_ok = out_dims < HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_DOUT], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DOUT], tl.float32)

    first_row = 0
    rows_end = seqlen
    if CAUSAL:  # queries before this key block never see it
        first_row = (block_n * BLOCK_N // BLOCK_M) * BLOCK_M
    if WINDOW:  # nor do queries farther than the window from all its keys
        first_row = tl.maximum(first_row, (tl.maximum(block_n * BLOCK_N - window + 1, 0) // BLOCK_M) * BLOCK_M)
        rows_end = tl.minimum(seqlen, block_n * BLOCK_N + BLOCK_N + window - 1)
    for g in range(0, group):
        head = kv_head * group + g
        for row_start in range(first_row, rows_end, BLOCK_M):
            rows = row_start + tl.arange(0, BLOCK_M)
            row_ok = rows < seqlen
            tokens = (start + rows).to(tl.int64)
            q_mask = row_ok[:, None] & dim_ok[None, :]
            q = tl.load(Q + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=q_mask, other=0.0)
            do = tl.load(DO + tokens[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=q_mask,
                         other=0.0)
            if BLOCK_DOUT == BLOCK_D:
                q_out = q
                do_out = do
            else:  # the columns of Q and dO this program's dK and dV slices need
                out_mask = row_ok[:, None] & out_dim_ok[None, :]
                q_out = tl.load(Q + tokens[:, None] * stride_qt + head * stride_qh + out_dims[None, :], mask=out_mask,
                                other=0.0)
                do_out = tl.load(DO + tokens[:, None] * stride_dot + head * stride_doh + out_dims[None, :],
                                 mask=out_mask, other=0.0)
            lse = tl.load(LSE + head * stride_lh + tokens, mask=row_ok, other=0.0) * 1.4426950408889634
            delta = tl.load(DELTA + head * stride_lh + tokens, mask=row_ok, other=0.0)

            s_t = mma(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE, INTERPRET)
            s_t, capped_t = _scores_to_log2(s_t, scale, softcap, SOFTCAP)
            # P^T, recomputed from the saved lse. No padding mask (fewer registers): a padding key (k = v = 0)
            # feeds only its own dK/dV rows, which are never stored, and a padding query (q = dO = 0,
            # lse = delta = 0) has p = 1, dp = 0 and ds = 0, so it adds exactly 0 to every key.
            p_t = tl.exp2(s_t - lse[None, :])
            if CAUSAL:
                p_t = tl.where(cols[:, None] <= rows[None, :], p_t, 0.0)
            if WINDOW:
                p_t = tl.where(_in_window(rows[None, :], cols[:, None], window), p_t, 0.0)
            dp_t = mma(v, tl.trans(do), tl.zeros([BLOCK_N, BLOCK_M], tl.float32), IEEE, INTERPRET)  # (dO V^T)^T
            p_dropped_t = p_t
            if DROPOUT:
                kept = dropout_keep(seed, head, tokens[None, :].to(tl.int32), cols[:, None], dropout_p)
                p_dropped_t = tl.where(kept, p_t * (1.0 / (1.0 - dropout_p)), 0.0)
                dp_t = tl.where(kept, dp_t * (1.0 / (1.0 - dropout_p)), 0.0)
            dv = mma(p_dropped_t.to(do.dtype), do_out, dv, IEEE, INTERPRET)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - (capped_t / softcap) * (capped_t / softcap))
            dk = mma(ds_t.to(q.dtype), q_out, dk, IEEE, INTERPRET)

    dk = dk * scale
    out_mask = col_ok[:, None] & out_dim_ok[None, :]
    tl.store(DK + key_tokens[:, None] * stride_dkt + kv_head * stride_dkh + out_dims[None, :],
             dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + key_tokens[:, None] * stride_dvt + kv_head * stride_dvh + out_dims[None, :],
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, CU_SEQLENS,
    seed, scale, softcap, dropout_p, window,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_lh,
    group, seqlen_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, DROPOUT: tl.constexpr, WINDOW: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One block of queries of one head: dQ = scale * dS K over every key block."""
    block_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start, seqlen = _sequence_span(CU_SEQLENS, seq)
    if block_m * BLOCK_M >= seqlen:
        return
    kv_head = head // group

    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen
    dim_ok = dims < HEAD_DIM
    tokens = (start + rows).to(tl.int64)
    q_mask = row_ok[:, None] & dim_ok[None, :]
    q = tl.load(Q + tokens[:, None] * stride_qt + head * stride_qh + dims[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + tokens[:, None] * stride_dot + head * stride_doh + dims[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + head * stride_lh + tokens, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + head * stride_lh + tokens, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    lo, end = _key_range(block_m * BLOCK_M, seqlen, window, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    for block_start in range(lo, end, BLOCK_N):
        cols = block_start + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen
        key_tokens = (start + cols).to(tl.int64)
        kv_mask = col_ok[:, None] & dim_ok[None, :]
        k = tl.load(K + key_tokens[:, None] * stride_kt + kv_head * stride_kh + dims[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + key_tokens[:, None] * stride_vt + kv_head * stride_vh + dims[None, :], mask=kv_mask, other=0.0)
        s = mma(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, INTERPRET)
        s, capped = _scores_to_log2(s, scale, softcap, SOFTCAP)
        keep = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None])
        if WINDOW:
            keep = keep & _in_window(rows[:, None], cols[None, :], window)
        p = tl.where(keep, tl.exp2(s - lse[:, None]), 0.0)
        dp = mma(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], tl.float32), IEEE, INTERPRET)
        if DROPOUT:
            kept = dropout_keep(seed, head, tokens[:, None].to(tl.int32), cols[None, :], dropout_p)
            dp = tl.where(kept, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - (capped / softcap) * (capped / softcap))
        dq = mma(ds.to(k.dtype), k, dq, IEEE, INTERPRET)

    dq = dq * scale
    tl.store(DQ + tokens[:, None] * stride_dqt + head * stride_dqh + dims[None, :], dq.to(DQ.dtype.element_ty),
             mask=q_mask)


@triton.jit
def _dropout_mask_kernel(MASK, CU_SEQLENS, seed, dropout_p, stride_mh, stride_mt,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Writes the keep mask the attention kernels draw, (Hq, T, max_seqlen) int8: for tests/oracles."""
    block_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    start, seqlen = _sequence_span(CU_SEQLENS, seq)
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tokens = (start + rows).to(tl.int64)
    for block_start in range(0, seqlen, BLOCK_N):
        cols = block_start + tl.arange(0, BLOCK_N)
        kept = dropout_keep(seed, head, tokens[:, None].to(tl.int32), cols[None, :], dropout_p)
        tl.store(MASK + head * stride_mh + tokens[:, None] * stride_mt + cols[None, :], kept.to(tl.int8),
                 mask=(rows < seqlen)[:, None] & (cols < seqlen)[None, :])


# ----------------------------------------------------------------------------------------------------
# Launchers: pure functions on tensors, the "triton" backend of llm2vec_fast.flash_attention.
# ----------------------------------------------------------------------------------------------------
import torch  # noqa: E402

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per BLOCK_D (head dim rounded up to a power of two). Every
# config here compiles for sm_90 without register spills, within shared memory, and (bf16/fp16) to
# wgmma, plain and with softcap + dropout (+ window), under CI's triton and under the GPU machine's 3.6
# (CI's aot_check runs both); configs that spilled under either were dropped or given more warps.
# All forward configs of one BLOCK_D share BLOCK_N: the order of the softmax reduction must not depend
# on which config the autotuner picks, or batch invariance would break across seqlen buckets.
FORWARD_CONFIGS = {
    64: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 8, 2)],
    256: [(128, 32, 8, 2)],
}
FORWARD_CONFIGS_FP32 = {64: [(32, 32, 4, 1)], 128: [(16, 16, 4, 1)], 256: [(16, 16, 4, 1)]}
# The dK/dV kernel holds two (BLOCK_N x D) fp32 accumulators; for D = 256 each program owns half the
# columns (DKDV_MAX_OUTPUT_COLUMNS), so its tables match D = 128's.
DKDV_MAX_OUTPUT_COLUMNS = 128
DKDV_CONFIGS = {
    64: [(32, 64, 4, 2), (32, 128, 8, 2)],
    128: [(16, 64, 8, 2), (32, 64, 8, 2)],  # (16, 64, 4, 2) dropped: 254 registers, spilled with a window
    256: [(16, 64, 8, 2)],
}
DKDV_CONFIGS_FP32 = {64: [(32, 32, 8, 1)], 128: [(32, 32, 8, 1)], 256: [(16, 32, 8, 1)]}
DQ_CONFIGS = {
    64: [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
    128: [(64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    256: [(128, 32, 8, 2)],
}
DQ_CONFIGS_FP32 = {64: [(32, 32, 4, 1)], 128: [(32, 16, 4, 1)], 256: [(16, 16, 4, 1)]}
# The CPU interpreter runs one fixed config (autotuning there would only measure numpy).
INTERPRETER_BLOCK = 32
AUTOTUNE_KEY = ["seqlen_bucket", "group", "HEAD_DIM", "CAUSAL", "SOFTCAP", "DROPOUT", "WINDOW", "IEEE"]


def _configs(table, block_d):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table[block_d]]


_TUNED = {}


def _kernel(kernel, tables, block_d: int, fp32: bool):
    """The kernel to launch and the launch options it still needs: autotuned on a GPU, fixed when
    interpreting."""
    if interpreting():
        return kernel, {"BLOCK_M": INTERPRETER_BLOCK, "BLOCK_N": INTERPRETER_BLOCK, "num_warps": 4}
    key = (kernel, block_d, fp32)
    if key not in _TUNED:
        _TUNED[key] = triton.autotune(_configs(tables[fp32], block_d), key=AUTOTUNE_KEY)(kernel)
    return _TUNED[key], {}


def _seqlen_bucket(max_seqlen: int) -> int:
    """Autotune key: the next power of two, so a new max_seqlen does not retune (or recompile)."""
    return triton.next_power_of_2(max(int(max_seqlen), 16))


def _flags(q, head_dim, causal, softcap, dropout_p, window):
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), CAUSAL=bool(causal),
                SOFTCAP=softcap > 0, DROPOUT=dropout_p > 0, WINDOW=window > 0, IEEE=q.dtype == torch.float32,
                INTERPRET=interpreting())


def forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed, window=0):
    """Returns (out (T, Hq, D) like q, lse (Hq, T) float32). ``window`` > 0: |i - j| < window only."""
    q, k, v = (unit_last_dim(x) for x in (q, k, v))
    total, hq, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    out = q.new_empty(q.shape)
    lse = torch.empty((hq, total), device=q.device, dtype=torch.float32)
    if total == 0 or max_seqlen == 0:
        return out, lse
    flags = _flags(q, head_dim, causal, softcap, dropout_p, window)
    kernel, fixed = _kernel(_attn_fwd, {False: FORWARD_CONFIGS, True: FORWARD_CONFIGS_FP32}, flags["BLOCK_D"],
                            flags["IEEE"])
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch, hq)  # noqa: E731
    kernel[grid](q, k, v, out, lse, cu_seqlens, seed, softmax_scale, softcap, dropout_p, window,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 out.stride(0), out.stride(1), lse.stride(0), hq // k.shape[1], _seqlen_bucket(max_seqlen),
                 **flags, **fixed)
    return out, lse


def backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed,
             window=0, dlse=None):
    """Returns (dq, dk, dv) in the inputs' dtypes; deterministic (no atomics). ``dlse`` (Hq, T): the gradient
    with respect to the lse output, when a loss uses it."""
    dout, q, k, v, out = (unit_last_dim(x) for x in (dout, q, k, v, out))
    total, hq, head_dim = q.shape
    batch = cu_seqlens.numel() - 1
    dq, dk, dv = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    if total == 0 or max_seqlen == 0:
        return dq, dk, dv
    flags = _flags(q, head_dim, causal, softcap, dropout_p, window)
    block_d = flags["BLOCK_D"]
    delta = torch.empty_like(lse)
    block_t = 64
    _attn_bwd_preprocess[(triton.cdiv(total, block_t), hq)](
        out, dout, delta, total, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1), delta.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_T=block_t)
    if dlse is not None:  # d lse_i / d s_ij = P_ij: dS = P * (dP - (delta - dlse))
        delta.sub_(dlse)
    group = hq // k.shape[1]
    bucket = _seqlen_bucket(max_seqlen)
    kernel, fixed = _kernel(_attn_bwd_dkdv, {False: DKDV_CONFIGS, True: DKDV_CONFIGS_FP32}, block_d, flags["IEEE"])
    block_dout = min(block_d, DKDV_MAX_OUTPUT_COLUMNS)
    column_slices = block_d // block_dout
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_N"]), batch, k.shape[1] * column_slices)  # noqa: E731
    kernel[grid](q, k, v, dout, lse, delta, dk, dv, cu_seqlens, seed, softmax_scale, softcap, dropout_p, window,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
                 lse.stride(0), group, bucket, BLOCK_DOUT=block_dout, **flags, **fixed)
    kernel, fixed = _kernel(_attn_bwd_dq, {False: DQ_CONFIGS, True: DQ_CONFIGS_FP32}, block_d, flags["IEEE"])
    grid = lambda meta: (triton.cdiv(max_seqlen, meta["BLOCK_M"]), batch, hq)  # noqa: E731
    kernel[grid](q, k, v, dout, lse, delta, dq, cu_seqlens, seed, softmax_scale, softcap, dropout_p, window,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), group, bucket,
                 **flags, **fixed)
    return dq, dk, dv


def dropout_mask(cu_seqlens, max_seqlen: int, num_heads: int, dropout_p: float, seed: int):
    """The keep mask the kernels use, as a bool tensor (Hq, T, max_seqlen): key j of query token t's
    sequence is kept where mask[h, t, j]. For tests and oracles."""
    total = int(cu_seqlens[-1].item())
    mask = torch.zeros((num_heads, total, max(max_seqlen, 1)), device=cu_seqlens.device, dtype=torch.int8)
    if total:
        block = INTERPRETER_BLOCK
        _dropout_mask_kernel[(triton.cdiv(max_seqlen, block), cu_seqlens.numel() - 1, num_heads)](
            mask, cu_seqlens, seed, dropout_p, mask.stride(0), mask.stride(1), BLOCK_M=block, BLOCK_N=block)
    return mask.bool()


def AOT_CONFIGS():
    """Every shipped config, compiled for sm_90 in CI (llm2vec_fast.tools.aot_check): each autotune
    config of each kernel in bf16, plain and with softcap + dropout (the most registers), the fp32
    configs, and head dims 80/96 and fp16 on the first config of each list. fp32 takes full-fp32 FMA
    products (Hopper's tensor cores offer fp32 only as tf32), so only bf16/fp16 must show wgmma."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    kernels = ((_attn_fwd, "fwd", {False: FORWARD_CONFIGS, True: FORWARD_CONFIGS_FP32}),
               (_attn_bwd_dkdv, "dkdv", {False: DKDV_CONFIGS, True: DKDV_CONFIGS_FP32}),
               (_attn_bwd_dq, "dq", {False: DQ_CONFIGS, True: DQ_CONFIGS_FP32}))
    cases = []  # (dtype, head_dim, softcap+dropout, first config only, sliding window)
    for block_d in (64, 128, 256):
        cases += [("bf16", block_d, False, False, False), ("bf16", block_d, True, False, False),
                  ("fp32", block_d, True, False, False), ("bf16", block_d, True, False, True)]
    cases += [("bf16", 80, False, True, False), ("bf16", 96, True, True, False), ("fp16", 128, False, True, False)]
    configs = []
    for fn, label, tables in kernels:
        for dtype, head_dim, extras, first_only, windowed in cases:
            block_d = triton.next_power_of_2(head_dim)
            table = tables[dtype == "fp32"][block_d]
            for block_m, block_n, warps, stages in table[:1] if first_only else table:
                constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=False,
                                  SOFTCAP=extras, DROPOUT=extras, WINDOW=windowed, IEEE=dtype == "fp32",
                                  INTERPRET=False)
                if fn is _attn_bwd_dkdv:
                    constexprs["BLOCK_DOUT"] = min(block_d, DKDV_MAX_OUTPUT_COLUMNS)
                pointers = {name: f"*{dtype}" for name in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
                pointers.update(LSE="*fp32", DELTA="*fp32", CU_SEQLENS="*i32")
                signature = aot_signature(fn, pointers, constexprs, floats=("scale", "softcap", "dropout_p"),
                                          int64=("seed",))
                configs.append(KernelConfig(
                    fn, signature, constexprs, num_warps=warps, num_stages=stages, matrix=dtype != "fp32",
                    name=f"attn_{label}_{dtype}_d{head_dim}_m{block_m}n{block_n}w{warps}s{stages}"
                         f"{'_softcap_dropout' if extras else ''}{'_window' if windowed else ''}"))
    constexprs = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_T=64)
    configs.append(KernelConfig(_attn_bwd_preprocess, aot_signature(
        _attn_bwd_preprocess, {"O": "*bf16", "DO": "*bf16", "DELTA": "*fp32"}, constexprs), constexprs,
        num_warps=4, num_stages=1, name="attn_bwd_preprocess_bf16_d128"))
    return configs
