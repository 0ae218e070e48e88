"""Model, tokenizer and device set-up shared by the recipes.

Everything loads from local folders: safetensors only, ``local_files_only=True``, no remote code. The
attention implementation defaults to ours ("llm2vec_fast"). LoRA uses peft with llm2vec's defaults
(``TrainConfig.lora_*``); LoRA weights stay float32 while the frozen base runs in ``torch_dtype``.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from ..distributed import join_torchrun_group
from .config import TrainConfig

logger = logging.getLogger(__name__)

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "auto": "auto"}
LOAD_KWARGS = dict(use_safetensors=True, local_files_only=True, trust_remote_code=False)


# --------------------------------------------------------------------------------------------- process
def setup_device(config: TrainConfig) -> torch.device:
    """The device of this process, after joining the torchrun process group when WORLD_SIZE > 1
    (``distributed.join_torchrun_group``); ``config.device`` overrides the automatic choice. Idempotent."""
    return join_torchrun_group(config.device)[0]


def torch_dtype(config: TrainConfig):
    return _DTYPES[config.torch_dtype]


def seed_everything(seed: int) -> None:
    """Python, numpy and torch (all devices) RNGs: model init and LoRA init are then reproducible."""
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------- tokenizer
def load_tokenizer(path: str):
    """The folder's tokenizer with pad = eos (llm2vec's choice: these decoders ship no pad token)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer of {path!r} has no EOS token (needed as the padding token)")
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ------------------------------------------------------------------------------------------------ LoRA
def lora_config(config: TrainConfig):
    from peft import LoraConfig
    return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=config.lora_targets, bias="none", task_type=None)


def add_lora(module: torch.nn.Module, config: TrainConfig):
    """A fresh LoRA adapter on ``module`` (the decoder body, as llm2vec does); returns the PeftModel.

    Raises ValueError naming the missing modules when ``lora_target_modules`` matches nothing."""
    from peft import get_peft_model
    names = {name.rsplit(".", 1)[-1] for name, _ in module.named_modules()}
    missing = [t for t in config.lora_targets if t not in names]
    if missing:
        raise ValueError(f"config key 'lora_target_modules': {missing} not found in {type(module).__name__}")
    return get_peft_model(module, lora_config(config))


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: gradients reach the LoRA weights without inputs requiring grad."""
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "config"):
        model.config.use_cache = False


# ----------------------------------------------------------------------------------------------- MNTP
def load_mntp_model(config: TrainConfig, device: Optional[torch.device] = None, min_vocab: int = 0):
    """The family's ``XxxBiForMNTP`` with a fresh LoRA on its decoder body (``model.model``), on ``device``;
    the embeddings grow to ``min_vocab`` rows first when shorter (an added ``<mask>`` token).

    Returns the ``XxxBiForMNTP``; ``model.model`` is the peft-wrapped body, whose adapter is what an
    MNTP checkpoint saves (llm2vec's layout).
    """
    from ..models import BI_FOR_MNTP
    model_class = BI_FOR_MNTP[config.model_type]
    model = model_class.from_pretrained(config.model_name_or_path, dtype=torch_dtype(config),
                                        attn_implementation=config.attention, **LOAD_KWARGS)
    if min_vocab > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(min_vocab)
    if device is not None:
        model.to(device)
    for param in model.parameters():
        param.requires_grad_(False)
    seed_everything(config.seed)
    model.model = add_lora(model.model, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    return model


# ------------------------------------------------------------------------------------------- encoders
def load_encoder_model(config: TrainConfig, device: Optional[torch.device] = None, **encoder_kwargs):
    """An ``LLM2Vec`` for contrastive training: the body (bidirectional unless ``bidirectional`` is false: then
    causal, still packed on our attention) with the MNTP adapter merged
    (``peft_model_name_or_path``, or the adapter found in the base folder, exactly as
    ``LLM2Vec.from_pretrained`` does), then a fresh trainable LoRA. ``encoder_kwargs`` (pooling_mode,
    max_length, ...) go to ``LLM2Vec.from_pretrained``. ``encoder.model`` is the PeftModel to train.
    """
    from ..encoder import LLM2Vec
    encoder = LLM2Vec.from_pretrained(config.model_name_or_path, peft_model_name_or_path=config.peft_model_name_or_path,
                                      merge_peft=True, enable_bidirectional=config.bidirectional,
                                      dtype=torch_dtype(config), attn_implementation=config.attention,
                                      local_files_only=True, **encoder_kwargs)
    if device is not None:
        encoder.to(device)
    for param in encoder.model.parameters():
        param.requires_grad_(False)
    seed_everything(config.seed)
    encoder.model = add_lora(encoder.model, config)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(encoder.model)
    encoder.model.train()
    return encoder
