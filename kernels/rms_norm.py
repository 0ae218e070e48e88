"""Fused RMSNorm in Triton: one read of x and one write of y per row, forward and backward.

Forward: a program owns a tile of BLOCK_R whole rows (D in registers, BLOCK_D >= D; BLOCK_R = 1 at hidden
sizes, more for narrow rows such as Qwen3's and Gemma3's per-head q/k norms): rstd = rsqrt(mean(x^2) + eps)
and y as ``llm2vec_fast.reference.rms_norm`` defines it (``GEMMA``: the float32 product rounded once; else
n rounded to x's dtype before the weight multiplies it). rstd (float32, one per row) is saved for the backward.

Backward: a program owns a contiguous run of rows, walked a tile at a time. Per row it writes
dx = rstd * (g - n * mean(g * n)), g = dy * (offset + w), and it accumulates its rows' dy * n into a float32
partial dw; the partials (one row per program) are summed afterwards, so no atomics (deterministic).
Rows of more than MAX_D values run on the torch reference.
"""
import torch
import triton
import triton.language as tl

from llm2vec_fast.reference.rms_norm import rms_norm_backward, rms_norm_forward

from .common import unit_last_dim

# The whole row lives in registers. Wider rows (a 405B-class hidden 16384) spill in the backward at 16 warps
# and 32 warps cap a thread at 64 registers: those run on the reference.
MAX_D = 8192
BACKWARD_PROGRAMS_PER_SM = 4
BACKWARD_PROGRAMS_CPU = 8  # the interpreter has no SMs: a few programs, so that partial dw sums are tested
TILE_ELEMENTS = 2048  # narrow rows share a program: BLOCK_R = TILE_ELEMENTS // BLOCK_D rows (1 from D = 2048)


def _tile(dim: int):
    """(BLOCK_R, BLOCK_D, num_warps) for rows of ``dim`` values: at most 16 tile values per thread and tensor
    (the backward holds five such tensors at once)."""
    block_d = triton.next_power_of_2(dim)
    block_r = max(1, TILE_ELEMENTS // block_d)
    elements = block_r * block_d
    return block_r, block_d, 4 if elements <= 2048 else 8 if elements <= 4096 else 16


@triton.jit
def _rms_norm_fwd(X, W, Y, RSTD, n_rows, n_cols, stride_x, stride_y, eps, offset,
                  GEMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # A tile of BLOCK_R whole rows (one row at hidden sizes; several for narrow rows such as q/k norms).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: rows x D can pass 2**31
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    tile_ok = row_ok[:, None] & (cols < n_cols)[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, 1) / n_cols + eps)
    normed = x * rstd[:, None]
    if not GEMMA:  # llama: n is rounded to x's dtype before the weight multiplies it
        normed = normed.to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + rows[:, None] * stride_y + cols[None, :], (normed * w[None, :]).to(Y.dtype.element_ty),
             mask=tile_ok)
    tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def _rms_norm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, n_rows, n_cols, rows_per_program,
                  stride_dy, stride_x, stride_dx, offset,
                  GEMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    # A program walks its run of rows (rows_per_program, a multiple of BLOCK_R) a tile at a time.
    program = tl.program_id(0).to(tl.int64)  # int64 row indices: rows x D can pass 2**31 elements
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < n_cols
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32) + offset
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    first = program * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for tile in range(first, last, BLOCK_R):
        rows = tile + tl.arange(0, BLOCK_R)
        row_ok = rows < last
        tile_ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)  # 0 on rows past the run: they add nothing
        normed = x * rstd[:, None]
        if GEMMA:
            dw += tl.sum(dy * normed, 0)
        else:  # the weight multiplied n rounded to x's dtype
            dw += tl.sum(dy * normed.to(X.dtype.element_ty).to(tl.float32), 0)
        grad_normed = dy * w[None, :]
        row_term = tl.sum(grad_normed * normed, 1) / n_cols
        dx = rstd[:, None] * (grad_normed - normed * row_term[:, None])
        tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=tile_ok)
    tl.store(DW_PARTIAL + program * BLOCK_D + cols, dw, mask=col_ok)


def forward(x, weight, eps, offset, casting_mode):
    """x (N, D), weight (D,) -> (y like x, rstd (N,) float32)."""
    rows, dim = x.shape
    if dim > MAX_D:
        return rms_norm_forward(x, weight, eps, offset, casting_mode)
    x, weight = unit_last_dim(x), weight.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows and dim:
        block_r, block_d, warps = _tile(dim)
        _rms_norm_fwd[(triton.cdiv(rows, block_r),)](
            x, weight, y, rstd, rows, dim, x.stride(0), y.stride(0), float(eps), float(offset),
            GEMMA=casting_mode == "gemma", BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return y, rstd


def backward(grad_y, x, weight, rstd, eps, offset, casting_mode):
    """(dx like x, dw like weight)."""
    rows, dim = x.shape
    if dim > MAX_D:
        return rms_norm_backward(grad_y, x, weight, rstd, eps, offset, casting_mode)
    grad_y, x, weight = unit_last_dim(grad_y), unit_last_dim(x), weight.contiguous()
    grad_x = torch.empty_like(x, memory_format=torch.contiguous_format)
    if not rows or not dim:
        return grad_x, torch.zeros_like(weight)
    block_r, block_d, warps = _tile(dim)
    if x.is_cuda:
        programs = torch.cuda.get_device_properties(x.device).multi_processor_count * BACKWARD_PROGRAMS_PER_SM
    else:
        programs = BACKWARD_PROGRAMS_CPU
    tiles = triton.cdiv(rows, block_r)
    programs = min(programs, tiles)
    rows_per_program = triton.cdiv(tiles, programs) * block_r  # whole tiles per program
    programs = triton.cdiv(rows, rows_per_program)
    partial = torch.empty((programs, block_d), device=x.device, dtype=torch.float32)
    _rms_norm_bwd[(programs,)](grad_y, x, weight, rstd, grad_x, partial, rows, dim, rows_per_program,
                               grad_y.stride(0), x.stride(0), grad_x.stride(0), float(offset),
                               GEMMA=casting_mode == "gemma", BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return grad_x, partial[:, :dim].sum(0).to(weight.dtype)


def AOT_CONFIGS():
    """Both kernels in both casting modes, bf16, at the row widths that matter: a head dim (Qwen3's q/k
    norms, 128), the 7B-class hidden sizes (<= 4096) and the widest (MAX_D, 70B-class); fp32 too."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for dtype, widths in (("bf16", (128, 4096, MAX_D)), ("fp32", (4096, MAX_D))):
        for width in widths:
            for gemma in (False, True):
                for fn, direction in ((_rms_norm_fwd, "fwd"), (_rms_norm_bwd, "bwd")):
                    block_r, block_d, warps = _tile(width)
                    constexprs = dict(GEMMA=gemma, BLOCK_R=block_r, BLOCK_D=block_d)
                    pointers = dict(X=f"*{dtype}", Y=f"*{dtype}", DY=f"*{dtype}", DX=f"*{dtype}", W=f"*{dtype}",
                                    RSTD="*fp32", DW_PARTIAL="*fp32")
                    signature = aot_signature(fn, pointers, constexprs, floats=("eps", "offset"))
                    configs.append(KernelConfig(
                        fn, signature, constexprs, num_warps=warps, num_stages=1,
                        name=f"rms_norm_{direction}_{'gemma' if gemma else 'llama'}_{dtype}_d{width}"))
    return configs
