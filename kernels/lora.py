"""The LoRA term of a linear without gradients, in two bandwidth-bound Triton passes (encoding with an adapter).

peft computes ``result + B(A(x.to(A's dtype))) * scaling`` (the sum in the promoted dtype, then rounded to
the result's dtype). With a float32 adapter on a bf16 model that moves a float32 copy of x, a float32
(T, out) B output, its scaled copy and the promoted sum. Here:
- ``lora_down``: h = x @ A^T, x read once in its own dtype and widened in registers, float32 products
  (IEEE, not tf32) into a (T, r) float32 h;
- ``lora_up_add_``: result += scaling * (h @ B^T), in place: each (T, out) element is read and written once,
  the product scaled, then added, then rounded to the result's dtype, as peft rounds (only the order of the
  r-term sum differs from cuBLAS's).
The rank is small (r <= MAX_RANK), so both are bandwidth bound and their products stay on the FMA units in
float32; ``llm2vec_fast.reference.lora`` is the formula they are tested against.
"""
import torch
import triton
import triton.language as tl

from .common import interpreting, mma, unit_last_dim

MAX_RANK = 64  # h's row stays in registers: a (BLOCK_T, BLOCK_R) float32 tile (128 spills in lora_up_add)
BLOCK_K = 64    # lora_down: the slice of x's row (and of A's columns) per step
BLOCK_T_DOWN = 64
BLOCK_T_UP = 64  # lora_up_add_: the rows of the (rows, output columns) tile a program owns


def _block_o(block_r: int) -> int:
    """lora_up_add_'s output columns per tile: 128, or 64 from rank 64 on (the product's operands spill at 128)."""
    return 128 if block_r <= 32 else 64


@triton.jit
def _lora_down(X, A, H, n_rows, n_in, rank, stride_x, stride_a, stride_h,
               BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INTERPRET: tl.constexpr):
    # A program owns BLOCK_T rows of x and all r columns of h; it walks x's row (and A's columns) BLOCK_K at a time.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # int64: T x in can pass 2**31
    ranks = tl.arange(0, BLOCK_R)
    row_ok, rank_ok = rows < n_rows, ranks < rank
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for start in range(0, n_in, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < n_in
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        # A^T's (BLOCK_K, BLOCK_R) tile: A is (r, in), row r holding the r-th down-projection
        a_t = tl.load(A + ranks[None, :] * stride_a + cols[:, None], mask=col_ok[:, None] & rank_ok[None, :],
                      other=0.0).to(tl.float32)
        acc = mma(x, a_t, acc, True, INTERPRET)
    tl.store(H + rows[:, None] * stride_h + ranks[None, :], acc, mask=row_ok[:, None] & rank_ok[None, :])


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


def _block_rank(rank: int) -> int:
    return max(16, triton.next_power_of_2(rank))  # tl.dot's smallest side is 16


def lora_down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """x (T, in) @ a (r, in)^T in float32: (T, r) float32."""
    x, a = unit_last_dim(x), unit_last_dim(a)
    rows, width = x.shape
    rank = a.shape[0]
    h = torch.empty((rows, rank), device=x.device, dtype=torch.float32)
    if rows:
        _lora_down[(triton.cdiv(rows, BLOCK_T_DOWN),)](
            x, a, h, rows, width, rank, x.stride(0), a.stride(0), h.stride(0), BLOCK_T=BLOCK_T_DOWN,
            BLOCK_K=BLOCK_K, BLOCK_R=_block_rank(rank), INTERPRET=interpreting(), num_warps=4,
            enable_fp_fusion=False)
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


def AOT_CONFIGS():
    """Both kernels for a bf16 model with a float32 adapter (peft's autocast) and with a bf16 one, at ranks 16
    (llm2vec's recipes) and MAX_RANK. Their products are float32 IEEE on the FMA units by design (K or N is the
    rank), so they are not matrix=True (no wgmma expected)."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for adapter in ("fp32", "bf16"):
        for rank in (16, MAX_RANK):
            block_r = _block_rank(rank)
            for fn, pointers, block, warps, name in (
                    (_lora_down, dict(X="*bf16", A=f"*{adapter}", H="*fp32"),
                     dict(BLOCK_T=BLOCK_T_DOWN, BLOCK_K=BLOCK_K), 4, "down"),
                    (_lora_up_add, dict(OUT="*bf16", H="*fp32", B=f"*{adapter}"),
                     dict(BLOCK_T=BLOCK_T_UP, BLOCK_O=_block_o(block_r)), 8, "up_add")):
                constexprs = dict(block, BLOCK_R=block_r, INTERPRET=False)
                signature = aot_signature(fn, pointers, constexprs, floats=("scale",))
                configs.append(KernelConfig(fn, signature, constexprs, num_warps=warps, num_stages=1,
                                            name=f"lora_{name}_bf16_{adapter}_r{rank}"))
    return configs
