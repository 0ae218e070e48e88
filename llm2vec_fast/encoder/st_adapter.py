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
("float32" or None, or "int8"/"uint8"/"binary"/"ubinary" through sentence-transformers' ``quantize_embeddings``),
returning what ``SentenceTransformer.encode`` returns (one input: its (D,) row); ``task`` is accepted and
ignored, any other keyword raises ValueError as in sentence-transformers (``processing_kwargs`` too: set
``model.max_seq_length``, which sets the encoder's ``max_length``);
``similarity`` / ``similarity_pairwise`` (cosine by default); ``get_sentence_embedding_dimension``;
several processes through ``start_multi_process_pool`` / ``encode(..., pool=pool)`` /
``stop_multi_process_pool`` or ``encode(..., device=["cuda:0", "cuda:1"])`` (``LLM2Vec``'s pool: one model
load per process); ``output_value="token_embeddings"`` (a list of (tokens, D) tensors, every token
the model read, from ``LLM2Vec.encode_tokens``) or ``None`` (per text a dict of input_ids, an all-ones
attention_mask (no padding), token_embeddings and sentence_embedding, the last cut to ``truncate_dim`` as
sentence-transformers cuts it and, unlike sentence-transformers, normalised with ``normalize_embeddings``), in
this process only, on the CPU (sentence embeddings as tensors are on the encode device, as there);
``isinstance(model, SentenceTransformer)``; the module's ``preprocess`` (prompt as instruction) /
``tokenize`` / ``forward`` (llm2vec's padded features; the forward drops the padding, differentiable, and
returns ``token_embeddings`` too, so a plain SentenceTransformer's ``output_value="token_embeddings"`` works).

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
``LLM2Vec.forward``); a peft encoder trains its adapter. Its checkpoints are saved as ``save`` saves (merged,
plus the adapter itself in ``peft_adapter/``), so ``resume_from_checkpoint`` and ``load_best_model_at_end``
reload the adapter into the peft encoder.
The recipes of ``llm2vec_fast.training`` remain the fast path (token budgets, GradCache, lean layers).

Not supported (raise ValueError or NotImplementedError): ``chunk_size``, pickle weights
(``safe_serialization=False``).
"""
from __future__ import annotations

import functools
import os
import shutil
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
        _refuse_processing_kwargs(kwargs.get("processing_kwargs"))
        return self.tokenize(_with_prompt(list(inputs), prompt))

    def tokenize(self, texts, **kwargs) -> Dict[str, torch.Tensor]:
        prepared = [self.encoder.prepare_for_tokenization(self.encoder._convert_to_str(i, t))
                    for i, t in normalize_inputs(list(texts))]
        return dict(self.encoder.tokenize(prepared))

    def forward(self, features: Dict[str, torch.Tensor], **kwargs) -> Dict[str, torch.Tensor]:
        """``LLM2Vec.forward``'s sentence embeddings, plus the last hidden states as (B, S, D) float32
        ``token_embeddings`` aligned with ``attention_mask``: sentence-transformers' encode
        slices ``token_embeddings[attention_mask.bool()]``, which gives the tokens ``encode_tokens`` returns."""
        if "prompt_length" in features:
            # sentence-transformers before 5.4 glues a prompt to the front of each text and says so only here;
            # llm2vec reads a prompt as an instruction, so those features would embed something else.
            raise ValueError("this sentence-transformers version prepended the prompt to the texts (prompt_length "
                             "in the features); llm2vec encodes a prompt as an instruction: load the model with "
                             "llm2vec_fast.encoder.st_adapter.load_sentence_transformer, or use "
                             "sentence-transformers>=5.4")
        features = dict(features)
        features["sentence_embedding"], states = self.encoder._forward_with_states(features)
        features["token_embeddings"] = states.float()
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.encoder._hidden_size()

    get_embedding_dimension = get_sentence_embedding_dimension  # sentence-transformers 6's name

    @property
    def max_seq_length(self) -> int:
        return self.encoder.max_length

    @max_seq_length.setter
    def max_seq_length(self, value) -> None:
        """sentence-transformers' setter (``model.max_seq_length = n``): the encoder's ``max_length``, which
        every later encode and forward reads (checked as the encoder checks it, so a bad value fails here)."""
        from .llm2vec import _check_count
        _check_count("max_seq_length", value, low=1)
        self.encoder.max_length = int(value)

    @property
    def tokenizer(self):
        return self.encoder.tokenizer

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        """``LLM2Vec.save``: safetensors weights, tokenizer, llm2vec_config.json. An unmerged peft adapter is
        written merged into the weights (the encoder keeps it unmerged), so that the folder is a whole model,
        and also as itself in ``peft_adapter/``: merged weights cannot be split back into base and adapter, and
        a trainer that reloads a checkpoint into the peft encoder (``resume_from_checkpoint``,
        ``load_best_model_at_end``) needs the adapter (see ``_load_from_state_dict``)."""
        if not safe_serialization:
            raise ValueError("safe_serialization must be True: llm2vec_fast saves and loads safetensors only, got "
                             "False")
        self.encoder.save(output_path, merged_copy=True)
        adapter_folder = os.path.join(output_path, PEFT_ADAPTER_FOLDER)
        if os.path.isdir(adapter_folder):
            shutil.rmtree(adapter_folder)  # an adapter saved here before is not this model's
        peft_model = self._unmerged_peft()
        if peft_model is not None:
            peft_model.save_pretrained(adapter_folder, safe_serialization=True)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder: Optional[str] = None,
             revision: Optional[str] = None, local_files_only: bool = False, model_kwargs: Optional[dict] = None,
             **kwargs) -> "LLM2VecModule":
        """``LLM2Vec.from_pretrained`` of the module's folder, with ``model_kwargs`` (dtype, device_map,
        pooling_mode, ...). sentence-transformers' ``trust_remote_code`` is for importing this class and is
        not passed on: give ``model_kwargs={"trust_remote_code": True}`` for a model that needs it. The encoder
        is the merged model; a saved ``peft_adapter/`` is kept aside for a trainer's reload only."""
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
        module = cls(LLM2Vec.from_pretrained(path, **hub, **(model_kwargs or {})))
        if os.path.isdir(path):
            # Read now: a trainer may delete the checkpoint folder (save_total_limit) before it reloads.
            module._saved_adapter = _read_saved_adapter(os.path.join(path, PEFT_ADAPTER_FOLDER))
        return module

    # ------------------------------------------------------------- a trainer's reload of a peft encoder

    def _unmerged_peft(self):
        """The encoder's peft model when it holds an adapter that is not merged into its weights, else None."""
        from peft import PeftModel
        model = self.encoder.model
        if not isinstance(model, PeftModel):
            return None
        merged = [getattr(m, "merged", False) for m in model.modules() if hasattr(m, "merged_adapters")]
        return None if merged and all(merged) else model

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        # A module loaded from a folder with peft_adapter/ hands the adapter over with its (merged) weights, so
        # that load_state_dict into a peft encoder (sentence-transformers' trainer reloading a checkpoint) can
        # rebuild the adapter; _load_from_state_dict removes these entries again.
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, tensor in (getattr(self, "_saved_adapter", None) or {}).items():
            destination[f"{prefix}{PEFT_ADAPTER_KEY}.{key}"] = tensor

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        """A state dict of merged weights (a checkpoint loaded back by sentence-transformers' trainer) into an
        encoder with an unmerged peft adapter: the adapter comes from the checkpoint's ``peft_adapter/``, the
        base weights under it stay the encoder's (LoRA trains the adapter only; checked against the merged
        ones), every other weight is the checkpoint's. Without a saved adapter this raises ValueError rather
        than fail in torch's key matching (or, for ``load_best_model_at_end``, keep the last weights)."""
        marker = f"{prefix}{PEFT_ADAPTER_KEY}."
        saved = {key[len(marker):]: state_dict.pop(key) for key in list(state_dict) if key.startswith(marker)}
        peft_model = self._unmerged_peft()
        model_prefix = f"{prefix}encoder.model."
        ours = [key for key in state_dict if key.startswith(model_prefix)]
        merged_layout = ours and not any(key.startswith(f"{model_prefix}base_model.") for key in ours)
        if peft_model is not None and merged_layout:
            _load_merged_into_peft(peft_model, state_dict, model_prefix, saved)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


PEFT_ADAPTER_FOLDER = "peft_adapter"  # the unmerged adapter, next to the merged weights (see LLM2VecModule.save)
PEFT_ADAPTER_KEY = "peft_adapter"  # its entries in the state dict of a module loaded from such a folder


def _refuse_processing_kwargs(processing_kwargs) -> None:
    if processing_kwargs:
        raise ValueError(f"processing_kwargs is not supported: llm2vec tokenises with its own rules (max_length, "
                         f"doc_max_length); set model.max_seq_length or the encoder's max_length/doc_max_length "
                         f"instead, got processing_kwargs={processing_kwargs!r}")


def _read_saved_adapter(folder: str) -> Dict[str, torch.Tensor]:
    """The weights of each adapter that ``peft``'s save_pretrained wrote to ``folder`` ("default" at its root,
    any other adapter in a subfolder of its name), keyed ``<adapter>.<key>``; {} when there is none."""
    from safetensors.torch import load_file

    from .loading import ADAPTER_WEIGHTS
    found = {}
    if not os.path.isdir(folder):
        return found
    places = [("default", folder)] + [(name, os.path.join(folder, name)) for name in sorted(os.listdir(folder))]
    for name, place in places:
        weights = os.path.join(place, ADAPTER_WEIGHTS)
        if os.path.isfile(weights):
            found.update({f"{name}.{key}": tensor for key, tensor in load_file(weights).items()})
    return found


def _merged_name(key: str) -> str:
    """The key a peft model's state-dict entry has in the merged model's state dict."""
    if key.startswith("base_model.model."):
        key = key[len("base_model.model."):]
    return key.replace(".base_layer.", ".")


def _load_merged_into_peft(peft_model, state_dict, model_prefix: str, saved: Dict[str, torch.Tensor]) -> None:
    """Rewrites ``state_dict``'s merged weights under ``model_prefix`` as ``peft_model``'s own entries (see
    ``LLM2VecModule._load_from_state_dict``); the saved adapter is loaded into ``peft_model``."""
    from peft import set_peft_model_state_dict

    from .loading import merged_weights
    names = list(peft_model.peft_config)
    if not saved:
        raise ValueError("cannot load merged weights into an encoder with an unmerged peft adapter: the "
                         "checkpoint holds the adapter merged into the weights only (no peft_adapter/ folder, "
                         "which llm2vec_fast writes from this version on), and merged weights cannot be split "
                         "back into base and adapter. Load the checkpoint as a merged model instead "
                         "(load_sentence_transformer(path) or LLM2Vec.from_pretrained(path)) and train on from it")
    missing = [name for name in names if not any(key.startswith(f"{name}.") for key in saved)]
    if missing:
        raise ValueError(f"the checkpoint's peft_adapter/ holds no adapter named {missing} (this encoder's "
                         f"adapters: {names})")
    before = {key: value.detach().clone() for key, value in peft_model.state_dict().items() if ".lora_" in key}
    try:
        for name in names:
            weights = {key[len(name) + 1:]: value for key, value in saved.items() if key.startswith(f"{name}.")}
            result = set_peft_model_state_dict(peft_model, weights, adapter_name=name)
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise ValueError(f"the checkpoint's adapter {name!r} does not fit this encoder's peft model: "
                                 f"unexpected keys {unexpected[:5]}")
        # The base weights under LoRA layers stay ours (frozen while the adapter trains), so they must be those
        # the checkpoint was merged from: our base plus the checkpoint's adapter gives its merged weights.
        _, ours = merged_weights(peft_model)
        trainable = {_merged_name(key) for key, p in peft_model.named_parameters() if p.requires_grad}
        differ = []
        for key, mine in ours.items():
            theirs = state_dict.get(model_prefix + key)
            if theirs is None or key in trainable:
                continue
            if theirs.shape != mine.shape or not torch.allclose(theirs.to(mine), mine, rtol=1e-4, atol=1e-6):
                differ.append(key)
        if differ:
            raise ValueError(f"the checkpoint's weights were not merged from this encoder's base model ({differ[:3]} "
                             f"differ): reload it into an encoder built on the same base model")
    except Exception:
        peft_model.load_state_dict(before, strict=False)
        raise
    for key, value in peft_model.state_dict().items():
        merged_key = model_prefix + _merged_name(key)
        if ".lora_" in key or ".base_layer." in key:
            state_dict[model_prefix + key] = value  # the adapter just loaded, the base it was merged onto
        elif merged_key in state_dict:
            state_dict[model_prefix + key] = state_dict[merged_key]  # any other weight is the checkpoint's
    for key in ours:  # the merged names (peft's all start with base_model.model.)
        state_dict.pop(model_prefix + key, None)


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
                   output_value: Optional[str] = "sentence_embedding", precision: Optional[str] = "float32",
                   convert_to_numpy: bool = True, convert_to_tensor: bool = False, device=None,
                   normalize_embeddings: bool = False, truncate_dim: Optional[int] = None, pool=None,
                   chunk_size: Optional[int] = None, **kwargs):
            """``LLM2Vec.encode`` with SentenceTransformer.encode's arguments and return types (see the module
            docstring); a keyword it does not know raises ValueError, as SentenceTransformer.encode does, so that a
            misspelt option cannot pass unnoticed."""
            if "sentences" in kwargs:  # sentence-transformers' former name of inputs
                if inputs is not None:
                    raise TypeError("encode got both inputs and sentences (its former name): pass inputs only")
                inputs = kwargs.pop("sentences")
            kwargs.pop("task", None)  # routes inputs through a Router module; the adapter has none
            _refuse_processing_kwargs(kwargs.pop("processing_kwargs", None))
            if kwargs:
                raise ValueError(f"{type(self).__name__}.encode() has been called with keyword arguments that it does "
                                 f"not use: {sorted(kwargs)}; besides its named arguments it accepts only task, "
                                 f"sentences and (empty) processing_kwargs")
            if precision is None:
                precision = "float32"  # as SentenceTransformer.encode: no quantisation
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
                if output_value is None:
                    # SentenceTransformer's dicts hold the attention_mask too, which code masks the padding with;
                    # these rows have no padding, so every token counts.
                    for features in outputs:
                        features["attention_mask"] = torch.ones_like(features["input_ids"])
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
            # As SentenceTransformer.encode: one (N, D) tensor or array, or a list of (D,) tensors; one input gives
            # its row, (D,), whichever the form. Its tensors stay on the encode device (LLM2Vec.encode returns CPU
            # rows); quantised or multi-process ones are on the CPU there too.
            if (convert_to_tensor or not convert_to_numpy) and precision == "float32" and not several:
                embeddings = embeddings.to(own_device)
            if convert_to_tensor:
                out = embeddings
            elif convert_to_numpy:
                out = embeddings.numpy()
            else:
                out = list(embeddings)
            return out[0] if single else out

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
