"""sentence-transformers adapter: an ``LLM2Vec`` where a ``SentenceTransformer`` is expected.

    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer, load_sentence_transformer
    model = to_sentence_transformer(LLM2Vec.from_pretrained(path), prompts={"query": "Given a query, ..."})
    model.encode(["a text"]); model.encode_query(["a question"]); model.similarity(a, b)
    model.save("out")                                   # sentence-transformers' folder, llm2vec's files at its root
    model = load_sentence_transformer("out")            # the same adapter again (prompts, similarity, truncate_dim)
    model = SentenceTransformer("out", trust_remote_code=True)   # plain sentence-transformers: same embeddings

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
``isinstance(model, SentenceTransformer)``; the module's ``preprocess`` (prompt as instruction) /
``tokenize`` / ``forward`` (llm2vec's padded features; the forward drops the padding, differentiable).

Saving and loading: ``model.save(path)`` / ``save_pretrained`` write sentence-transformers' folder
(``modules.json``, ``config_sentence_transformers.json`` with the prompts, the similarity function and
``truncate_dim``, a model card), with the module's files at its root: what ``LLM2Vec.save`` writes
(safetensors weights, tokenizer, ``llm2vec_config.json``; an unmerged peft adapter is written merged into the
weights, without merging the encoder's), so ``LLM2Vec.from_pretrained`` reads the folder too. This needs
sentence-transformers>=5.4 (older versions raise ImportError here).
``load_sentence_transformer(path, **model_kwargs)`` loads it back as this adapter;
``SentenceTransformer(path, trust_remote_code=True)`` (the flag allows sentence-transformers to import
``llm2vec_fast``'s module class; it is not passed to the model) loads it as a plain ``SentenceTransformer``
whose encode runs the module's packed forward with sentence-transformers' batching: the same embeddings.

Training: sentence-transformers' losses and ``SentenceTransformerTrainer`` (or ``fit``) train the adapter, or a
plain ``SentenceTransformer`` loaded from its folder, through the module's ``preprocess`` and ``forward`` (the
packed forward, differentiable; the trainer's ``prompts`` become instructions), so a loss sees the embeddings
``encode`` gives (``MultipleNegativesRankingLoss``'s gradient equals ``contrastive_loss``'s on
``LLM2Vec.forward``); a peft encoder trains its adapter. Its checkpoints are saved as ``save`` saves (merged).
The recipes of ``llm2vec_fast.training`` remain the fast path (token budgets, GradCache, lean layers).

Not supported (raise ValueError or NotImplementedError): ``chunk_size``, pickle weights
(``safe_serialization=False``).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional

import torch
from torch import nn

from .parallel import EncodePool
from .text import normalize_inputs


PRECISIONS = ("float32", "int8", "uint8", "binary", "ubinary")


def _with_prompt(inputs, prompt: Optional[str]) -> List[List[str]]:
    """The inputs as [instruction, text] pairs; the prompt is the instruction of those without one."""
    return [[prompt if prompt and not instruction else instruction, text] for instruction, text in
            normalize_inputs(inputs)]


class LLM2VecModule(nn.Module):
    """The one module of the adapter: llm2vec's ``tokenize`` and ``forward`` in sentence-transformers' terms."""

    save_in_root = True  # sentence-transformers saves the first module's files at the folder's root

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def preprocess(self, inputs, prompt: Optional[str] = None, **kwargs) -> Dict[str, torch.Tensor]:
        """Features of a batch (sentence-transformers >= 5.4 calls this), the prompt as llm2vec's instruction."""
        return self.tokenize(_with_prompt(list(inputs), prompt))

    def tokenize(self, texts, **kwargs) -> Dict[str, torch.Tensor]:
        prepared = [self.encoder.prepare_for_tokenization(self.encoder._convert_to_str(i, t))
                    for i, t in normalize_inputs(list(texts))]
        return dict(self.encoder.tokenize(prepared))

    def forward(self, features: Dict[str, torch.Tensor], **kwargs) -> Dict[str, torch.Tensor]:
        if "prompt_length" in features:
            # sentence-transformers before 5.4 glues a prompt to the front of each text and says so only here;
            # llm2vec reads a prompt as an instruction, so those features would embed something else.
            raise ValueError("this sentence-transformers version prepended the prompt to the texts (prompt_length "
                             "in the features); llm2vec encodes a prompt as an instruction: load the model with "
                             "llm2vec_fast.encoder.st_adapter.load_sentence_transformer, or use "
                             "sentence-transformers>=5.4")
        features = dict(features)
        features["sentence_embedding"] = self.encoder.forward(features)
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder._hidden_size()

    get_embedding_dimension = get_sentence_embedding_dimension  # sentence-transformers 6's name

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """``LLM2Vec.save``: safetensors weights, tokenizer, llm2vec_config.json. An unmerged peft adapter is
        written merged into the weights (the encoder keeps it unmerged), so that the folder is a whole model."""
        if not safe_serialization:
            raise ValueError("safe_serialization must be True: llm2vec_fast saves and loads safetensors only, got "
                             "False")
        self.encoder.save(output_path, merged_copy=True)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder: Optional[str] = None,
             revision: Optional[str] = None, local_files_only: bool = False, model_kwargs: Optional[dict] = None,
             **kwargs) -> "LLM2VecModule":
        """``LLM2Vec.from_pretrained`` of the module's folder, with ``model_kwargs`` (dtype, device_map,
        pooling_mode, ...). sentence-transformers' ``trust_remote_code`` is for importing this class and is
        not passed on: give ``model_kwargs={"trust_remote_code": True}`` for a model that needs it."""
        from .llm2vec import LLM2Vec
        path = os.fspath(model_name_or_path)
        if subfolder:
            if not os.path.isdir(path):
                raise ValueError(f"subfolder must be '' for a hub repository (LLM2VecModule saves at the root), "
                                 f"got {subfolder!r}")
            path = os.path.join(path, subfolder)
        hub = {"token": token, "cache_dir": cache_folder, "revision": revision,
               "local_files_only": local_files_only or None}
        hub = {key: value for key, value in hub.items() if value is not None and not os.path.isdir(path)}
        return cls(LLM2Vec.from_pretrained(path, **hub, **(model_kwargs or {})))


