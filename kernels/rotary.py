"""Rotary position embedding (RoPE) of q and k in Triton: one pass over both, forward and backward.

Rows are tokens: q (T, Hq, D) and k (T, Hkv, D) with a unit-stride last dim (token and head strides free, so
the q and k parts of a fused qkv projection are read where they lie), cos and sin (T, R). A program owns one
token: it loads the token's angles once, then walks q's heads and k's heads in blocks of BLOCK_H heads. A head
is read as its two rotated halves, x1 = x[:R/2] and x2 = x[R/2:R] (two contiguous tiles of BLOCK_HALF columns,
not a gather of partners), and rotate_half(x) = (-x2, x1):

    forward:  y1 = x1 cos1 - x2 sin1,   y2 = x2 cos2 + x1 sin2
    backward: d1 = g1 cos1 + g2 sin2,   d2 = g2 cos2 - g1 sin1   (the transpose of the rotation)

with cos = (cos1, cos2) and sin = (sin1, sin2) split the same way. Columns from R on pass through: copied in
BLOCK_TAIL tiles where the output is not the input (COPY_TAIL), left alone in place.

Rounding as ``llm2vec_fast.reference.rotary`` (transformers' ``q * cos + rotate_half(q) * sin`` in the input
dtype): each product is rounded to the input dtype, then the sum. The kernels are launched with
``enable_fp_fusion=False``: a multiply-add contracted into one FMA would skip the first rounding in float32.
In place is safe: a program loads both halves of a head block before it stores either, and no two programs share
a token.
"""
import triton
import triton.language as tl

NUM_WARPS = 4
HALF_TILE_ELEMENTS = 1024  # BLOCK_H x BLOCK_HALF per half and step: 16 heads of D = 128, 8 of 256


