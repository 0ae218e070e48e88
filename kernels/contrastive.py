"""Tiled InfoNCE over cosine scores in Triton: the anchors x candidates score matrix never exists whole.

One direction of ``llm2vec_fast.contrastive_loss``: s[i, j] = scale * cos(a_i, c_j), the label of
anchor i is candidate ``label_offset + i``, loss_i = logsumexp_j s[i, j] - s[i, label_i].

Forward (one kernel): each program owns BLOCK_A anchors and streams every candidate tile, computing
the score tile as a K-loop over the embedding dim on the tensor cores and folding it into an online
logsumexp; the normalisation is fused as a scaling by precomputed inverse norms. Only per-row
statistics are written.

Backward: with embedding dims up to 4096 a (BLOCK x D) gradient accumulator does not fit on chip, so
the gradient products run as tensor-core GEMMs over score chunks that the Triton kernel recomputes:
    E = (softmax(s) - onehot(label)) * grad_row * scale    (recomputed per chunk from the saved lse)
    pass 1, row-parallel:    dU[rows]  = E @ unit(C)       for a chunk of anchor rows
    pass 2, column-parallel: dW[cols]  = E^T @ unit(A)     for a chunk of candidates
with unit(X) = X / max(|X|, eps) rounded to X's dtype, then both go through the normalisation's gradient.
(E scaled by the inverse norms instead overflows fp16 where a row is zero, 1/eps = 1e12: inf * 0 = NaN in
every other row's gradient.) Each output row is written once: no atomics, deterministic. The chunk
(CHUNK_ELEMENTS of E) bounds the workspace.
"""
import triton
import triton.language as tl

from .common import interpreting, mma, unit_last_dim

NORM_EPS = 1e-12