_MODULE_REF = f"{LLM2VecModule.__module__}.{LLM2VecModule.__name__}"  # the type modules.json records


@functools.lru_cache(maxsize=None)
def _adapter_class():
    """``LLM2VecSentenceTransformer``, made once on first use so that this module imports without
    sentence-transformers."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ImportError("the sentence-transformers adapter needs sentence-transformers (pip install "
                          "sentence-transformers)") from None

    class LLM2VecSentenceTransformer(SentenceTransformer):
        """A SentenceTransformer whose encode is ``LLM2Vec.encode`` (prompts become instructions)."""

        @property
        def model_type(self) -> str:
            # What config_sentence_transformers.json records: a plain SentenceTransformer loads the folder as its
            # own (sentence-transformers 5.4-5.x set the class name here and would otherwise convert it).
            return "SentenceTransformer"

        @model_type.setter
        def model_type(self, value) -> None:
            pass

        @property
        def llm2vec(self):
            return self[0].encoder

        def _load_module_class_from_ref(self, class_ref, *args, **kwargs):
            # Our own module needs no trust_remote_code; any other type in modules.json resolves as usual.
            if class_ref == _MODULE_REF:
                return LLM2VecModule
            return super()._load_module_class_from_ref(class_ref, *args, **kwargs)

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
            pairs = _with_prompt(inputs, prompt)
            own_device = device if device is not None else str(self.device)
            if show_progress_bar is None:
                show_progress_bar = False
            if output_value != "sentence_embedding":
                # As SentenceTransformer.encode: a list of (tokens, D) tensors, or of dicts with None; the
                # convert_to_* and precision options apply to sentence embeddings only.
                if several:
                    raise ValueError(f"output_value={output_value!r} runs in this process only: pass one device, "
                                     f"not pool= or a device list")
                outputs = self.llm2vec.encode_tokens(pairs, batch_size=batch_size,
                                                     show_progress_bar=show_progress_bar, device=own_device,
                                                     output_value=output_value,
                                                     normalize_embeddings=normalize_embeddings,
                                                     **({} if output_value else {"truncate_dim": truncate_dim}))
                return outputs[0] if single else outputs
            embeddings = self.llm2vec.encode(pairs, batch_size=batch_size, show_progress_bar=show_progress_bar,
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
            return self.llm2vec.start_multi_process_pool(list(target_devices))

        @staticmethod
        def stop_multi_process_pool(pool) -> None:
            pool.close()

        def save(self, *args, **kwargs):  # save_pretrained comes here too
            _check_saving_version()
            return super().save(*args, **kwargs)

    LLM2VecSentenceTransformer.__module__ = __name__
    return LLM2VecSentenceTransformer


SAVING_VERSION = (5, 4)  # the first sentence-transformers that saves truncate_dim and hands prompts to modules


def _check_saving_version() -> None:
    try:
        from sentence_transformers import __version__
    except ImportError:
        raise ImportError("saving and loading through sentence-transformers needs sentence-transformers>=5.4 (pip "
                          "install 'sentence-transformers>=5.4')") from None
    if tuple(int(part) for part in __version__.split(".")[:2]) < SAVING_VERSION:
        raise ImportError(f"saving and loading through sentence-transformers needs sentence-transformers>=5.4 (older "
                          f"ones record the adapter as a model type of its own and glue prompts to the texts), found "
                          f"{__version__}; use LLM2Vec.save and LLM2Vec.from_pretrained")


def to_sentence_transformer(encoder, *, prompts: Optional[Dict[str, str]] = None,
                            default_prompt_name: Optional[str] = None, similarity_fn_name: str = "cosine",
                            device: Optional[str] = None, truncate_dim: Optional[int] = None):
    """A ``SentenceTransformer`` running ``encoder`` (an ``LLM2Vec``); see the module docstring."""
    if device is None:
        try:
            device = str(next(encoder.parameters()).device)
        except StopIteration:
            device = "cpu"
    return _adapter_class()(modules=[LLM2VecModule(encoder)], device=device, prompts=prompts or {},
                            default_prompt_name=default_prompt_name, similarity_fn_name=similarity_fn_name,
                            truncate_dim=truncate_dim)


def load_sentence_transformer(path: str, *, device: Optional[str] = None, truncate_dim: Optional[int] = None,
                              **model_kwargs):
    """The adapter of a folder (or hub repository) saved by its ``save``: prompts, default prompt, similarity
    function and ``truncate_dim`` as saved (``truncate_dim=`` overrides); ``model_kwargs`` go to
    ``LLM2Vec.from_pretrained`` (``dtype``, ``pooling_mode``, ``max_length``, ...)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    options = {"truncate_dim": truncate_dim} if truncate_dim is not None else {}
    adapter_class = _adapter_class()
    _check_saving_version()
    return adapter_class(os.fspath(path), device=device, model_kwargs=model_kwargs or None, **options)


def supported_features() -> List[str]:
    """What the adapter supports (for documentation and tests)."""
    return ["encode", "encode_query", "encode_document", "similarity", "similarity_pairwise",
            "get_sentence_embedding_dimension", "prompts", "normalize_embeddings", "truncate_dim", "precision",
            "convert_to_numpy", "convert_to_tensor", "start_multi_process_pool", "pool", "device list",
            "output_value token_embeddings / None", "save / save_pretrained", "load_sentence_transformer",
            "SentenceTransformer(path, trust_remote_code=True)", "losses and SentenceTransformerTrainer"]


__all__ = ["LLM2VecModule", "to_sentence_transformer", "load_sentence_transformer", "supported_features"]
