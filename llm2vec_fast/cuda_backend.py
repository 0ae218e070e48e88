"""The ``"cuda"`` backend: the compiled extension ``llm2vec_fast._C`` (``csrc/``).

Same contract as the reference (``llm2vec_fast.reference``): plain functions on tensors, which
``dispatch`` calls inside the public custom ops.

Registration. The extension's functions are plain pybind11 functions, not ``torch.library`` ops: the
public ops (``llm2vec_fast::pool_forward`` / ``pool_backward``, ``llm2vec_fast::infonce_forward`` /
``infonce_backward``, ``llm2vec_fast::flash_attention_forward`` / ``_backward``, ``rms_norm_*``,
``gated_activation_*``, ``rotary_embedding_*``) already are custom ops with schemas, fake
(meta) implementations and the autograd formula, and run the chosen backend inside, so
``torch.compile`` sees one opaque op whatever the backend. A second, inner registration would add
nothing, and a ``TORCH_LIBRARY`` namespace can be defined once per process, which would forbid loading
a second build of ``csrc/`` next to the installed one (the tests and CI's build check do exactly that).
The kernels launch on torch's current stream and allocate through torch's caching allocator, with no
host synchronisation, so they can be captured in CUDA graphs.

The backend is always registered with ``dispatch`` (see ``backends.py``); ``dispatch`` offers it only on
CUDA devices, and only when ``llm2vec_fast._C`` exists, and otherwise says how to build it. The
extension is imported on first use.
"""
from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType
from typing import Optional

import torch

from . import dispatch

EXTENSION = dispatch.EXTENSION
BUILD_HINT = ("build it with a CUDA toolkit and a CUDA build of torch: CUDA_HOME=/usr/local/cuda "
              "pip install --no-build-isolation -e . (or python setup.py build_ext --inplace)")

_extension: Optional[ModuleType] = None


def extension() -> ModuleType:
    """The extension module (imported once). Raises RuntimeError saying how to build it if it cannot be imported."""
    global _extension
    if _extension is None:
        try:
            _extension = importlib.import_module(EXTENSION)
        except ImportError as e:
            raise RuntimeError(f"the CUDA extension {EXTENSION} cannot be imported ({e}); {BUILD_HINT}") from e
    return _extension


def use_extension(module: Optional[ModuleType]) -> Optional[ModuleType]:
    """Use ``module`` (a build of ``csrc/`` under another name, e.g. from
    ``llm2vec_fast.tools.cuda_build.build``) instead of ``llm2vec_fast._C``; None goes back to the
    default. Returns the module used before."""
    global _extension
    previous, _extension = _extension, module
    return previous


