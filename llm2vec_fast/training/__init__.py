"""Training recipes (MNTP, SimCSE, supervised contrastive) on one shared loop.

    llm2vec-fast train mntp --config train_configs/mntp/Mistral.json

``config`` holds the dataclasses; ``loop.Trainer`` runs any recipe; ``mntp`` and ``contrastive`` are the
recipes. Heavy modules (torch, transformers, peft) load on first attribute access.
"""
import importlib

from .config import MNTPConfig, TrainConfig

_LAZY = {
    "Trainer": "loop", "MNTPRecipe": "mntp", "chunked_cross_entropy": "mntp",
    "load_tokenizer": "model_setup", "load_mntp_model": "model_setup", "load_encoder_model": "model_setup",
    "SimCSEConfig": "contrastive", "SupervisedConfig": "contrastive",
    "SimCSERecipe": "contrastive", "SupervisedRecipe": "contrastive",
}

__all__ = ["TrainConfig", "MNTPConfig", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
