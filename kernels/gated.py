"""Fused gated activation in Triton: act(gate) * up in one pass (SwiGLU, GeGLU), forward and backward.

Elementwise over (N, I) rows whose last dim is contiguous; the rows of gate and up may be strided (Phi-3's
fused gate_up projection hands over the two halves of one (N, 2I) tensor). A program owns BLOCK columns of
one row: the 1-D grid runs row-major over (row, column block), so it never meets the 65535 limit of the
other grid axes. The forward may write into gate itself (the encoder's in-place MLP): every element is read
before it is written, by the same program.

Rounding as ``llm2vec_fast.reference.gated``: act(gate) is rounded to the input dtype before the product.
The backward recomputes act(gate) from gate (nothing else is kept) and writes d gate and d up in one pass.
"""
import triton
import triton.language as tl

from .common import unit_last_dim

BLOCK = 1024
NUM_WARPS = 4
GELU_TANH_SCALE = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi); constexpr: read inside the kernels
GELU_TANH_CUBIC = tl.constexpr(0.044715)


@triton.jit
def _activation(g, GELU: tl.constexpr):
    """(act(g), act'(g)) in float32. GELU's tanh form as x * sigmoid(2 z): tanh(z) = 2 sigmoid(2 z) - 1."""
    if GELU:
        inner = GELU_TANH_SCALE * (g + GELU_TANH_CUBIC * g * g * g)
        s = tl.sigmoid(2.0 * inner)  # (1 + tanh(inner)) / 2
        act = g * s
        # d/dg [g s] = s + g * 2 s (1 - s) * inner'(g), with 1 - tanh^2 = 4 s (1 - s)
        derivative = s + 2.0 * g * s * (1.0 - s) * GELU_TANH_SCALE * (1.0 + 3.0 * GELU_TANH_CUBIC * g * g)
    else:
        s = tl.sigmoid(g)
        act = g * s
        derivative = s * (1.0 + g * (1.0 - s))
    return act, derivative


@triton.jit
def _element_offsets(n_cols, BLOCK: tl.constexpr):
    """(row, columns, column mask) of this program's BLOCK elements."""
    blocks_per_row = tl.cdiv(n_cols, BLOCK)
    program = tl.program_id(0).to(tl.int64)  # int64: N x I can pass 2**31 elements
    row = program // blocks_per_row
    cols = (program % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    return row, cols, cols < n_cols


@triton.jit
def _gated_fwd(GATE, UP, OUT, n_cols, stride_gate, stride_up, stride_out, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, ok = _element_offsets(n_cols, BLOCK)
    gate = tl.load(GATE + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    act, _ = _activation(gate, GELU)
    act = act.to(OUT.dtype.element_ty).to(tl.float32)  # transformers rounds act(gate) before the product
    tl.store(OUT + row * stride_out + cols, (act * up).to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _gated_bwd(GRAD, GATE, UP, DGATE, DUP, n_cols, stride_grad, stride_gate, stride_up, stride_dgate, stride_dup,
               GELU: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, ok = _element_offsets(n_cols, BLOCK)
    grad = tl.load(GRAD + row * stride_grad + cols, mask=ok, other=0.0).to(tl.float32)
    gate = tl.load(GATE + row * stride_gate + cols, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(UP + row * stride_up + cols, mask=ok, other=0.0).to(tl.float32)
    act, derivative = _activation(gate, GELU)
    tl.store(DGATE + row * stride_dgate + cols, (grad * up * derivative).to(DGATE.dtype.element_ty), mask=ok)
    tl.store(DUP + row * stride_dup + cols, (grad * act).to(DUP.dtype.element_ty), mask=ok)


def forward(gate, up, activation, out=None):
    """act(gate) * up for (N, I) rows, into ``out`` when given (it may be gate), else a new tensor."""
    gate, up = unit_last_dim(gate), unit_last_dim(up)
    if out is None:
        out = gate.new_empty(gate.shape)
    elif out.stride(-1) != 1:  # the kernel writes whole rows of unit stride (ops.gated passes a contiguous gate)
        raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
    rows, cols = gate.shape
    if rows and cols:
        _gated_fwd[(rows * triton.cdiv(cols, BLOCK),)](
            gate, up, out, cols, gate.stride(0), up.stride(0), out.stride(0),
            GELU=activation == "gelu_tanh", BLOCK=BLOCK, num_warps=NUM_WARPS)
    return out


def backward(grad, gate, up, activation):
    """(d gate, d up), contiguous, in the inputs' dtypes."""
    grad, gate, up = unit_last_dim(grad), unit_last_dim(gate), unit_last_dim(up)
    grad_gate, grad_up = gate.new_empty(gate.shape), up.new_empty(up.shape)
    rows, cols = gate.shape
    if rows and cols:
        _gated_bwd[(rows * triton.cdiv(cols, BLOCK),)](
            grad, gate, up, grad_gate, grad_up, cols, grad.stride(0), gate.stride(0), up.stride(0),
            grad_gate.stride(0), grad_up.stride(0), GELU=activation == "gelu_tanh", BLOCK=BLOCK, num_warps=NUM_WARPS)
    return grad_gate, grad_up


def AOT_CONFIGS():
    """Both kernels, both activations, bf16 and fp32."""
    from llm2vec_fast.tools.aot_check import KernelConfig

    from .common import aot_signature

    configs = []
    for dtype in ("bf16", "fp32"):
        for gelu in (False, True):
            for fn, direction in ((_gated_fwd, "fwd"), (_gated_bwd, "bwd")):
                constexprs = dict(GELU=gelu, BLOCK=BLOCK)
                pointers = {name: f"*{dtype}" for name in ("GATE", "UP", "OUT", "GRAD", "DGATE", "DUP")}
                configs.append(KernelConfig(fn, aot_signature(fn, pointers, constexprs), constexprs,
                                            num_warps=NUM_WARPS, num_stages=1,
                                            name=f"gated_{direction}_{'gelu_tanh' if gelu else 'silu'}_{dtype}"))
    return configs
