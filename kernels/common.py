"""Helpers shared by the Triton kernels."""
import os

import triton
import triton.language as tl


def interpreting() -> bool:
    """True under TRITON_INTERPRET=1 (kernels run on CPU tensors through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def mma(a, b, acc, IEEE: tl.constexpr, INTERPRET: tl.constexpr):
    """acc + a @ b on the tensor cores, the one place every kernel's matrix product goes through.

    The CPU interpreter's bf16 tl.dot returns garbage, so it gets fp32 operands there; fp32 inputs
    (IEEE) use full-fp32 products rather than tf32.
    """
    if INTERPRET:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    elif IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def dropout_keep(seed, stream, rows, cols, dropout_p):
    """Counter-based dropout keep mask over a tile (rows (M, 1) x cols (1, N), or transposed): the same (seed,
    col, row, stream) always draws the same number, so a backward regenerates its forward's mask. Attention's
    stream is the head (rows are query tokens, cols key positions); the LoRA term's is 0 (x's rows and columns)."""
    counter_col = cols + rows * 0  # broadcast both to the tile's shape
    counter_row = rows + cols * 0
    bits, _, _, _ = tl.philox(seed, counter_col, counter_row, counter_col * 0 + stream, counter_col * 0)
    return tl.uint_to_uniform_float(bits) >= dropout_p


def unit_last_dim(x):
    """x, or a contiguous copy where its last dim is strided: the kernels index rows by their stride and walk
    each row's values one apart."""
    return x if x.stride(-1) == 1 else x.contiguous()


def aot_signature(fn, pointers: dict, constexprs: dict, floats=(), int64=()) -> dict:
    """Triton type strings for ``fn``'s runtime arguments, for ahead-of-time compiles (AOT_CONFIGS):
    pointers as given (e.g. ``"*bf16"``), ``floats`` fp32, ``int64`` i64, every other argument i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            continue
        if name in pointers:
            signature[name] = pointers[name]
        else:
            signature[name] = "fp32" if name in floats else "i64" if name in int64 else "i32"
    return signature
