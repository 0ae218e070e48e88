"""The LoRA term of a linear in bandwidth-bound Triton passes: ``lora_linear``'s triton backend.

peft computes ``(result + B(A(dropout(x.to(A's dtype)))) * scaling).to(result's dtype)`` with
``result = x @ W^T + bias``. With a float32 adapter on a bf16 model (peft's autocast) that moves a float32
copy of x, the dropout mask and x after dropout, a float32 (T, out) B output, its scaled copy and the
promoted sum; its backward casts the (T, out) gradient to float32 and scales it, and writes the branch's
gradient of x in float32 before rounding it. Here the rank-r side is kept in registers:

forward (after the base linear, cuBLAS):
- ``_lora_down``: h = dropout(x) @ A^T, x read once in its own dtype and widened in registers, the dropout
  mask drawn in registers (philox, the same (seed, row, column) in the backward), into a (T, r) float32 h;
- ``_lora_up_add``: result += scaling * (h @ B^T), in place: each (T, out) element read and written once,
  the product scaled, added, then rounded to the result's dtype, as peft rounds.
backward (after the base linear's dx = g @ W, cuBLAS):
- ``_lora_down`` again: dh = scaling * (g @ B), g read once (B's (out, r) read as A^T through its strides);
- ``_lora_grad_b``: dB = scaling * g^T @ h, g read a second time, split over the rows into float32 partials
  that the host sums (no atomics: the same bits every run);
- ``_lora_grad_x_a``: dx += (mask * (dh @ A) / (1 - p)) rounded to x's dtype, in place, then rounded again
  (peft rounds the branch's gradient to x's dtype and autograd adds it to the base's), and
  dA = dh^T @ dropout(x) from the same tile of x, the mask regenerated: x read once more, dx read and written.
The rank is small (r <= MAX_RANK), so every pass is bandwidth bound and its products stay on the FMA units in
float32 (IEEE); ``llm2vec_fast.reference.lora`` is the formula they are tested against.
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import dropout_keep, interpreting, mma, unit_last_dim

MAX_RANK = 64  # h's row stays in registers: a (BLOCK_T, BLOCK_R) float32 tile (128 spills in lora_up_add)
BLOCK_K = 64    # _lora_down, _lora_grad_x_a (up to rank 32): the slice of x's row (and of A's columns) per step
BLOCK_T_DOWN = 64
BLOCK_T_UP = 64  # _lora_up_add: the rows of the (rows, output columns) tile a program owns
BLOCK_T_GRAD = 64  # _lora_grad_b, _lora_grad_x_a: the rows per step of a program's share of the rows
BLOCK_O_GRAD = 64  # _lora_grad_b: the output columns a program owns
# The weight gradients reduce over the rows: each column tile's rows are split over several programs (partials
# summed on the host) so that narrow layers still fill the GPU: about two waves of an H100's 132 SMs.
TARGET_PROGRAMS = 264


def _block_o(block_r: int) -> int:
    """_lora_up_add's output columns per tile: 128, or 64 from rank 64 on (the product's operands spill at 128)."""
    return 128 if block_r <= 32 else 64


def _block_k_grad(block_r: int) -> int:
    """_lora_grad_x_a's input columns per program: 64, or 32 from rank 64 on (the (r, k) tiles spill at 64)."""
    return BLOCK_K if block_r <= 32 else BLOCK_K // 2


