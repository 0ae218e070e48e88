"""llm2vec-fast: fast LLM2Vec-style encoding and training.

Public ops (see ``llm2vec_fast.ops``): ``flash_attention``, ``pool``, ``contrastive_loss``, ``rms_norm``,
``gated_activation``, ``rotary_embedding``, ``lora_linear``.
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _expose_source_kernels() -> None:
    """Installed, ``kernels/`` ships as ``llm2vec_fast.kernels`` (setup.py's package_dir). In a source
    checkout imported through PYTHONPATH (the GPU machine's device check), it sits beside the package:
    register it under the same name so both layouts import alike."""
    name = __name__ + ".kernels"
    if name in _sys.modules or _importlib_util.find_spec(name) is not None:
        return
    folder = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.realpath(__file__))), "kernels")
    init = _os.path.join(folder, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _importlib_util.spec_from_file_location(name, init, submodule_search_locations=[folder])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules[name] = module
    spec.loader.exec_module(module)


_expose_source_kernels()

from . import dispatch  # noqa: E402
from .ops import (contrastive_loss, flash_attention, gated_activation, lora_linear, pool, rms_norm,  # noqa: E402
                  rotary_embedding)

__version__ = "0.1.0"
__all__ = ["flash_attention", "pool", "contrastive_loss", "rms_norm", "gated_activation", "rotary_embedding",
           "lora_linear", "dispatch", "LLM2Vec", "__version__"]


def __getattr__(name):
    """``llm2vec_fast.LLM2Vec`` is imported on first use, so that ``import llm2vec_fast`` stays light (no
    transformers import)."""
    if name == "LLM2Vec":
        from .encoder import LLM2Vec
        return LLM2Vec
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
