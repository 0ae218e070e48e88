"""The ``"cuda"`` backend: the compiled extension ``llm2vec_fast._C`` (``csrc/``).

Same contract as the reference (``llm2vec_fast.reference``): plain functions on tensors, which
``dispatch`` calls inside the public custom ops.

Registration. The extension's functions are plain pybind11 functions, not ``torch.library`` ops: the
public ops (``llm2vec_fast::pool_forward`` / ``pool_backward``, ``llm2vec_fast::infonce_forward`` /
``infonce_backward``) already are custom ops with schemas, fake
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

import importlib
from types import ModuleType
from typing import Optional

from . import dispatch

EXTENSION = "llm2vec_fast._C"
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


def register() -> None:
    """Registers the ops this backend implements with ``dispatch``."""
    dispatch.register("pool", "cuda", pool_forward, pool_backward)
    dispatch.register("contrastive_loss", "cuda", infonce_forward, infonce_backward)
