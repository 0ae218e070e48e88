"""llm2vec-fast: fast LLM2Vec-style encoding and training.

Public ops (see ``llm2vec_fast.ops``): ``flash_attention``, ``pool``, ``contrastive_loss``.
"""
from . import dispatch
from .ops import contrastive_loss, flash_attention, pool

__version__ = "0.1.0"
__all__ = ["flash_attention", "pool", "contrastive_loss", "dispatch", "__version__"]