@triton.jit
def _lora_down(X, A, H, seed, dropout_p, scale, n_rows, n_in, rank, stride_x, stride_ar, stride_ak, stride_h,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DROPOUT: tl.constexpr,
               INTERPRET: tl.constexpr):
    # h = scale * dropout(x) @ A^T. A program owns BLOCK_T rows of x and all r columns of h; it walks x's row
    # (and A's columns) BLOCK_K at a time. A's element (r, k) is at r * stride_ar + k * stride_ak: A itself
    # (r, in) in the forward, B (out, r) read as B^T in the backward.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T x in can pass 2**31
    ranks = tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < n_rows, ranks < rank
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(seed, 0, rows[:, None].to(tl.int32), cols[None, :], dropout_p)
            x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
        a_t = tl.load(A + ranks[None, :] * stride_ar + cols[:, None] * stride_ak,
                      mask=col_ok[:, None] & rank_ok[None, :], other=0.0).to(tl.float32)  # A^T's (BLOCK_K, BLOCK_R)
        acc = mma(x, a_t, acc, True, INTERPRET)
    tl.store(H + rows[:, None] * stride_h + ranks[None, :], acc * scale, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_up_add(OUT, H, B, n_rows, n_out, rank, stride_out, stride_h, stride_b, scale,
                 BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    # A program owns a (BLOCK_T, BLOCK_O) tile of the output: the whole rank-r product in one step.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    ranks = tl.arange(0, BLOCK_R)
    row_ok, out_ok, rank_ok = rows < n_rows, outs < n_out, ranks < rank
    h = tl.load(H + rows[:, None] * stride_h + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    # B^T's (BLOCK_R, BLOCK_O) tile: B is (out, r)
    b_t = tl.load(B + outs[None, :] * stride_b + ranks[:, None], mask=rank_ok[:, None] & out_ok[None, :],
                  other=0.0).to(tl.float32)
    delta = mma(h, b_t, tl.zeros((BLOCK_T, BLOCK_O), dtype=tl.float32), True, INTERPRET) * scale
    tile = rows[:, None] * stride_out + outs[None, :]
    tile_ok = row_ok[:, None] & out_ok[None, :]
    result = tl.load(OUT + tile, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(OUT + tile, (result + delta).to(OUT.dtype.element_ty), mask=tile_ok)


@triton.jit
def _lora_grad_b(G, H, PARTIAL, n_rows, n_out, rank, stride_g, stride_h, rows_per_split,
                 BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    # PARTIAL[split] = g[rows of the split]^T @ h[same rows]: a program owns BLOCK_O output columns and one split
    # of the rows (rows_per_split, a multiple of BLOCK_T), and walks it BLOCK_T rows at a time.
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    out_ok, rank_ok = outs < n_out, ranks < rank
    first = split.to(tl.int64) * rows_per_split
    acc = tl.zeros((BLOCK_O, BLOCK_R), dtype=tl.float32)
    for start in range(first, tl.minimum(first + rows_per_split, n_rows), BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        g = tl.load(G + rows[:, None] * stride_g + outs[None, :], mask=row_ok[:, None] & out_ok[None, :],
                    other=0.0).to(tl.float32)
        h = tl.load(H + rows[:, None] * stride_h + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                    other=0.0)
        acc = mma(tl.trans(g), h, acc, True, INTERPRET)
    partial = PARTIAL + split.to(tl.int64) * n_out * rank  # PARTIAL is (splits, out, r), contiguous
    tl.store(partial + outs[:, None] * rank + ranks[None, :], acc, mask=out_ok[:, None] & rank_ok[None, :])


@triton.jit
def _lora_grad_x_a(DH, A, X, DX, PARTIAL, seed, dropout_p, n_rows, n_in, rank, stride_dh, stride_a, stride_x,
                   stride_dx, rows_per_split, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   DROPOUT: tl.constexpr, WRITE_DX: tl.constexpr, INTERPRET: tl.constexpr):
    # A program owns BLOCK_K input columns and one split of the rows. Per BLOCK_T rows: the branch's gradient of
    # dropout(x), dh @ A, through the dropout mask into dx (in place; where x needs a gradient: WRITE_DX), and
    # PARTIAL[split] += dh^T @ dropout(x).
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    split = tl.program_id(1)
    ranks = tl.arange(0, BLOCK_R)
    col_ok, rank_ok = cols < n_in, ranks < rank
    a = tl.load(A + ranks[:, None] * stride_a + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :],
                other=0.0).to(tl.float32)  # (BLOCK_R, BLOCK_K): read once, used for every row
    first = split.to(tl.int64) * rows_per_split
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for start in range(first, tl.minimum(first + rows_per_split, n_rows), BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        row_ok = rows < n_rows
        tile_ok = row_ok[:, None] & col_ok[None, :]
        dh = tl.load(DH + rows[:, None] * stride_dh + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :],
                     other=0.0)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = dropout_keep(seed, 0, rows[:, None].to(tl.int32), cols[None, :], dropout_p)
            x = tl.where(keep, x * (1.0 / (1.0 - dropout_p)), 0.0)
        if WRITE_DX:
            grad = mma(dh, a, tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32), True, INTERPRET)
            if DROPOUT:
                grad = tl.where(keep, grad * (1.0 / (1.0 - dropout_p)), 0.0)
            tile = DX + rows[:, None] * stride_dx + cols[None, :]
            base = tl.load(tile, mask=tile_ok, other=0.0).to(tl.float32)
            # peft rounds the branch's gradient to x's dtype (its cast's backward); autograd then adds the base's
            branch = grad.to(DX.dtype.element_ty).to(tl.float32)
            tl.store(tile, (base + branch).to(DX.dtype.element_ty), mask=tile_ok)
        acc = mma(tl.trans(dh), x, acc, True, INTERPRET)
    partial = PARTIAL + split.to(tl.int64) * rank * n_in  # PARTIAL is (splits, r, in), contiguous
    tl.store(partial + ranks[:, None] * n_in + cols[None, :], acc, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit
def _dropout_mask_kernel(MASK, seed, dropout_p, n_rows, n_cols, BLOCK: tl.constexpr):
    # The keep mask the kernels above draw, for tests: MASK is (rows, cols) int8, contiguous.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = dropout_keep(seed, 0, rows[:, None].to(tl.int32), cols[None, :], dropout_p)
    tl.store(MASK + rows[:, None] * n_cols + cols[None, :], keep.to(tl.int8),
             mask=(rows < n_rows)[:, None] & (cols < n_cols)[None, :])


def _block_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest side is 16


def lora_down(x: torch.Tensor, a: torch.Tensor, scale: float = 1.0, dropout_p: float = 0.0, seed: int = 0,
              transposed: bool = False) -> torch.Tensor:
    """scale * dropout(x (T, k)) @ a^T in float32: (T, r) float32. ``a`` is (r, k), or (k, r) where ``transposed``."""
    x = unit_last_dim(x)
    rank = a.shape[1] if transposed else a.shape[0]
    stride_ar, stride_ak = (a.stride(1), a.stride(0)) if transposed else (a.stride(0), a.stride(1))
    rows, width = x.shape
    h = torch.empty((rows, rank), device=x.device, dtype=torch.float32)
    if rows:
        _lora_down[(triton.cdiv(rows, BLOCK_T_DOWN),)](
            x, a, h, seed, float(dropout_p), float(scale), rows, width, rank, x.stride(0), stride_ar, stride_ak,
            h.stride(0), BLOCK_T=BLOCK_T_DOWN, BLOCK_K=BLOCK_K, BLOCK_R=_block_rank(rank), DROPOUT=dropout_p > 0,
            INTERPRET=interpreting(), num_warps=4, enable_fp_fusion=False)
    return h


def lora_up_add_(out: torch.Tensor, h: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """out (T, o) += scale * (h (T, r) @ b (o, r)^T), in place (out's rows unit-strided); returns out."""
    if out.stride(-1) != 1:
        raise ValueError(f"out must have unit stride in its last dim, got strides {tuple(out.stride())}")
    h, b = unit_last_dim(h.float()), unit_last_dim(b)
    rows, width = out.shape
    rank = h.shape[1]
    if rows and width:
        block_r = _block_rank(rank)
        grid = (triton.cdiv(rows, BLOCK_T_UP), triton.cdiv(width, _block_o(block_r)))
        _lora_up_add[grid](out, h, b, rows, width, rank, out.stride(0), h.stride(0), b.stride(0), float(scale),
                           BLOCK_T=BLOCK_T_UP, BLOCK_O=_block_o(block_r), BLOCK_R=block_r,
                           INTERPRET=interpreting(), num_warps=8, enable_fp_fusion=False)
    return out


def _row_splits(rows: int, column_tiles: int):
    """(splits, rows per split) for a reduction over ``rows``: enough programs to fill the GPU, each split a
    whole number of BLOCK_T_GRAD-row steps."""
    steps = max(1, triton.cdiv(rows, BLOCK_T_GRAD))
    splits = max(1, min(steps, triton.cdiv(TARGET_PROGRAMS, column_tiles)))
    per_split = triton.cdiv(steps, splits)
    return triton.cdiv(steps, per_split), per_split * BLOCK_T_GRAD


def _grad_b(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """g (T, o)^T @ h (T, r) in float32: (o, r)."""
    rows, width = g.shape
    rank = h.shape[1]
    tiles = triton.cdiv(width, BLOCK_O_GRAD)
    splits, per_split = _row_splits(rows, tiles)
    partial = torch.zeros((splits, width, rank), device=g.device, dtype=torch.float32)
    if rows and width:
        _lora_grad_b[(tiles, splits)](g, h, partial, rows, width, rank, g.stride(0), h.stride(0), per_split,
                                      BLOCK_T=BLOCK_T_GRAD, BLOCK_O=BLOCK_O_GRAD, BLOCK_R=_block_rank(rank),
                                      INTERPRET=interpreting(), num_warps=4, enable_fp_fusion=False)
    return partial.sum(0)


def _grad_x_a_(dx, dh: torch.Tensor, a: torch.Tensor, x: torch.Tensor, dropout_p: float,
               seed: int) -> torch.Tensor:
    """dx (T, in) += the branch's gradient of x, in place (dx None: not computed); returns dh (T, r)^T @ dropout(x)
    (r, in) in float32."""
    a = unit_last_dim(a)
    rows, width = x.shape
    rank = a.shape[0]
    block_r = _block_rank(rank)
    tiles = triton.cdiv(width, _block_k_grad(block_r))
    splits, per_split = _row_splits(rows, tiles)
    partial = torch.zeros((splits, rank, width), device=x.device, dtype=torch.float32)
    if rows and width:
        _lora_grad_x_a[(tiles, splits)](
            dh, a, x, x if dx is None else dx, partial, seed, float(dropout_p), rows, width, rank, dh.stride(0),
            a.stride(0), x.stride(0), 0 if dx is None else dx.stride(0), per_split, BLOCK_T=BLOCK_T_GRAD,
            BLOCK_K=_block_k_grad(block_r), BLOCK_R=block_r, DROPOUT=dropout_p > 0, WRITE_DX=dx is not None,
            INTERPRET=interpreting(), num_warps=8, enable_fp_fusion=False)
    return partial.sum(0)


def dropout_mask(rows: int, cols: int, dropout_p: float, seed: int, device) -> torch.Tensor:
    """The (rows, cols) bool keep mask the kernels draw for x with ``seed`` (for tests and the reference)."""
    mask = torch.empty((rows, cols), dtype=torch.int8, device=device)
    block = 32
    if rows and cols:
        _dropout_mask_kernel[(triton.cdiv(rows, block), triton.cdiv(cols, block))](
            mask, seed, float(dropout_p), rows, cols, BLOCK=block)
    return mask.bool()


def forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed):
    """``lora_linear``'s forward: (out, h), h = dropout(x) @ A^T in float32 (T, r), kept for the backward."""
    if lora_a.shape[0] > MAX_RANK:  # beyond the registers' tile: the reference (its own dropout draws)
        from ..reference.lora import lora_linear_forward
        return lora_linear_forward(x, weight, bias, lora_a, lora_b, scale, dropout_p, seed)
    out = F.linear(x, weight, bias)
    h = lora_down(x.reshape(-1, x.shape[-1]), lora_a, dropout_p=dropout_p, seed=seed)
    lora_up_add_(out.view(-1, out.shape[-1]), h, lora_b, scale)
    return out, h


def backward(grad, x, weight, lora_a, lora_b, h, scale, dropout_p, seed, need_dx=True):
    """``lora_linear``'s backward: (dx, dA, dB); dx is an empty tensor unless ``need_dx``."""
    if lora_a.shape[0] > MAX_RANK:
        from ..reference.lora import lora_linear_backward
        return lora_linear_backward(grad, x, weight, lora_a, lora_b, h, scale, dropout_p, seed, need_dx=need_dx)
    rows = unit_last_dim(x.reshape(-1, x.shape[-1]))
    g = unit_last_dim(grad.reshape(-1, grad.shape[-1]))
    dx = g.mm(weight) if need_dx else None  # the base linear's, cuBLAS; the branch's is added to it in place
    dh = lora_down(g, lora_b, scale=scale, transposed=True)  # scale * g @ B
    grad_b = (_grad_b(g, h) * scale).to(lora_b.dtype)
    grad_a = _grad_x_a_(dx, dh, lora_a, rows, dropout_p, seed).to(lora_a.dtype)
    return (dx.view(x.shape) if need_dx else x.new_empty(0)), grad_a, grad_b


def AOT_CONFIGS():
    """Every kernel for a bf16 model with a float32 adapter (peft's autocast) and with a bf16 one, at ranks 16
    (llm2vec's recipes) and MAX_RANK, with dropout where a kernel draws it. Their products are float32 IEEE on
    the FMA units by design (K or N is the rank, or the rank-wide weight gradients' partials), so they are not
    matrix=True (no wgmma expected)."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for adapter in ("fp32", "bf16"):
        for rank in (16, MAX_RANK):
            block_r = _block_rank(rank)
            for fn, pointers, block, warps, name in (
                    (_lora_down, dict(X="*bf16", A=f"*{adapter}", H="*fp32"),
                     dict(BLOCK_T=BLOCK_T_DOWN, BLOCK_K=BLOCK_K, DROPOUT=True), 4, "down"),
                    (_lora_up_add, dict(OUT="*bf16", H="*fp32", B=f"*{adapter}"),
                     dict(BLOCK_T=BLOCK_T_UP, BLOCK_O=_block_o(block_r)), 8, "up_add"),
                    (_lora_grad_b, dict(G="*bf16", H="*fp32", PARTIAL="*fp32"),
                     dict(BLOCK_T=BLOCK_T_GRAD, BLOCK_O=BLOCK_O_GRAD), 4, "grad_b"),
                    (_lora_grad_x_a, dict(DH="*fp32", A=f"*{adapter}", X="*bf16", DX="*bf16", PARTIAL="*fp32"),
                     dict(BLOCK_T=BLOCK_T_GRAD, BLOCK_K=_block_k_grad(block_r), DROPOUT=True, WRITE_DX=True), 8,
                     "grad_x_a"),
                    (_lora_grad_x_a, dict(DH="*fp32", A=f"*{adapter}", X="*bf16", DX="*bf16", PARTIAL="*fp32"),
                     dict(BLOCK_T=BLOCK_T_GRAD, BLOCK_K=_block_k_grad(block_r), DROPOUT=True, WRITE_DX=False), 8,
                     "grad_a")):
                if name == "grad_b" and adapter == "bf16":
                    continue  # reads no adapter weight: one config per rank
                constexprs = dict(block, BLOCK_R=block_r, INTERPRET=False)
                signature = aot_signature(fn, pointers, constexprs, floats=("scale", "dropout_p"), int64=("seed",))
                configs.append(KernelConfig(fn, signature, constexprs, num_warps=warps, num_stages=1,
                                            name=f"lora_{name}_bf16_{adapter}_r{rank}"))
    return configs
