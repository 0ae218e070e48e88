"""Bidirectional drop-ins for the eight supported families.

``XxxBiModel`` subclasses the family's ``XxxModel`` (what ``AutoModel`` loads) and ``XxxBiForMNTP``
its ``XxxForCausalLM`` (language-model head kept, for masked next-token prediction). Each adds no
weights, so state-dict keys equal the base class's and ``from_pretrained`` loads any checkpoint of
the family. After the base ``__init__`` they call :func:`make_bidirectional`; ``forward`` is the
family's own (padded batches, any ``attn_implementation``), and ``forward_packed`` is the speed path.
``AutoBiModel`` / ``AutoBiForMNTP`` pick the class from a checkpoint's or config's ``model_type``.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor
from transformers import (Gemma2ForCausalLM, Gemma2Model, Gemma3ForCausalLM, Gemma3TextModel, GemmaForCausalLM,
                          GemmaModel, LlamaForCausalLM, LlamaModel, MistralForCausalLM, MistralModel, Phi3ForCausalLM,
                          Phi3Model, Qwen2ForCausalLM, Qwen2Model, Qwen3ForCausalLM, Qwen3Model)

from .bidirectional import PackedOutput, forward_packed, make_bidirectional
from .packing import PackedBatch


class BidirectionalMixin:
    """Makes the model bidirectional at construction and adds :meth:`forward_packed`."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        make_bidirectional(self)

    def forward_packed(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None, *,
                       batch: Optional[PackedBatch] = None, **kwargs) -> PackedOutput:
        """The decoder on the real tokens only: see :func:`llm2vec_fast.models.forward_packed`."""
        return forward_packed(self, input_ids, attention_mask, batch=batch, **kwargs)


class LlamaBiModel(BidirectionalMixin, LlamaModel):
    """Bidirectional ``LlamaModel``."""


class MistralBiModel(BidirectionalMixin, MistralModel):
    """Bidirectional ``MistralModel`` (sliding windows made symmetric: |i - j| < window)."""


class Qwen2BiModel(BidirectionalMixin, Qwen2Model):
    """Bidirectional ``Qwen2Model``, with every attention implementation."""


class Qwen3BiModel(BidirectionalMixin, Qwen3Model):
    """Bidirectional ``Qwen3Model``."""


class GemmaBiModel(BidirectionalMixin, GemmaModel):
    """Bidirectional ``GemmaModel``."""


class Gemma2BiModel(BidirectionalMixin, Gemma2Model):
    """Bidirectional ``Gemma2Model`` (logit softcap kept; sliding windows symmetric: |i - j| < window)."""


class Gemma3BiModel(BidirectionalMixin, Gemma3TextModel):
    """Bidirectional ``Gemma3TextModel`` (text-only Gemma 3, model_type ``gemma3_text``; sliding windows
    symmetric: |i - j| < window, which is transformers' own rule for ``use_bidirectional_attention``)."""


class Phi3BiModel(BidirectionalMixin, Phi3Model):
    """Bidirectional ``Phi3Model`` (Phi-3 / Phi-3.5 / Phi-4 text models; sliding windows symmetric)."""


class LlamaBiForMNTP(BidirectionalMixin, LlamaForCausalLM):
    """Bidirectional ``LlamaForCausalLM`` for MNTP training."""


class MistralBiForMNTP(BidirectionalMixin, MistralForCausalLM):
    """Bidirectional ``MistralForCausalLM`` for MNTP training."""


class Qwen2BiForMNTP(BidirectionalMixin, Qwen2ForCausalLM):
    """Bidirectional ``Qwen2ForCausalLM`` for MNTP training."""


class Qwen3BiForMNTP(BidirectionalMixin, Qwen3ForCausalLM):
    """Bidirectional ``Qwen3ForCausalLM`` for MNTP training."""


class GemmaBiForMNTP(BidirectionalMixin, GemmaForCausalLM):
    """Bidirectional ``GemmaForCausalLM`` for MNTP training."""


class Gemma2BiForMNTP(BidirectionalMixin, Gemma2ForCausalLM):
    """Bidirectional ``Gemma2ForCausalLM`` for MNTP training."""


class Gemma3BiForMNTP(BidirectionalMixin, Gemma3ForCausalLM):
    """Bidirectional ``Gemma3ForCausalLM`` (text-only Gemma 3) for MNTP training."""


class Phi3BiForMNTP(BidirectionalMixin, Phi3ForCausalLM):
    """Bidirectional ``Phi3ForCausalLM`` for MNTP training."""


BI_MODELS = {"llama": LlamaBiModel, "mistral": MistralBiModel, "qwen2": Qwen2BiModel, "qwen3": Qwen3BiModel,
             "gemma": GemmaBiModel, "gemma2": Gemma2BiModel,
             "gemma3_text": Gemma3BiModel, "phi3": Phi3BiModel}
BI_FOR_MNTP = {"llama": LlamaBiForMNTP, "mistral": MistralBiForMNTP, "qwen2": Qwen2BiForMNTP,
               "qwen3": Qwen3BiForMNTP, "gemma": GemmaBiForMNTP, "gemma2": Gemma2BiForMNTP,
               "gemma3_text": Gemma3BiForMNTP, "phi3": Phi3BiForMNTP}


class _AutoBi:
    """Picks the bidirectional class of a checkpoint's family, like transformers' ``AutoModel``."""

    CLASSES: dict = {}
    KIND = ""

    def __init__(self, *args, **kwargs):
        raise TypeError(f"{type(self).__name__} is not instantiated: use {type(self).__name__}.from_pretrained(path) "
                        f"or .from_config(config)")

    @classmethod
    def class_for(cls, config):
        """The class for ``config`` (a transformers config); ValueError naming the supported model types."""
        model_type = getattr(config, "model_type", None)
        if model_type not in cls.CLASSES:
            raise ValueError(f"{type(config).__name__} (model_type={model_type!r}) has no bidirectional {cls.KIND}; "
                             f"supported model types: {', '.join(cls.CLASSES)}")
        return cls.CLASSES[model_type]

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls.class_for(config)(config, **kwargs)

    @classmethod
    def from_pretrained(cls, path, *args, **kwargs):
        """``XxxBi....from_pretrained(path, ...)`` for the family named by the checkpoint's config
        (``trust_remote_code`` stays off: the supported families are transformers' own)."""
        from transformers import AutoConfig
        # the config is read where the weights are (a subfolder included), with the same hub options
        hub = {key: kwargs[key] for key in ("revision", "local_files_only", "cache_dir", "token", "subfolder",
                                            "force_download", "proxies") if key in kwargs}
        config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path, **hub)
        return cls.class_for(config).from_pretrained(path, *args, config=config, **kwargs)


class AutoBiModel(_AutoBi):
    """``AutoBiModel.from_pretrained(path, attn_implementation="llm2vec_fast", dtype=...)``: the family's
    ``XxxBiModel``."""
    CLASSES = BI_MODELS
    KIND = "model"


class AutoBiForMNTP(_AutoBi):
    """``AutoBiForMNTP.from_pretrained(path, ...)``: the family's ``XxxBiForMNTP``."""
    CLASSES = BI_FOR_MNTP
    KIND = "MNTP model"
