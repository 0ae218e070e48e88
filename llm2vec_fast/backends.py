"""Registers the accelerated backends of each op where they exist.

Each provides ``forward``/``backward`` with the same contract as the reference
(``llm2vec_fast.reference``); ``dispatch`` decides per call whether its runtime can run.
- triton: ``llm2vec_fast.kernels`` (the repo's ``kernels/`` folder), when triton is importable;
- flash_attn: ``llm2vec_fast.flash_attn_backend``, when the optional flash-attn package is importable;
- cuda: ``llm2vec_fast.cuda_backend`` (the extension ``llm2vec_fast._C``, imported on first use); always
  registered, and offered by ``dispatch`` only on CUDA devices where ``llm2vec_fast._C`` exists.
"""
import importlib.util

from . import dispatch

if importlib.util.find_spec("triton") is not None:
    from .kernels import contrastive as _triton_contrastive
    from .kernels import flash_attention as _triton_attention
    from .kernels import gated as _triton_gated
    from .kernels import lora as _triton_lora
    from .kernels import pooling as _triton_pooling
    from .kernels import rms_norm as _triton_rms_norm
    from .kernels import rotary as _triton_rotary

    dispatch.register("flash_attention", "triton", _triton_attention.forward, _triton_attention.backward)
    dispatch.register("pool", "triton", _triton_pooling.forward, _triton_pooling.backward)
    dispatch.register("contrastive_loss", "triton", _triton_contrastive.forward, _triton_contrastive.backward)
    dispatch.register("rms_norm", "triton", _triton_rms_norm.forward, _triton_rms_norm.backward)
    dispatch.register("gated_activation", "triton", _triton_gated.forward, _triton_gated.backward)
    dispatch.register("rotary_embedding", "triton", _triton_rotary.forward, _triton_rotary.backward)
    dispatch.register("lora_linear", "triton", _triton_lora.forward, _triton_lora.backward)

if importlib.util.find_spec("flash_attn") is not None:
    from . import flash_attn_backend as _flash_attn

    dispatch.register("flash_attention", "flash_attn", _flash_attn.forward, _flash_attn.backward)

from . import cuda_backend as _cuda  # noqa: E402

_cuda.register()
