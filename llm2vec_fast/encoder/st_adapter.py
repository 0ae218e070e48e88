"""sentence-transformers adapter: an ``LLM2Vec`` where a ``SentenceTransformer`` is expected.

    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer
    model = to_sentence_transformer(LLM2Vec.from_pretrained(path), prompts={"query": "Given a query, ..."})
    model.encode(["a text"]); model.encode_query(["a question"]); model.similarity(a, b)

``to_sentence_transformer`` returns a real ``SentenceTransformer`` (sentence-transformers 5 or 6 must be
installed) whose ``encode`` runs ``LLM2Vec.encode``, so llm2vec's semantics and the packed fast path are
kept. A prompt (``prompt=`` or ``prompt_name=``, also the "query"/"document" prompts that
``encode_query``/``encode_document`` pick) becomes llm2vec's instruction: the input is encoded as
``[prompt, text]``, so with ``skip_instruction`` the prompt is not pooled.

Supported: ``encode`` / ``encode_query`` / ``encode_document`` on a string or a list of strings (or
[instruction, text] pairs), with ``batch_size``, ``show_progress_bar``, ``convert_to_numpy``,
``convert_to_tensor``, ``normalize_embeddings``, ``device``, ``truncate_dim`` (per call, or for the model:
``to_sentence_transformer(..., truncate_dim=256)``; normalisation follows the cut) and ``precision``
("float32", or "int8"/"uint8"/"binary"/"ubinary" through sentence-transformers' ``quantize_embeddings``);
``similarity`` / ``similarity_pairwise`` (cosine by default); ``get_sentence_embedding_dimension``;
several processes through ``start_multi_process_pool`` / ``encode(..., pool=pool)`` /
``stop_multi_process_pool`` or ``encode(..., device=["cuda:0", "cuda:1"])`` (``LLM2Vec``'s pool: one model
load per process); ``output_value="token_embeddings"`` (a list of (tokens, D) tensors, every token
the model read, from ``LLM2Vec.encode_tokens``) or ``None`` (per text a dict of input_ids,
token_embeddings and sentence_embedding, the last cut to ``truncate_dim`` as sentence-transformers cuts it
and, unlike sentence-transformers, normalised with ``normalize_embeddings``), in this process only;
``isinstance(model, SentenceTransformer)``; the module's ``tokenize``/``forward`` (llm2vec's padded
features, differentiable). Not supported (raise ValueError or NotImplementedError): ``chunk_size``,
saving or loading through sentence-transformers (use ``LLM2Vec.save`` / ``from_pretrained``), training
with ``fit``/the trainer.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from .parallel import EncodePool
from .text import normalize_inputs


PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


class LLM2VecModule(nn.Module):
    """The one module of the adapter: llm2vec's ``tokenize`` and ``forward`` in sentence-transformers' terms."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def tokenize(self, texts, **kwargs) -> Dict[str, torch.Tensor]:
        items = normalize_inputs(list(texts))
        prepared = [self.encoder.prepare_for_tokenization(self.encoder._convert_to_str(i, t)) for i, t in items]
        return dict(self.encoder.tokenize(prepared))

    def forward(self, features: Dict[str, torch.Tensor], **kwargs) -> Dict[str, torch.Tensor]:
        features = dict(features)
        features["sentence_embedding"] = self.encoder.forward(features)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder._hidden_size()

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    def save(self, *args, **kwargs):
        raise NotImplementedError("save the encoder with LLM2Vec.save(path) and load it with LLM2Vec.from_pretrained")


