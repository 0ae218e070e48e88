"""Bidirectional transformers 5 models (Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3, Phi-3) and their
packed forward.

    from llm2vec_fast.models import AutoBiModel   # or the family's class, e.g. MistralBiModel
    model = AutoBiModel.from_pretrained(path, attn_implementation="llm2vec_fast", dtype=torch.bfloat16)
    out = model.forward_packed(input_ids, attention_mask)   # PackedOutput: hidden (T, H), cu_seqlens, ...
    emb = llm2vec_fast.pool(out.hidden, cu_seqlens=out.cu_seqlens)

Importing this package registers ``attn_implementation="llm2vec_fast"`` with transformers
(``attention.py``). ``make_bidirectional(model)`` converts an already-loaded model (``bidirectional.py``);
``packing.py`` holds ``pack``/``unpad``/``repad``.
"""
from .attention import ATTN_IMPLEMENTATION, llm2vec_fast_attention, set_attention_backend, windowed_attention
from .bidirectional import (SUPPORTED_MODEL_TYPES, PackedOutput, decoder_body, forward_packed, is_bidirectional,
                            layer_windows, make_bidirectional)
from .classes import (BI_FOR_MNTP, BI_MODELS, AutoBiForMNTP, AutoBiModel, Gemma2BiForMNTP, Gemma2BiModel,
                      Gemma3BiForMNTP, Gemma3BiModel, GemmaBiForMNTP, GemmaBiModel, LlamaBiForMNTP, LlamaBiModel,
                      MistralBiForMNTP, MistralBiModel, Phi3BiForMNTP, Phi3BiModel, Qwen2BiForMNTP, Qwen2BiModel,
                      Qwen3BiForMNTP, Qwen3BiModel)
from .packing import PackedBatch, pack, pack_sequences, repad, unpad

__all__ = [
    "ATTN_IMPLEMENTATION", "SUPPORTED_MODEL_TYPES", "BI_MODELS", "BI_FOR_MNTP", "AutoBiModel", "AutoBiForMNTP",
    "LlamaBiModel", "MistralBiModel", "Qwen2BiModel", "Qwen3BiModel", "GemmaBiModel", "Gemma2BiModel",
    "Gemma3BiModel", "Phi3BiModel",
    "LlamaBiForMNTP", "MistralBiForMNTP", "Qwen2BiForMNTP", "Qwen3BiForMNTP", "GemmaBiForMNTP", "Gemma2BiForMNTP",
    "Gemma3BiForMNTP", "Phi3BiForMNTP",
    "make_bidirectional", "is_bidirectional", "forward_packed", "PackedOutput", "decoder_body", "layer_windows",
    "set_attention_backend", "llm2vec_fast_attention", "windowed_attention",
    "PackedBatch", "pack", "pack_sequences", "unpad", "repad",
]