# ---------------------------------------------------------------------------------------------------
# pool: contract of llm2vec_fast.reference.pooling.pool_forward / pool_backward
# ---------------------------------------------------------------------------------------------------
def pool_forward(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    """(B, D) float32 embeddings, L2-normalised in the same kernel when ``normalize``."""
    return extension().pool_forward(hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize)


def pool_backward(grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize):
    """The gradient w.r.t. ``hidden``: contiguous, ``hidden``'s shape and dtype."""
    return extension().pool_backward(grad_out, hidden, cu_seqlens, attention_mask, embed_mask, mode, normalize)


# ---------------------------------------------------------------------------------------------------
# contrastive_loss (one direction): contract of llm2vec_fast.reference.contrastive.infonce_forward / _backward
# ---------------------------------------------------------------------------------------------------
def infonce_forward(anchors, candidates, label_offset, scale):
    """(row_loss (A,) float32, lse (A,) float32)."""
    return tuple(extension().infonce_forward(anchors, candidates, int(label_offset), float(scale)))


def infonce_backward(grad_rows, anchors, candidates, lse, label_offset, scale):
    """(grad_anchors, grad_candidates) in the inputs' dtypes."""
    return tuple(extension().infonce_backward(grad_rows, anchors, candidates, lse, int(label_offset), float(scale)))


# ---------------------------------------------------------------------------------------------------
# flash_attention: contract of llm2vec_fast.reference.attention.attention_forward / attention_backward
# ---------------------------------------------------------------------------------------------------
ATTENTION_OP = "flash_attention"
_TMA_ALIGN = 16  # bytes: base pointers and token / head strides of q, k, v (tensor maps)


def _tma_layout_ok(x) -> bool:
    """Last dim contiguous, 16-byte aligned base and strides, nested strides (what the tensor maps need)."""
    heads, dim = x.shape[1], x.shape[2]
    if x.stride(2) != 1 or x.data_ptr() % _TMA_ALIGN:
        return False
    head_stride = dim if heads == 1 else x.stride(1)
    size = x.element_size()
    if (x.stride(0) * size) % _TMA_ALIGN or (head_stride * size) % _TMA_ALIGN:
        return False
    return head_stride >= dim and x.stride(0) >= heads * head_stride


def attention_kernel_supported(q, k, v, cu_seqlens, causal, dropout_p) -> bool:
    """Whether the Hopper kernel (csrc/attention.cu) runs this call: non-causal, dropout_p == 0,
    bfloat16/float16, head dim 64 or 128, a CUDA device of capability (9, 0), TMA-compatible layouts
    (see ``_tma_layout_ok``), grid limits (at most 65535 query heads and sequences)."""
    if causal or dropout_p != 0:
        return False
    if q.dtype not in (torch.bfloat16, torch.float16) or q.shape[-1] not in (64, 128):
        return False
    if q.device.type != "cuda" or torch.cuda.get_device_capability(q.device) != (9, 0):
        return False
    if q.shape[0] == 0 or q.shape[0] >= 2**31 or q.shape[1] > 65535 or cu_seqlens.numel() - 1 > 65535:
        return False
    return all(_tma_layout_ok(x) for x in (q, k, v))


# Which Hopper kernel runs (csrc/attention.h, AttentionProblem::variant): 0 = the extension's default
# (v1 until a GPU has measured v2), 1 = v1, 2 = v2 (warp-specialised, FA3-style); ATTENTION_OFF (-1, "off"):
# none, the cuda backend's attention runs its Triton fallback (a kill switch: the device check sets it when
# the kernel fails its first-contact diagnosis, so that the rest of the run is not lost to it).
ATTENTION_VARIANT_ENV = "LLM2VEC_FAST_CUDA_ATTENTION"
ATTENTION_OFF = -1
_ATTENTION_VARIANTS = {"": 0, "default": 0, "v1": 1, "v2": 2, "off": ATTENTION_OFF}
_attention_variant: Optional[int] = None


def attention_variant() -> int:
    """The kernel variant the ``"cuda"`` attention forward asks for: ``LLM2VEC_FAST_CUDA_ATTENTION``
    (``v1`` or ``v2``; unset or ``default``: the extension's default; ``off``: :data:`ATTENTION_OFF`), read
    once on first use, unless :func:`use_attention_variant` set one. Raises ValueError on any other value."""
    global _attention_variant
    if _attention_variant is None:
        raw = os.environ.get(ATTENTION_VARIANT_ENV, "").strip().lower()
        if raw not in _ATTENTION_VARIANTS:
            raise ValueError(f"{ATTENTION_VARIANT_ENV}={raw!r}: expected v1, v2, off or default (unset)")
        _attention_variant = _ATTENTION_VARIANTS[raw]
    return _attention_variant


def attention_switched_off() -> bool:
    """Whether the environment turns the Hopper attention kernel off (``LLM2VEC_FAST_CUDA_ATTENTION=off``),
    whatever variant a caller has set since: tests and benchmarks that name a variant skip then."""
    return os.environ.get(ATTENTION_VARIANT_ENV, "").strip().lower() == "off"


def use_attention_variant(variant: Optional[int]) -> Optional[int]:
    """Use kernel ``variant`` (0 default, 1 v1, 2 v2, ATTENTION_OFF none) from now on; None re-reads the
    environment variable on next use. Returns the variant set before (None if none was). For benchmarks
    and tests."""
    global _attention_variant
    if variant is not None and variant not in (0, 1, 2, ATTENTION_OFF):
        raise ValueError(f"variant must be 0, 1, 2 or {ATTENTION_OFF} (off), got {variant!r}")
    previous, _attention_variant = _attention_variant, variant
    return previous


def flash_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap, dropout_p, seed,
                            window=0):
    """(out (T, Hq, D) like q, lse (Hq, T) float32).

    The Hopper kernel of ``csrc/attention.cu`` (TMA + wgmma) when :func:`attention_kernel_supported` (and
    not switched off, :data:`ATTENTION_OFF`); otherwise (causal, dropout, a sliding window, fp32, other head
    dims, a GPU other than sm_90, misaligned or non-nested strides) the Triton forward registered with
    ``dispatch`` (the torch reference where triton is not installed). The lse convention is the Triton
    kernel's, so either backward works.
    The kernel variant (v1 / v2) is :func:`attention_variant`'s."""
    variant = attention_variant()
    if not window and variant != ATTENTION_OFF and attention_kernel_supported(q, k, v, cu_seqlens, causal, dropout_p):
        if variant == 0:  # the extension's own default (and builds that predate the argument)
            return tuple(extension().attention_forward(q, k, v, cu_seqlens, int(max_seqlen), float(softmax_scale),
                                                       float(softcap)))
        return tuple(extension().attention_forward(q, k, v, cu_seqlens, int(max_seqlen), float(softmax_scale),
                                                   float(softcap), variant=variant))
    return dispatch.fallback(ATTENTION_OP).forward(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale, softcap,
                                                   dropout_p, seed, window=window)


def flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, softmax_scale, softcap,
                             dropout_p, seed, window=0, dlse=None):
    """(dq, dk, dv): the Triton backward registered with ``dispatch`` (no CUDA backward yet)."""
    return dispatch.fallback(ATTENTION_OP).backward(dout, q, k, v, out, lse, cu_seqlens, max_seqlen, causal,
                                                    softmax_scale, softcap, dropout_p, seed, window=window, dlse=dlse)


# ---------------------------------------------------------------------------------------------------
# rms_norm: contract of llm2vec_fast.reference.rms_norm.rms_norm_forward / rms_norm_backward
# ---------------------------------------------------------------------------------------------------
RMS_NORM_OP = "rms_norm"


def rms_norm_forward(x, weight, eps, offset, casting_mode):
    """(y like x, rstd (N,) float32) from ``csrc/rms_norm.cu`` when its plan takes the rows (16-byte aligned
    rows, D a multiple of 16 bytes and at most 8192 values, 4096 in float32, weight in x's dtype); otherwise
    the Triton kernel registered with ``dispatch`` (the extension answers None)."""
    result = extension().rms_norm_forward(x, weight, float(eps), float(offset), casting_mode == "gemma")
    if result is None:
        return dispatch.fallback(RMS_NORM_OP, x.device).forward(x, weight, eps, offset, casting_mode)
    return tuple(result)


def rms_norm_backward(grad_y, x, weight, rstd, eps, offset, casting_mode):
    """(dx like x, dw like weight), on the same terms as :func:`rms_norm_forward`."""
    result = extension().rms_norm_backward(grad_y, x, weight, rstd, float(eps), float(offset), casting_mode == "gemma")
    if result is None:
        return dispatch.fallback(RMS_NORM_OP, x.device).backward(grad_y, x, weight, rstd, eps, offset, casting_mode)
    return tuple(result)