def to_sentence_transformer(encoder, *, prompts: Optional[Dict[str, str]] = None,
                            default_prompt_name: Optional[str] = None, similarity_fn_name: str = "cosine",
                            device: Optional[str] = None, truncate_dim: Optional[int] = None):
    """A ``SentenceTransformer`` running ``encoder`` (an ``LLM2Vec``); see the module docstring."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError("to_sentence_transformer needs sentence-transformers (pip install sentence-transformers)") \
            from None

    class LLM2VecSentenceTransformer(SentenceTransformer):
        """A SentenceTransformer whose encode is ``LLM2Vec.encode`` (prompts become instructions)."""

        def encode(self, inputs=None, prompt_name: Optional[str] = None, prompt: Optional[str] = None,
                   batch_size: int = 32, show_progress_bar: Optional[bool] = None,
                   output_value: Optional[str] = "sentence_embedding", precision: str = "float32",
                   convert_to_numpy: bool = True, convert_to_tensor: bool = False, device=None,
                   normalize_embeddings: bool = False, truncate_dim: Optional[int] = None, pool=None,
                   chunk_size: Optional[int] = None, **kwargs):
            if inputs is None:
                inputs = kwargs.pop("sentences", None)
            kwargs.pop("task", None)
            if output_value not in ("sentence_embedding", "token_embeddings", None):
                raise ValueError(f"output_value must be 'sentence_embedding', 'token_embeddings' or None, got "
                                 f"{output_value!r}")
            if precision not in PRECISIONS:
                raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
            if truncate_dim is None:
                truncate_dim = self.truncate_dim
            if chunk_size is not None:
                raise NotImplementedError("chunk_size is not supported: the pool splits the inputs by length itself")
            if pool is not None and not isinstance(pool, EncodePool):
                raise TypeError(f"pool must come from this model's start_multi_process_pool (an EncodePool), got "
                                f"{type(pool).__name__}")
            several = {}
            if pool is not None:
                several["pool"] = pool
            elif isinstance(device, (list, tuple)):
                several["devices"] = list(device)  # one process per device for this call
            if prompt is None and prompt_name is None:
                prompt_name = self.default_prompt_name
            if prompt is None and prompt_name is not None:
                if prompt_name not in self.prompts:
                    raise ValueError(f"prompt_name {prompt_name!r} not found in prompts {sorted(self.prompts)}")
                prompt = self.prompts[prompt_name]
            single = isinstance(inputs, str)
            pairs = [[prompt if prompt and not instruction else instruction, text]
                     for instruction, text in normalize_inputs(inputs)]
            own_device = device if device is not None else str(self.device)
            if show_progress_bar is None:
                show_progress_bar = False
            if output_value != "sentence_embedding":
                # As SentenceTransformer.encode: a list of (tokens, D) tensors, or of dicts with None; the
                # convert_to_* and precision options apply to sentence embeddings only.
                if several:
                    raise ValueError(f"output_value={output_value!r} runs in this process only: pass one device, "
                                     f"not pool= or a device list")
                outputs = llm2vec.encode_tokens(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                                device=own_device, output_value=output_value,
                                                normalize_embeddings=normalize_embeddings,
                                                **({} if output_value else {"truncate_dim": truncate_dim}))
                return outputs[0] if single else outputs
            embeddings = llm2vec.encode(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar,
                                        device=None if several else own_device,
                                        normalize_embeddings=normalize_embeddings, truncate_dim=truncate_dim,
                                        **several)
            if precision != "float32" and len(embeddings):
                # sentence-transformers' own quantiser: int8/uint8 ranges from these embeddings, binary packed
                # 8 dimensions a byte, as SentenceTransformer.encode does.
                from sentence_transformers import quantize_embeddings
                embeddings = torch.from_numpy(quantize_embeddings(embeddings.numpy(), precision=precision))
            if single:
                embeddings = embeddings[0]
            if convert_to_tensor:
                return embeddings
            if convert_to_numpy:
                return embeddings.numpy()
            return list(embeddings)

        def start_multi_process_pool(self, target_devices=None, **kwargs):
            """One encoding process per device (default: every visible GPU, else 4 CPU processes), each
            loading the model once: ``LLM2Vec.start_multi_process_pool``."""
            if target_devices is None:
                count = torch.cuda.device_count()
                target_devices = [f"cuda:{i}" for i in range(count)] if count else ["cpu"] * 4
            return llm2vec.start_multi_process_pool(list(target_devices))

        @staticmethod
        def stop_multi_process_pool(pool) -> None:
            pool.close()

        def save(self, *args, **kwargs):
            raise NotImplementedError("save with LLM2Vec.save(path); load with LLM2Vec.from_pretrained(path) and "
                                      "to_sentence_transformer")

        def fit(self, *args, **kwargs):
            raise NotImplementedError("training through sentence-transformers is not supported by this adapter")

    llm2vec = encoder
    if device is None:
        try:
            device = str(next(encoder.parameters()).device)
        except StopIteration:
            device = "cpu"
    model = LLM2VecSentenceTransformer(modules=[LLM2VecModule(encoder)], device=device, prompts=prompts or {},
                                       default_prompt_name=default_prompt_name,
                                       similarity_fn_name=similarity_fn_name, truncate_dim=truncate_dim)
    return model


def supported_features() -> List[str]:
    """What the adapter supports (for documentation and tests)."""
    return ["encode", "encode_query", "encode_document", "similarity", "similarity_pairwise",
            "get_sentence_embedding_dimension", "prompts", "normalize_embeddings", "truncate_dim", "precision",
            "convert_to_numpy", "convert_to_tensor", "start_multi_process_pool", "pool", "device list",
            "output_value token_embeddings / None"]


__all__ = ["LLM2VecModule", "to_sentence_transformer", "supported_features"]
