"""Rotary position embedding (RoPE) of q and k in Triton: one pass over both, forward and backward.

Rows are tokens: q (T, Hq, D) and k (T, Hkv, D) with a unit-stride last dim (token and head strides free, so
the q and k parts of a fused qkv projection are read where they lie), cos and sin (T, R). A program owns one
token: it loads the token's angles once, then walks q's heads and k's heads in blocks of BLOCK_H rows of
BLOCK_D columns. Column j < R meets its partner p = j +- R/2 (rotate_half); columns from R on pass through.

Rounding as ``llm2vec_fast.reference.rotary`` (transformers' ``q * cos + rotate_half(q) * sin`` in the input
dtype): each product is rounded to the input dtype, then the sum. The kernels are launched with
``enable_fp_fusion=False``: a multiply-add contracted into one FMA would skip the first rounding in float32.
In place is safe: a program reads every column of a head block (and the partners, in the same block) before
it writes any of them, and no two programs share a token.
"""
import triton
import triton.language as tl

NUM_WARPS = 4
TILE_ELEMENTS = 2048  # BLOCK_H x BLOCK_D per step: 8 heads of 256, 16 of 128, 32 of 64


def block_sizes(head_dim: int):
    """(BLOCK_H, BLOCK_D) for a head dim: the head padded to a power of two, as many heads as fill a tile."""
    block_d = triton.next_power_of_2(max(head_dim, 16))
    return max(1, TILE_ELEMENTS // block_d), block_d


@triton.jit
def _rotate_heads(X, OUT, token, n_heads, head_dim, stride_token, stride_head, stride_out_token, stride_out_head,
                  cols, partner, sign, rotated, cos, sin, BLOCK_H: tl.constexpr):
    """Rotates the ``n_heads`` heads of one token of X into OUT (which may be X), BLOCK_H heads at a time."""
    in_head = cols < head_dim
    row = X + token * stride_token
    out_row = OUT + token * stride_out_token
    for first in range(0, n_heads, BLOCK_H):
        heads = first + tl.arange(0, BLOCK_H)
        ok = (heads < n_heads)[:, None] & in_head[None, :]
        x = tl.load(row + heads[:, None] * stride_head + cols[None, :], mask=ok, other=0.0)
        x_partner = tl.load(row + heads[:, None] * stride_head + partner[None, :], mask=ok & rotated[None, :],
                            other=0.0).to(tl.float32)
        # round(round(x cos) + round(sign x_p sin)): each product in the input dtype, as transformers computes it
        by_cos = (x.to(tl.float32) * cos[None, :]).to(x.dtype).to(tl.float32)
        by_sin = (sign[None, :] * x_partner * sin[None, :]).to(x.dtype).to(tl.float32)
        y = tl.where(rotated[None, :], (by_cos + by_sin).to(x.dtype), x)  # the pass-through columns keep their bits
        tl.store(out_row + heads[:, None] * stride_out_head + cols[None, :], y.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _rotary(Q, K, COS, SIN, OUT_Q, OUT_K, n_q_heads, n_k_heads, head_dim, rotary_width,
            stride_q_token, stride_q_head, stride_k_token, stride_k_head,
            stride_out_q_token, stride_out_q_head, stride_out_k_token, stride_out_k_head, stride_cos, stride_sin,
            BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Forward: Q, K -> OUT_Q, OUT_K rotated. Backward (the gradients in Q, K): the transpose of the rotation,
    whose partner term reads sin at the partner's column and has the opposite sign."""
    token = tl.program_id(0).to(tl.int64)  # int64: T x H x D can pass 2**31 elements
    half = rotary_width // 2
    cols = tl.arange(0, BLOCK_D)
    rotated = cols < rotary_width
    first_half = cols < half
    partner = tl.where(first_half, cols + half, cols - half)
    cos = tl.load(COS + token * stride_cos + cols, mask=rotated, other=0.0).to(tl.float32)
    if BACKWARD:
        # d x[j] = g[j] cos[j] - sign[j] g[p] sin[p]
        sin = tl.load(SIN + token * stride_sin + partner, mask=rotated, other=0.0).to(tl.float32)
        sign = tl.where(first_half, 1.0, -1.0)
    else:
        # y[j] = x[j] cos[j] + sign[j] x[p] sin[j], with rotate_half's sign: -1 on the first half
        sin = tl.load(SIN + token * stride_sin + cols, mask=rotated, other=0.0).to(tl.float32)
        sign = tl.where(first_half, -1.0, 1.0)
    _rotate_heads(Q, OUT_Q, token, n_q_heads, head_dim, stride_q_token, stride_q_head, stride_out_q_token,
                  stride_out_q_head, cols, partner, sign, rotated, cos, sin, BLOCK_H)
    _rotate_heads(K, OUT_K, token, n_k_heads, head_dim, stride_k_token, stride_k_head, stride_out_k_token,
                  stride_out_k_head, cols, partner, sign, rotated, cos, sin, BLOCK_H)


def _launch(q, k, cos, sin, out_q, out_k, backward: bool):
    tokens, head_dim, width = q.shape[0], q.shape[-1], cos.shape[-1]
    if tokens == 0:
        return
    block_h, block_d = block_sizes(head_dim)
    _rotary[(tokens,)](
        q, k, cos, sin, out_q, out_k, q.shape[1], k.shape[1], head_dim, width,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1), cos.stride(0), sin.stride(0),
        BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d, num_warps=NUM_WARPS, enable_fp_fusion=False)


def forward(q, k, cos, sin, out_q=None, out_k=None):
    """(q, k) rotated, into ``out_q`` / ``out_k`` when given (they may be q and k), else new tensors."""
    out_q = q.new_empty(q.shape) if out_q is None else out_q
    out_k = k.new_empty(k.shape) if out_k is None else out_k
    _launch(q, k, cos, sin, out_q, out_k, backward=False)
    return out_q, out_k


def backward(grad_q, grad_k, cos, sin):
    """(d q, d k), contiguous."""
    grad_q_out, grad_k_out = grad_q.new_empty(grad_q.shape), grad_k.new_empty(grad_k.shape)
    _launch(grad_q, grad_k, cos, sin, grad_q_out, grad_k_out, backward=True)
    return grad_q_out, grad_k_out


def AOT_CONFIGS():
    """Forward and backward, bf16 and fp32, head dims 64, 128 and 256 (every tile shape the launcher picks
    for the supported head dims: 80 and 96 share 128's)."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for dtype in ("bf16", "fp32"):
        for head_dim in (64, 128, 256):
            block_h, block_d = block_sizes(head_dim)
            for backward in (False, True):
                constexprs = dict(BACKWARD=backward, BLOCK_H=block_h, BLOCK_D=block_d)
                pointers = {name: f"*{dtype}" for name in ("Q", "K", "COS", "SIN", "OUT_Q", "OUT_K")}
                configs.append(KernelConfig(_rotary, aot_signature(_rotary, pointers, constexprs), constexprs,
                                            num_warps=NUM_WARPS, num_stages=1,
                                            options=dict(enable_fp_fusion=False),
                                            name=f"rotary_{'bwd' if backward else 'fwd'}_d{head_dim}_{dtype}"))
    return configs