def block_sizes(head_dim: int, rotary_width: int):
    """(BLOCK_H, BLOCK_HALF, BLOCK_TAIL): as many heads as fill a tile of half-rows padded to a power of two, and
    the pass-through columns' tile (at least 16 wide)."""
    block_half = triton.next_power_of_2(max(rotary_width // 2, 16))
    block_tail = triton.next_power_of_2(max(head_dim - rotary_width, 16))
    return max(1, HALF_TILE_ELEMENTS // block_half), block_half, block_tail


@triton.jit
def _round(x, dtype):
    """x rounded to ``dtype`` and back to float32 (the identity for float32)."""
    return x.to(dtype).to(tl.float32)


@triton.jit
def _rotate_heads(X, OUT, token, n_heads, half, rotary_width, head_dim, stride_token, stride_head, stride_out_token,
                  stride_out_head, cos1, cos2, sin1, sin2, BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr):
    """Rotates the ``n_heads`` heads of one token of X into OUT (which may be X), BLOCK_H heads at a time."""
    cols = tl.arange(0, BLOCK_HALF)
    in_half = cols < half
    row = X + token * stride_token
    out_row = OUT + token * stride_out_token
    dtype = OUT.dtype.element_ty
    for first in range(0, n_heads, BLOCK_H):
        heads = first + tl.arange(0, BLOCK_H)
        ok = (heads < n_heads)[:, None] & in_half[None, :]
        first_half = row + heads[:, None] * stride_head + cols[None, :]
        x1 = tl.load(first_half, mask=ok, other=0.0).to(tl.float32)
        x2 = tl.load(first_half + half, mask=ok, other=0.0).to(tl.float32)
        by_cos1, by_cos2 = _round(x1 * cos1[None, :], dtype), _round(x2 * cos2[None, :], dtype)
        if BACKWARD:
            y1 = by_cos1 + _round(x2 * sin2[None, :], dtype)
            y2 = by_cos2 - _round(x1 * sin1[None, :], dtype)
        else:
            y1 = by_cos1 - _round(x2 * sin1[None, :], dtype)
            y2 = by_cos2 + _round(x1 * sin2[None, :], dtype)
        out_first_half = out_row + heads[:, None] * stride_out_head + cols[None, :]
        tl.store(out_first_half, y1.to(dtype), mask=ok)
        tl.store(out_first_half + half, y2.to(dtype), mask=ok)
        if COPY_TAIL:  # columns [R, D) pass through, bit for bit
            tail = rotary_width + tl.arange(0, BLOCK_TAIL)
            tail_ok = (heads < n_heads)[:, None] & (tail < head_dim)[None, :]
            passed = tl.load(row + heads[:, None] * stride_head + tail[None, :], mask=tail_ok)
            tl.store(out_row + heads[:, None] * stride_out_head + tail[None, :], passed, mask=tail_ok)


@triton.jit
def _rotary(Q, K, COS, SIN, OUT_Q, OUT_K, n_q_heads, n_k_heads, head_dim, rotary_width,
            stride_q_token, stride_q_head, stride_k_token, stride_k_head,
            stride_out_q_token, stride_out_q_head, stride_out_k_token, stride_out_k_head, stride_cos, stride_sin,
            BACKWARD: tl.constexpr, COPY_TAIL: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
            BLOCK_TAIL: tl.constexpr):
    """Forward: Q, K -> OUT_Q, OUT_K rotated. Backward (the gradients in Q, K): the transpose of the rotation."""
    token = tl.program_id(0).to(tl.int64)  # int64: T x H x D can pass 2**31 elements
    half = rotary_width // 2
    cols = tl.arange(0, BLOCK_HALF)
    in_half = cols < half
    angles_cos, angles_sin = COS + token * stride_cos + cols, SIN + token * stride_sin + cols
    cos1 = tl.load(angles_cos, mask=in_half, other=0.0).to(tl.float32)
    cos2 = tl.load(angles_cos + half, mask=in_half, other=0.0).to(tl.float32)
    sin1 = tl.load(angles_sin, mask=in_half, other=0.0).to(tl.float32)
    sin2 = tl.load(angles_sin + half, mask=in_half, other=0.0).to(tl.float32)
    _rotate_heads(Q, OUT_Q, token, n_q_heads, half, rotary_width, head_dim, stride_q_token, stride_q_head,
                  stride_out_q_token, stride_out_q_head, cos1, cos2, sin1, sin2,
                  BACKWARD, COPY_TAIL, BLOCK_H, BLOCK_HALF, BLOCK_TAIL)
    _rotate_heads(K, OUT_K, token, n_k_heads, half, rotary_width, head_dim, stride_k_token, stride_k_head,
                  stride_out_k_token, stride_out_k_head, cos1, cos2, sin1, sin2,
                  BACKWARD, COPY_TAIL, BLOCK_H, BLOCK_HALF, BLOCK_TAIL)


def _launch(q, k, cos, sin, out_q, out_k, backward: bool):
    tokens, head_dim, width = q.shape[0], q.shape[-1], cos.shape[-1]
    if tokens == 0:
        return
    block_h, block_half, block_tail = block_sizes(head_dim, width)
    in_place = out_q is q and out_k is k  # the pass-through columns already hold their values
    _rotary[(tokens,)](
        q, k, cos, sin, out_q, out_k, q.shape[1], k.shape[1], head_dim, width,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        out_q.stride(0), out_q.stride(1), out_k.stride(0), out_k.stride(1), cos.stride(0), sin.stride(0),
        BACKWARD=backward, COPY_TAIL=width < head_dim and not in_place, BLOCK_H=block_h, BLOCK_HALF=block_half,
        BLOCK_TAIL=block_tail, num_warps=NUM_WARPS, enable_fp_fusion=False)


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
    """Forward and backward, bf16 and fp32: full rotary at head dims 64, 128 and 256 (every tile shape the
    launcher picks for full rotary: 80 and 96 share 128's), and Phi-3's partial rotary (D = 96, R = 32) with its
    pass-through columns copied."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for dtype in ("bf16", "fp32"):
        for head_dim, width in ((64, 64), (128, 128), (256, 256), (96, 32)):
            block_h, block_half, block_tail = block_sizes(head_dim, width)
            for backward in (False, True):
                constexprs = dict(BACKWARD=backward, COPY_TAIL=width < head_dim, BLOCK_H=block_h,
                                  BLOCK_HALF=block_half, BLOCK_TAIL=block_tail)
                pointers = {name: f"*{dtype}" for name in ("Q", "K", "COS", "SIN", "OUT_Q", "OUT_K")}
                configs.append(KernelConfig(_rotary, aot_signature(_rotary, pointers, constexprs), constexprs,
                                            num_warps=NUM_WARPS, num_stages=1,
                                            options=dict(enable_fp_fusion=False),
                                            name=f"rotary_{'bwd' if backward else 'fwd'}_d{head_dim}_r{width}_{dtype}"))
    return configs