@triton.jit
def _inverse_norms(X, INV, rows, dim, stride_x, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """INV[i] = 1 / max(|x_i|, eps), accumulated in fp32."""
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row_ids < rows
    total = tl.zeros([BLOCK_R], tl.float32)
    for k in range(0, dim, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        x = tl.load(X + row_ids.to(tl.int64)[:, None] * stride_x + ks[None, :],
                    mask=row_ok[:, None] & (ks < dim)[None, :], other=0.0).to(tl.float32)
        total += tl.sum(x * x, 1)
    tl.store(INV + row_ids, 1.0 / tl.maximum(tl.sqrt(total), 1e-12), mask=row_ok)


@triton.jit
def _score_tile(A, C, rows, cols, row_ok, col_ok, dim, stride_a, stride_c,
                BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """Raw dot products a_rows . c_cols, (BLOCK_A, BLOCK_C) fp32: a K-loop over the embedding dim."""
    acc = tl.zeros([BLOCK_A, BLOCK_C], tl.float32)
    a_rows = rows.to(tl.int64)[:, None] * stride_a
    c_cols = cols.to(tl.int64)[None, :] * stride_c
    for k in range(0, dim, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        k_ok = ks < dim
        a = tl.load(A + a_rows + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        c_t = tl.load(C + c_cols + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_C)
        acc = mma(a, c_t, acc, IEEE, INTERPRET)
    return acc


@triton.jit
def _infonce_fwd(
    A, C, INV_A, INV_C, LOSS, LSE,
    n_anchors, n_candidates, dim, label_offset, scale, stride_a, stride_c,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    row_ok = rows < n_anchors
    inv_a = tl.load(INV_A + rows, mask=row_ok, other=0.0)
    labels = rows + label_offset
    running_max = tl.full([BLOCK_A], float("-inf"), tl.float32)  # base-2 units
    running_sum = tl.zeros([BLOCK_A], tl.float32)
    positive = tl.zeros([BLOCK_A], tl.float32)
    for start in range(0, n_candidates, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        col_ok = cols < n_candidates
        inv_c = tl.load(INV_C + cols, mask=col_ok, other=0.0)
        s = _score_tile(A, C, rows, cols, row_ok, col_ok, dim, stride_a, stride_c, BLOCK_A, BLOCK_C, BLOCK_K,
                        IEEE, INTERPRET)
        s = s * (inv_a[:, None] * inv_c[None, :] * scale)  # scale * cosine
        positive += tl.sum(tl.where(cols[None, :] == labels[:, None], s, 0.0), 1)
        s2 = tl.where(col_ok[None, :], s * 1.4426950408889634, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(s2, 1))
        running_sum = running_sum * tl.exp2(running_max - new_max) + tl.sum(tl.exp2(s2 - new_max[:, None]), 1)
        running_max = new_max
    lse = (running_max + tl.log2(running_sum)) / 1.4426950408889634
    tl.store(LSE + rows, lse, mask=row_ok)
    # Cross-entropy is >= 0; the base-2 round trip of the lse can leave it a rounding below the positive score.
    tl.store(LOSS + rows, tl.maximum(lse - positive, 0.0), mask=row_ok)


@triton.jit
def _infonce_grad_scores(
    A, C, INV_A, INV_C, LSE, GRAD_ROWS, E,
    row_start, row_stop, col_start, col_stop, dim, label_offset, scale, stride_a, stride_c, stride_e,
    TRANSPOSED: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, INTERPRET: tl.constexpr,
):
    """Writes a chunk of E (pass 1), or of E transposed (pass 2).

    The chunk covers anchors [row_start, row_stop) x candidates [col_start, col_stop); E's element
    (i, j) lands at (i - row_start, j - col_start), or (j - col_start, i - row_start) if TRANSPOSED.
    """
    rows = row_start + tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    cols = col_start + tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_ok = rows < row_stop
    col_ok = cols < col_stop
    inv_a = tl.load(INV_A + rows, mask=row_ok, other=0.0)
    inv_c = tl.load(INV_C + cols, mask=col_ok, other=0.0)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    grad_rows = tl.load(GRAD_ROWS + rows, mask=row_ok, other=0.0)
    s = _score_tile(A, C, rows, cols, row_ok, col_ok, dim, stride_a, stride_c, BLOCK_A, BLOCK_C, BLOCK_K,
                    IEEE, INTERPRET)
    s = s * (inv_a[:, None] * inv_c[None, :] * scale)
    probs = tl.exp2((s - lse[:, None]) * 1.4426950408889634)
    is_label = (cols[None, :] == (rows + label_offset)[:, None]).to(tl.float32)
    e = (probs - is_label) * (grad_rows * scale)[:, None]
    e = tl.where(row_ok[:, None] & col_ok[None, :], e, 0.0)
    local_rows = (rows - row_start).to(tl.int64)
    local_cols = (cols - col_start).to(tl.int64)
    if TRANSPOSED:
        offsets = local_cols[None, :] * stride_e + local_rows[:, None]
    else:
        offsets = local_rows[:, None] * stride_e + local_cols[None, :]
    tl.store(E + offsets, e.to(E.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _normalize_backward(X, GRAD_UNIT, INV, OUT, rows, dim, stride_x, stride_g, stride_o,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """OUT = (g - u (u . g)) * inv with u = x * inv: the gradient through x / max(|x|, eps).

    Where |x| <= eps (inv == 1/eps) the map is linear, x / eps, and OUT = g * inv.
    """
    row_ids = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = row_ids < rows
    inv = tl.load(INV + row_ids, mask=row_ok, other=0.0)
    rows64 = row_ids.to(tl.int64)[:, None]
    dot = tl.zeros([BLOCK_R], tl.float32)
    for k in range(0, dim, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < dim)[None, :]
        x = tl.load(X + rows64 * stride_x + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GRAD_UNIT + rows64 * stride_g + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(x * g, 1)
    radial = tl.where(inv < 1e12, dot * inv * inv, 0.0)  # (u . g) * inv, with u = x * inv
    for k in range(0, dim, BLOCK_K):
        ks = k + tl.arange(0, BLOCK_K)
        mask = row_ok[:, None] & (ks < dim)[None, :]
        x = tl.load(X + rows64 * stride_x + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        g = tl.load(GRAD_UNIT + rows64 * stride_g + ks[None, :], mask=mask, other=0.0).to(tl.float32)
        out = (g - x * radial[:, None]) * inv[:, None]
        tl.store(OUT + rows64 * stride_o + ks[None, :], out.to(OUT.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers: the "triton" backend of llm2vec_fast.contrastive_loss (one direction).
# ----------------------------------------------------------------------------------------------------
import torch  # noqa: E402

# (BLOCK_A, BLOCK_C, BLOCK_K, num_warps, num_stages) for the score-tile kernels on a GPU.
GPU_CONFIG = (128, 128, 64, 8, 3)
GPU_CONFIG_FP32 = (64, 64, 32, 8, 2)
INTERPRETER_CONFIG = (32, 32, 32, 4, 1)
CHUNK_ELEMENTS = 1 << 26  # E chunk: 64 Mi elements (128 MiB in bf16) of recomputed gradient scores
ROW_BLOCK, DIM_BLOCK = 16, 128  # the row-wise norm kernels


def _config(dtype):
    if interpreting():
        return INTERPRETER_CONFIG
    return GPU_CONFIG_FP32 if dtype == torch.float32 else GPU_CONFIG


def inverse_norms(x):
    rows, dim = x.shape
    inv = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows:
        _inverse_norms[(triton.cdiv(rows, ROW_BLOCK),)](x, inv, rows, dim, x.stride(0), BLOCK_R=ROW_BLOCK,
                                                         BLOCK_K=DIM_BLOCK)
    return inv


def forward(anchors, candidates, label_offset, scale):
    """Returns (row_loss (A,) float32, lse (A,) float32)."""
    a, c = unit_last_dim(anchors), unit_last_dim(candidates)
    n_anchors, dim = a.shape
    loss = torch.empty(n_anchors, device=a.device, dtype=torch.float32)
    lse = torch.empty_like(loss)
    if n_anchors == 0:
        return loss, lse
    block_a, block_c, block_k, warps, stages = _config(a.dtype)
    _infonce_fwd[(triton.cdiv(n_anchors, block_a),)](
        a, c, inverse_norms(a), inverse_norms(c), loss, lse, n_anchors, c.shape[0], dim, label_offset, scale,
        a.stride(0), c.stride(0), BLOCK_A=block_a, BLOCK_C=block_c, BLOCK_K=block_k,
        IEEE=a.dtype == torch.float32, INTERPRET=interpreting(), num_warps=warps, num_stages=stages)
    return loss, lse


def backward(grad_rows, anchors, candidates, lse, label_offset, scale):
    """(grad_anchors, grad_candidates) in the inputs' dtypes; see the module docstring."""
    a, c = unit_last_dim(anchors), unit_last_dim(candidates)
    n_anchors, dim = a.shape
    n_candidates = c.shape[0]
    grad_rows = grad_rows.float().contiguous()
    inv_a, inv_c = inverse_norms(a), inverse_norms(c)
    block_a, block_c, block_k, warps, stages = _config(a.dtype)
    options = dict(BLOCK_A=block_a, BLOCK_C=block_c, BLOCK_K=block_k, IEEE=a.dtype == torch.float32,
                   INTERPRET=interpreting(), num_warps=warps, num_stages=stages)
    grad_unit_a = torch.empty_like(a)
    grad_unit_c = torch.empty_like(c)

    def grad_scores(rows, cols, transposed):
        (r0, r1), (c0, c1) = rows, cols
        shape = (c1 - c0, r1 - r0) if transposed else (r1 - r0, c1 - c0)
        e = torch.empty(shape, device=a.device, dtype=a.dtype)
        _infonce_grad_scores[(triton.cdiv(r1 - r0, block_a), triton.cdiv(c1 - c0, block_c))](
            a, c, inv_a, inv_c, lse, grad_rows, e, r0, r1, c0, c1, dim, label_offset, scale,
            a.stride(0), c.stride(0), e.stride(0), TRANSPOSED=transposed, **options)
        return e

    unit_a, unit_c = _unit_rows(a, inv_a), _unit_rows(c, inv_c)

    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(n_candidates, 1))
    for r0 in range(0, n_anchors, rows_per_chunk):  # pass 1: dU, a chunk of anchor rows at a time
        r1 = min(r0 + rows_per_chunk, n_anchors)
        torch.mm(grad_scores((r0, r1), (0, n_candidates), False), unit_c, out=grad_unit_a[r0:r1])
    cols_per_chunk = max(1, CHUNK_ELEMENTS // max(n_anchors, 1))
    for c0 in range(0, n_candidates, cols_per_chunk):  # pass 2: dW, a chunk of candidates at a time
        c1 = min(c0 + cols_per_chunk, n_candidates)
        torch.mm(grad_scores((0, n_anchors), (c0, c1), True), unit_a, out=grad_unit_c[c0:c1])
    return _through_norm(a, grad_unit_a, inv_a), _through_norm(c, grad_unit_c, inv_c)


def _unit_rows(x, inv):
    """x / max(|x|, eps) in x's dtype (the product taken in float32 and rounded once, no float32 copy of x)."""
    return torch.mul(x, inv[:, None], out=torch.empty_like(x))


def _through_norm(x, grad_unit, inv):
    out = torch.empty_like(x)
    rows, dim = x.shape
    if rows:
        _normalize_backward[(triton.cdiv(rows, ROW_BLOCK),)](
            x, grad_unit, inv, out, rows, dim, x.stride(0), grad_unit.stride(0), out.stride(0),
            BLOCK_R=ROW_BLOCK, BLOCK_K=DIM_BLOCK)
    return out


def AOT_CONFIGS():
    """The score-tile kernels in bf16 and fp32 at their shipped tiles, and the row-wise norm kernels.
    fp32 inputs take full-fp32 ("ieee") products, which Hopper's tensor cores do not offer (wgmma's fp32
    path is tf32), so only the bf16/fp16 configs must show wgmma."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for dtype, (block_a, block_c, block_k, warps, stages) in (("bf16", GPU_CONFIG), ("fp32", GPU_CONFIG_FP32)):
        pointers = dict(A=f"*{dtype}", C=f"*{dtype}", E=f"*{dtype}", INV_A="*fp32", INV_C="*fp32", LOSS="*fp32",
                        LSE="*fp32", GRAD_ROWS="*fp32")
        tiles = dict(BLOCK_A=block_a, BLOCK_C=block_c, BLOCK_K=block_k, IEEE=dtype == "fp32", INTERPRET=False)
        variants = [(_infonce_fwd, "fwd", {})] + [
            (_infonce_grad_scores, f"grad_scores{'_t' if transposed else ''}", dict(TRANSPOSED=transposed))
            for transposed in (False, True)]
        for fn, label, flags in variants:
            constexprs = dict(tiles, **flags)
            configs.append(KernelConfig(fn, aot_signature(fn, pointers, constexprs, floats=("scale",)), constexprs,
                                        num_warps=warps, num_stages=stages, matrix=dtype != "fp32",
                                        name=f"infonce_{label}_{dtype}_a{block_a}c{block_c}k{block_k}"))
    norm_pointers = dict(X="*bf16", INV="*fp32", GRAD_UNIT="*bf16", OUT="*bf16")
    for fn in (_inverse_norms, _normalize_backward):
        constexprs = dict(BLOCK_R=ROW_BLOCK, BLOCK_K=DIM_BLOCK)
        configs.append(KernelConfig(fn, aot_signature(fn, norm_pointers, constexprs), constexprs, num_warps=4,
                                    num_stages=2, name=f"infonce{fn.__name__}_bf16"))
    return configs