# ---------------------------------------------------------------------------------------------------
# gated_activation: contract of llm2vec_fast.reference.gated.gated_forward / gated_backward
# ---------------------------------------------------------------------------------------------------
def gated_forward(gate, up, activation, out=None):
    """act(gate) * up from ``csrc/gated.cu`` (16-byte vectors where every row allows them), into ``out`` when
    given (it may be gate)."""
    return extension().gated_forward(gate, up, activation == "gelu_tanh", out)


def gated_backward(grad, gate, up, activation):
    """(d gate, d up), contiguous, in the inputs' dtypes."""
    return tuple(extension().gated_backward(grad, gate, up, activation == "gelu_tanh"))


# ---------------------------------------------------------------------------------------------------
# rotary_embedding: contract of llm2vec_fast.reference.rotary.rotary_forward / rotary_backward
# ---------------------------------------------------------------------------------------------------
ROTARY_OP = "rotary_embedding"


def rotary_forward(q, k, cos, sin, out_q=None, out_k=None):
    """(q, k) rotated by (cos, sin) from ``csrc/rotary.cu``, both in one launch (16-byte vectors where every
    row allows them), into ``out_q`` / ``out_k`` when given (they may be q and k: in place)."""
    return tuple(extension().rotary_forward(q, k, cos, sin, out_q, out_k))


def rotary_backward(grad_q, grad_k, cos, sin):
    """(d q, d k), contiguous, in the gradients' dtype."""
    return tuple(extension().rotary_backward(grad_q, grad_k, cos, sin))


# ---------------------------------------------------------------------------------------------------
# The kill switch: ops whose kernels the environment turns off
# ---------------------------------------------------------------------------------------------------
CUDA_OFF_ENV = "LLM2VEC_FAST_CUDA_OFF"


def switched_off_ops() -> frozenset:
    """The ops whose CUDA kernels ``LLM2VEC_FAST_CUDA_OFF`` turns off (comma-separated op names, or ``all``):
    their ``"cuda"`` backend runs :func:`dispatch.fallback` instead (Triton, or the torch reference). The device
    check sets it for a kernel that fails its first contact, so that the rest of the run is not lost to it.
    Read on every call (an environment lookup; each value is parsed once). Raises ValueError on an unknown op
    name."""
    return _parse_switched_off(os.environ.get(CUDA_OFF_ENV, ""))


@functools.lru_cache(maxsize=8)
def _parse_switched_off(value: str) -> frozenset:
    raw = value.strip().lower()
    names = {name.strip() for name in raw.split(",") if name.strip()}
    if "all" in names:
        return frozenset(dispatch.OPS)
    unknown = sorted(names - set(dispatch.OPS))
    if unknown:
        raise ValueError(f"{CUDA_OFF_ENV}={raw!r}: unknown ops {unknown}; expected names among "
                         f"{list(dispatch.OPS)} or 'all'")
    return frozenset(names)


def _unless_switched_off(op: str, kernel, direction: str):
    """``kernel``, or the fallback's ``direction`` ("forward" / "backward") while ``op`` is switched off."""
    @functools.wraps(kernel)
    def run(*args, **kwargs):
        if op in switched_off_ops():
            return getattr(dispatch.fallback(op, args[0].device), direction)(*args, **kwargs)
        return kernel(*args, **kwargs)

    return run


def register() -> None:
    """Registers the ops this backend implements with ``dispatch`` (each behind the kill switch)."""
    for op, forward, backward in (("pool", pool_forward, pool_backward),
                                  ("contrastive_loss", infonce_forward, infonce_backward),
                                  (ATTENTION_OP, flash_attention_forward, flash_attention_backward),
                                  (RMS_NORM_OP, rms_norm_forward, rms_norm_backward),
                                  ("gated_activation", gated_forward, gated_backward),
                                  (ROTARY_OP, rotary_forward, rotary_backward)):
        dispatch.register(op, "cuda", _unless_switched_off(op, forward, "forward"),
                          _unless_switched_off(op, backward, "backward"))
