"""``LLM2Vec``: a drop-in for llm2vec 0.2.3's encoder, with a packed fast path.

Same constructor, ``from_pretrained``, ``encode``, ``save``, ``tokenize``, ``forward`` and
``get_pooling``, and the same embeddings on the same checkpoint (to float32 rounding): llm2vec's
separator, word truncation, chat templates, EOS texts and ``embed_mask`` are reproduced exactly
(``text.py``, ``tokenization.py``). What differs is how the work is done: each distinct string is
tokenised once, the texts are sorted by length and packed into batches of at most
``max_tokens_per_batch`` real tokens, the model runs on the packed tokens (``forward_packed``: no
compute on padding; causal per sequence with ``enable_bidirectional=False``) and the embeddings are
pooled straight from the packed layout (``llm2vec_fast.pool``, float32). On a CUDA device each batch
is built on the host in pinned memory, copied asynchronously and only enqueued (no host sync inside a
batch), the host preparing the next batch meanwhile; the embeddings gather on the device and come to
the CPU once per chunk of inputs, through pinned memory while the next chunk runs, and the next chunk is
tokenised on a background thread while the device runs this one (the first chunks small, so that the
device starts early).

Behaviour that deliberately differs from llm2vec 0.2.3 (each a bug or an input llm2vec cannot take):
- a single string is one text (llm2vec encodes each of its characters); an empty list gives a
  (0, hidden) result; an item that is neither a string nor an [instruction, text] pair of strings
  raises TypeError naming its index; strings and pairs may be mixed in one list;
- ``mean`` pooling with ``skip_instruction`` of an input with nothing after the separator (an empty
  text) pools every real token of the input. llm2vec's ``x[i, -0:]`` pools the whole padded row,
  padding included, so its result depends on the batch; it equals ours when the input is encoded
  alone (or is the longest in its batch);
- an input whose text part, tokenised alone, has more tokens than the whole input (seen with a tokenizer
  that adds no BOS and an instruction of whitespace only) pools every real token: llm2vec's embed_mask
  then covers padding positions too, and an input encoded alone fails there;
- ``bos_token`` pools each sequence's first token (llm2vec selects the positions equal to the BOS id,
  which is wrong when a sequence has none or several);
- an input with no token at all (an empty text with a tokenizer that adds no BOS) embeds to zeros;
- pooled values are accumulated in float32 (llm2vec pools in the model's dtype, then casts);
- a config with a ``sliding_window`` (Mistral v0.1's 4096) keeps a symmetric window on inputs longer than it:
  llm2vec's bidirectional mask drops the window under eager and sdpa (full attention) and keeps it under
  flash_attention_2. The LLM2Vec Mistral checkpoints' base (v0.2) has no window; shorter inputs are unaffected.
"""
from __future__ import annotations

import collections
import json
import numbers
import os
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..models.attention import ATTN_IMPLEMENTATION
from ..models.bidirectional import check_family, decoder_body, forward_packed, is_bidirectional
from ..models.classes import BI_MODELS
from ..models.lean import lean_layers
from ..models.packing import PackedBatch, pack, pack_sequences
from ..ops.pooling import pool
from . import loading
from .parallel import EncodePool, encode_over_ranks
from .text import InputItem, join_instruction, normalize_inputs, prepare_for_tokenization, split_separator, \
    truncate_by_words
from .tokenization import Plan, SpecialTokens, TokenCache, left_padded, plan_inputs, tokenize_with_specials

POOLING_MODES = ("mean", "weighted_mean", "eos_token", "last_token", "bos_token")
_POOL_MODE = {"mean": "mean", "weighted_mean": "weighted_mean", "eos_token": "last_token",
              "last_token": "last_token", "bos_token": "bos_token"}
ENCODER_ARGS = ("pooling_mode", "max_length", "doc_max_length", "skip_instruction")
# The llm2vec_config.json key that records a causal encoder (save writes it only then: llm2vec 0.2.3 would refuse
# a folder with it rather than load the model bidirectional).
BIDIRECTIONAL_KEY = "enable_bidirectional"
PLAN_CHUNK = 16384  # inputs tokenised, sorted and batched together (bounds the memory of token lists)
# On a GPU the first chunks are smaller: FIRST_PLAN_CHUNK inputs, doubling up to PLAN_CHUNK (plan_chunks), so
# that the device starts once a few texts are tokenised instead of a whole chunk (an encode of a few thousand
# texts is one chunk), the rest being tokenised on the background thread meanwhile.
FIRST_PLAN_CHUNK = 64
# Default token budget on the CPU: larger packs spill the caches (benchmarks/bench_encode.py workload, one
# thread, seconds per encode of 384 texts; 4 layers, hidden 256: 512 tokens 3.6, 1024 3.4, 2048 4.0, 4096 4.3;
# hidden 512 (192 texts): 512 5.8, 1024 5.7-6.0, 2048 6.0, 4096 6.0).
CPU_TOKEN_BUDGET = 1024
# Batches enqueued on a CUDA device beyond the oldest one still running: with 1, the host prepares and enqueues
# batch i+1 while the device runs batch i, then waits (a CUDA event) for batch i-1 at most. 0 waits for each
# batch before preparing the next (no overlap). Results are the same either way.
GPU_LOOKAHEAD = 1


class LLM2Vec(nn.Module):
    """Text embeddings from a (bidirectional) decoder, as llm2vec 0.2.3's ``LLM2Vec``.

    ``model`` is the decoder body (e.g. ``MistralBiModel``, possibly inside a peft model) and
    ``tokenizer`` its tokenizer; ``pooling_mode`` is one of mean, weighted_mean, eos_token,
    last_token, bos_token; ``max_length`` caps the tokens per input, ``doc_max_length`` the tokens of
    the text part (cut by whole words); ``skip_instruction`` pools only the text's tokens.
    """

    def __init__(self, model, tokenizer, pooling_mode: str = "mean", max_length: int = 512,
                 doc_max_length: int = 400, skip_instruction: bool = True):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.skip_instruction = skip_instruction
        self.max_length = max_length
        self.doc_max_length = doc_max_length
        self.config = model.config

    # ------------------------------------------------------------------------------------- loading

    @classmethod
    def _get_model_class(cls, config, enable_bidirectional: bool):
        from transformers import AutoModel
        if not enable_bidirectional:
            return AutoModel
        model_type = getattr(config, "model_type", None)
        if model_type not in BI_MODELS:
            raise ValueError(f"{type(config).__name__} (model_type={model_type!r}) is not supported yet with "
                             f"bidirectional models; supported: {', '.join(BI_MODELS)} (or pass "
                             f"enable_bidirectional=False)")
        return BI_MODELS[model_type]

    @classmethod
    def from_pretrained(cls, base_model_name_or_path, peft_model_name_or_path=None, merge_peft: bool = False,
                        enable_bidirectional: Optional[bool] = None, **kwargs) -> "LLM2Vec":
        """Loads tokenizer, config and model as llm2vec 0.2.3 does, from a folder or the hub cache.

        ``pooling_mode``, ``max_length``, ``doc_max_length`` and ``skip_instruction`` are taken from the
        kwargs (overriding ``llm2vec_config.json``, read from ``peft_model_name_or_path`` if given, else
        from the base folder); every other kwarg (``torch_dtype``/``dtype``, ``attn_implementation``,
        ``device_map``, ...) goes to the model's ``from_pretrained``. When the base folder holds a peft
        adapter (llm2vec's MNTP checkpoints: config, tokenizer and adapter, the weights named by
        ``adapter_config.json``'s ``base_model_name_or_path``), the adapter is merged into the base;
        ``peft_model_name_or_path`` then adds a second adapter, merged when ``merge_peft``.
        ``enable_bidirectional`` defaults to what :meth:`save` recorded for a causal encoder
        (``"enable_bidirectional": false`` in that ``llm2vec_config.json``), else True (llm2vec's default).

        Differences from llm2vec, all about safety or speed: weights are read from safetensors only;
        ``trust_remote_code`` is False unless given; the dtype defaults to float32 (transformers
        4.44's default, which llm2vec got) unless ``dtype``/``torch_dtype`` is given; models of the
        supported families (bidirectional or not) get ``attn_implementation="llm2vec_fast"`` unless another
        is given (``dtype``, ``torch_dtype`` or ``attn_implementation`` given as None, as llm2vec's run scripts
        pass them when unset, mean the default, as they did in transformers 4.44); a base folder that holds both
        an adapter and full weights loads its own weights (transformers 5's rule). An adapter that saved a
        larger embedding matrix (peft does where training added tokens, as MNTP's ``<mask>``) gets the base's
        embeddings resized to it first.
        """
        from peft import PeftModel
        from transformers import AutoConfig, AutoTokenizer

        load_spec = {"args": (base_model_name_or_path, peft_model_name_or_path, merge_peft, enable_bidirectional),
                     "kwargs": dict(kwargs)}  # how a pool worker loads the same encoder (parallel.py)
        encoder_args = {}
        for key in ENCODER_ARGS:
            value = kwargs.pop(key, None)
            if value is not None:
                encoder_args[key] = value
        for key in ("dtype", "torch_dtype", "attn_implementation"):
            if key in kwargs and kwargs[key] is None:  # "not set" in llm2vec's scripts: the default
                del kwargs[key]
        hub = loading.hub_kwargs(kwargs)
        trust_remote_code = kwargs.pop("trust_remote_code", False)
        if "torch_dtype" in kwargs:
            torch_dtype = kwargs.pop("torch_dtype")
            kwargs.setdefault("dtype", torch_dtype)
        kwargs.setdefault("dtype", torch.float32)
        if kwargs.setdefault("use_safetensors", True) is not True:
            raise ValueError("LLM2Vec.from_pretrained loads safetensors weights only (use_safetensors=True)")
        base = os.fspath(base_model_name_or_path)

        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code, **hub)
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code, **hub)
        settings = loading.llm2vec_config(peft_model_name_or_path if peft_model_name_or_path is not None else base)
        recorded = settings.pop(BIDIRECTIONAL_KEY, True)
        if not isinstance(recorded, bool):
            raise ValueError(f"{loading.LLM2VEC_CONFIG}'s {BIDIRECTIONAL_KEY!r} must be true or false, got "
                             f"{recorded!r}")
        if enable_bidirectional is None:
            enable_bidirectional = recorded
        model_class = cls._get_model_class(config, enable_bidirectional)
        if getattr(config, "model_type", None) in BI_MODELS:  # causal ones too: the kernels take causal=True
            kwargs.setdefault("attn_implementation", ATTN_IMPLEMENTATION)

        adapter_config = loading.resolve_file(base, loading.ADAPTER_CONFIG, hub)
        weights_from = base
        if adapter_config is not None and not loading.holds_weights(base):
            weights_from = loading.read_json(adapter_config).get("base_model_name_or_path") or base
        if adapter_config is not None and weights_from == base:
            # Full weights and an adapter in one folder: load the weights through a view of the folder
            # without the adapter, so that transformers does not load the adapter itself (it is merged
            # below, once, through peft).
            with loading.without_adapter(base) as view:
                model = model_class.from_pretrained(view, trust_remote_code=trust_remote_code, **kwargs)
            model.name_or_path = base  # not the view's (gone), which peft would record as an adapter's base
        else:
            model = model_class.from_pretrained(weights_from, trust_remote_code=trust_remote_code, **kwargs)
        model.config._name_or_path = loading.name_or_path(base, weights_from)

        if adapter_config is not None:
            folder = loading.adapter_folder(base, hub)
            loading.fit_vocabulary(model, folder)
            model = PeftModel.from_pretrained(model, folder).merge_and_unload()
        if peft_model_name_or_path is not None:
            other_repo = {k: v for k, v in hub.items() if k != "revision"}  # the revision is the base's
            folder = loading.adapter_folder(os.fspath(peft_model_name_or_path), other_repo)
            loading.fit_vocabulary(model, folder)
            model = PeftModel.from_pretrained(model, folder)
            if merge_peft:
                model = model.merge_and_unload()

        settings.update(encoder_args)
        encoder = cls(model=model, tokenizer=tokenizer, **settings)
        encoder._load_spec = load_spec
        return encoder

    def save(self, output_path, merge_before_save: bool = False, save_config: bool = True, *,
             merged_copy: bool = False) -> None:
        """Saves model (safetensors), tokenizer and ``llm2vec_config.json``, as llm2vec does; also keeps
        the template name in config.json's ``_name_or_path``. A peft model is saved as its adapter, merged
        into the base first with ``merge_before_save``; ``merged_copy=True`` writes the merged weights instead
        and leaves this encoder's adapter unmerged (plain LoRA only), so that the folder holds a full model.
        A causal encoder (``enable_bidirectional=False``) is recorded as such in ``llm2vec_config.json``.

        The files of the other layout left by an earlier save into the same folder (an adapter beside full
        weights, or full weights beside an adapter), which :meth:`from_pretrained` would combine with these,
        are removed, with a warning naming them."""
        from peft import PeftModel
        output_path = os.fspath(output_path)
        if merge_before_save and isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
            if hasattr(self.model, "_hf_peft_config_loaded"):
                self.model._hf_peft_config_loaded = False
        as_adapter = isinstance(self.model, PeftModel) and not merged_copy
        if merged_copy and isinstance(self.model, PeftModel):
            base, state = loading.merged_weights(self.model)
            base.save_pretrained(output_path, state_dict=state)
        else:
            self.model.save_pretrained(output_path)
        loading.remove_other_layout(output_path, adapter=as_adapter)
        self.tokenizer.save_pretrained(output_path)
        loading.record_name_or_path(output_path, self._name_or_path())
        if save_config:
            os.makedirs(output_path, exist_ok=True)
            settings = self._settings()
            if not is_bidirectional(self.model):
                settings[BIDIRECTIONAL_KEY] = False
            with open(os.path.join(output_path, loading.LLM2VEC_CONFIG), "w") as f:
                json.dump(settings, f, indent=4)

    # ----------------------------------------------------------------------------- llm2vec's text steps

    def _name_or_path(self) -> str:
        return str(getattr(self.model.config, "_name_or_path", "") or "")

    def prepare_for_tokenization(self, text: str) -> str:
        """The chat template of the checkpoint's name, then the EOS text for eos_token pooling."""
        return prepare_for_tokenization(text, self._name_or_path(), getattr(self.model.config, "model_type", None),
                                        self.pooling_mode)

    def _convert_to_str(self, instruction: str, text: str) -> str:
        """The text cut to doc_max_length tokens by words, joined to the instruction by the separator."""
        cache = TokenCache(self.tokenizer, self.max_length)
        (text,), _ = truncate_by_words([text], cache.counts, self.max_length, self.doc_max_length)
        return join_instruction(instruction, text)

    def _specials(self) -> Optional[SpecialTokens]:
        return SpecialTokens.detect(self.tokenizer)

    def tokenize(self, texts: Sequence[str]):
        """llm2vec's padded features of prepared strings (separator inside): ``input_ids``,
        ``attention_mask`` and ``embed_mask`` (the last n positions, n the text part's token count),
        left-padded to the longest, as a ``BatchEncoding`` of long tensors."""
        from transformers import BatchEncoding
        texts = list(texts)
        cache = TokenCache(self.tokenizer, self.max_length)
        split = [split_separator(t) for t in texts]
        finals, parts = [f for f, _ in split], [p for _, p in split]
        specials = self._specials()
        cache.fill(parts + (finals if specials is not None else []))
        counts = [min(len(cache.ids(part)), self.max_length) for part in parts]
        if specials is not None:
            input_ids = [specials.apply(cache.ids(f), self.max_length) for f in finals]
        else:
            input_ids = tokenize_with_specials(self.tokenizer, finals, self.max_length)
        ids, mask, embed = left_padded(input_ids, counts, self._pad_id())
        shape = (len(texts), len(ids[0]) if ids else 0)  # (0, 0) for no texts, as reshape(0, -1) cannot say
        return BatchEncoding({name: torch.tensor(rows, dtype=torch.long).reshape(shape)
                              for name, rows in (("input_ids", ids), ("attention_mask", mask), ("embed_mask", embed))})

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else 0

    def plan(self, items: Sequence[InputItem], direct: bool = False, word_cut: bool = True) -> Plan:
        """Token ids and embed counts of (instruction, text) inputs, exactly as llm2vec's encode computes them;
        ``word_cut=False`` as its training collator does (no ``doc_max_length`` cut, ``max_length`` only)."""
        # doc_max_length = max_length never cuts: the lengths it compares are capped at max_length
        return plan_inputs(items, self.tokenizer, self.prepare_for_tokenization, self.max_length,
                           self.doc_max_length if word_cut else self.max_length, specials=self._specials(),
                           direct=direct)

    # ----------------------------------------------------------------------------------- forward/pool

    def _check_settings(self) -> None:
        """The settings an encode reads (attributes users may set after construction, as with llm2vec)."""
        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"{self.pooling_mode} is not implemented yet.")
        _check_count("max_length", self.max_length, low=1)
        _check_count("doc_max_length", self.doc_max_length, low=0)

    def _packable(self) -> bool:
        """True when the packed path applies: a model of a supported family (bidirectional, or causal with
        ``enable_bidirectional=False``) whose attention takes cu_seqlens."""
        try:
            body = decoder_body(self.model)
            check_family(body)
        except (TypeError, ValueError):
            return False
        impl = body.config._attn_implementation or ""
        return impl == ATTN_IMPLEMENTATION or impl.startswith("flash_attention")

    def _forward_packed(self, batch: PackedBatch):
        """The packed forward, causal exactly when the model was not made bidirectional."""
        return forward_packed(self.model, batch=batch, causal=not is_bidirectional(self.model))

    def _pool(self, hidden: Tensor, *, cu_seqlens: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
              embed_mask: Optional[Tensor] = None, normalize: bool = False) -> Tensor:
        """llm2vec's pooling in either layout; ``embed_mask`` applies to mean/weighted_mean under
        skip_instruction; a mean with no embed token pools every real token."""
        self._check_settings()
        mode = self.pooling_mode
        use_embed = self.skip_instruction and mode in ("mean", "weighted_mean") and embed_mask is not None
        embed = None
        if use_embed:
            embed = embed_mask.to(device=hidden.device, dtype=torch.bool)
            if cu_seqlens is None:
                real = (attention_mask.to(hidden.device) != 0) if attention_mask is not None else \
                    torch.ones_like(embed)
                embed = embed & real
                if mode == "mean":
                    empty = ~embed.any(dim=1, keepdim=True)
                    embed = torch.where(empty, real, embed)
            elif mode == "mean":
                lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
                # output_size: the packed token count, so that the device is not asked for it (a host sync)
                seq_id = torch.repeat_interleave(torch.arange(lengths.numel(), device=hidden.device), lengths,
                                                 output_size=hidden.shape[0])
                counts = torch.zeros(lengths.numel(), device=hidden.device).index_add_(0, seq_id, embed.float())
                embed = embed | (counts == 0)[seq_id]
        return pool(hidden, cu_seqlens=cu_seqlens, attention_mask=attention_mask if cu_seqlens is None else None,
                    embed_mask=embed, mode=_POOL_MODE[mode], normalize=normalize)

    def get_pooling(self, features: Dict[str, Tensor], last_hidden_states: Tensor) -> Tensor:
        """Pools padded (B, S, H) hidden states with ``features``' attention_mask and embed_mask (float32).
        Unlike llm2vec, ``features`` is not modified."""
        return self._pool(last_hidden_states, attention_mask=features["attention_mask"],
                          embed_mask=features.get("embed_mask"))

    def forward(self, sentence_feature: Dict[str, Tensor]) -> Tensor:
        """Embeddings of padded features from :meth:`tokenize` (differentiable). A bidirectional model with
        a varlen attention runs packed (padding dropped); any other model runs padded."""
        return self._forward_with_states(sentence_feature, keep_states=False)[0]

    def _forward_with_states(self, sentence_feature: Dict[str, Tensor],
                            keep_states: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        """:meth:`forward`'s embeddings and, with ``keep_states``, the last hidden states (B, S, H) in the
        features' padded layout (zeros at padding where the forward ran packed)."""
        features = dict(sentence_feature)
        embed_mask = features.pop("embed_mask", None)
        if self._packable():
            batch = pack(features["input_ids"], features.get("attention_mask"))
            out = self._forward_packed(batch)
            packed_embed = None
            if embed_mask is not None:
                packed_embed = embed_mask.reshape(-1).to(batch.indices.device)[batch.indices]
            embeddings = self._pool(out.hidden, cu_seqlens=out.cu_seqlens, embed_mask=packed_embed)
            return embeddings, out.padded() if keep_states else None
        reps = self.model(**features)
        features["embed_mask"] = embed_mask
        return self.get_pooling(features, reps.last_hidden_state), reps.last_hidden_state if keep_states else None

    def _embed_batch(self, input_ids: List[List[int]], embed_counts: List[int], normalize: bool) -> Tensor:
        """(B, H) float32 embeddings of token-id lists (each non-empty), on the model's output device."""
        return self._run_batch(self._prepare_batch(input_ids, embed_counts), normalize)

    def _prepare_batch(self, input_ids: List[List[int]], embed_counts: List[int]) -> "_PreparedBatch":
        """The host side of one batch: every tensor built on the CPU from the lists (lengths, max_seqlen,
        cu_seqlens, embed mask), in pinned memory and copied with ``non_blocking=True`` when the model is on a
        CUDA device, so that preparing a batch never waits for the device."""
        device = _input_device(self.model)
        pin = device.type == "cuda"
        lengths = torch.tensor([len(ids) for ids in input_ids], dtype=torch.long)
        counts = torch.minimum(torch.tensor(embed_counts, dtype=torch.long), lengths)
        if self._packable():
            host = pack_sequences(input_ids)
            seq_id = torch.repeat_interleave(torch.arange(len(input_ids)), lengths, output_size=host.num_tokens)
            embed = host.position_ids >= (lengths - counts)[seq_id]
            if pin:
                host, embed = host.pin_memory(), embed.pin_memory()
            return _PreparedBatch(packed=host.to(device, non_blocking=pin), embed=_to(embed, device, pin),
                                  keep=(host, embed))
        width = int(lengths.max())
        ids = torch.full((len(input_ids), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(input_ids), width), dtype=torch.long)
        for row, seq in enumerate(input_ids):  # right padding: positions start at 0 in every row
            ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, :len(seq)] = 1
        positions = torch.arange(width)[None, :]
        embed = (positions >= (lengths - counts)[:, None]) & (mask != 0)
        if pin:
            ids, mask, embed = ids.pin_memory(), mask.pin_memory(), embed.pin_memory()
        return _PreparedBatch(ids=_to(ids, device, pin), mask=_to(mask, device, pin), embed=_to(embed, device, pin),
                              keep=(ids, mask, embed))

    def _batch_hidden(self, prepared: "_PreparedBatch") -> Tuple[Tensor, Dict[str, Tensor]]:
        """The forward of one prepared batch: the last hidden states, packed (T, H) or padded (B, S, H), and
        the layout arguments that pool them (cu_seqlens or attention_mask, and embed_mask)."""
        if prepared.packed is not None:
            out = self._forward_packed(prepared.packed)
            return out.hidden, {"cu_seqlens": out.cu_seqlens, "embed_mask": prepared.embed.to(out.hidden.device)}
        with lean_layers(self.model):  # encode runs without gradients: the MLPs compute in place
            hidden = self.model(input_ids=prepared.ids, attention_mask=prepared.mask).last_hidden_state
        return hidden, {"attention_mask": prepared.mask.to(hidden.device),
                        "embed_mask": prepared.embed.to(hidden.device)}

    def _run_batch(self, prepared: "_PreparedBatch", normalize: bool) -> Tensor:
        """The device side of one batch: the forward and the pooling, only enqueued on a CUDA device (no host
        sync on the packed path with the llm2vec_fast attention). (B, H) float32 on the output device."""
        hidden, layout = self._batch_hidden(prepared)
        return self._pool(hidden, normalize=normalize, **layout)

    # ------------------------------------------------------------------------------------------ encode

    def encode(self, sentences: Union[str, Sequence], batch_size: int = 32, show_progress_bar: bool = True,
               convert_to_numpy: bool = False, convert_to_tensor: bool = False, device: Optional[str] = None, *,
               normalize_embeddings: bool = False, max_tokens_per_batch: Optional[int] = None,
               devices: Optional[Sequence[str]] = None, pool: Optional[EncodePool] = None,
               distributed: bool = False, truncate_dim: Optional[int] = None):
        """Embeds texts and [instruction, text] pairs: (N, hidden) float32 on the CPU, in input order
        (a numpy array with ``convert_to_numpy=True`` and ``convert_to_tensor=False``). An input given more
        than once is encoded once (its rows are the same bits). ``truncate_dim`` keeps each row's first
        dimensions (a Matryoshka-trained model); ``normalize_embeddings`` then normalises after the cut.

        Batches hold at most ``max_tokens_per_batch`` real tokens (default ``batch_size * max_length``, the
        most a padded batch of ``batch_size`` could hold; at most 1024 on the CPU, where larger packs run
        slower). ``normalize_embeddings=True`` L2-normalises each row. ``device`` defaults to CUDA when
        available; the model is moved there (unless it was dispatched with a device_map). A batch that runs out
        of device memory is split and the budget halved for the rest of the call, with a warning (an input
        too long to run alone raises ``torch.OutOfMemoryError`` naming its length). The progress bar counts
        texts and shows tokens per second.

        Several processes (see ``parallel.py``): ``devices=['cuda:0', 'cuda:1', ...]`` starts one process per
        device for this call (``pool=`` reuses a pool from :meth:`start_multi_process_pool` across calls);
        ``distributed=True``, called on every ``torchrun`` rank with the same inputs, encodes each rank's
        share and returns all rows on every rank.
        """
        from tqdm.auto import tqdm

        items = normalize_inputs(sentences)
        self._check_settings()
        _check_batching(batch_size, max_tokens_per_batch)
        _check_truncate_dim(truncate_dim, self._hidden_size())
        if sum(x is not None and x is not False for x in (devices, pool, distributed)) > 1:
            raise ValueError(f"give at most one of devices=, pool= and distributed=True, got devices={devices!r}, "
                             f"pool={pool!r}, distributed={distributed!r}")
        # With a cut, the rows are normalised after it (below), not in the pooling.
        options = {"batch_size": batch_size, "normalize_embeddings": normalize_embeddings and truncate_dim is None,
                   "max_tokens_per_batch": max_tokens_per_batch}
        # Each distinct input runs once; repeats copy its row (the same bits, and no compute spent on them).
        first_of: Dict[InputItem, int] = {}
        inverse = [first_of.setdefault(item, len(first_of)) for item in items]
        repeats = len(items) - len(first_of)
        if repeats:
            items = list(first_of)
        with tqdm(total=len(items) + repeats, unit="text", desc="Encoding", disable=not show_progress_bar) as bar:
            bar.update(repeats)
            if devices is not None or pool is not None:
                own_pool = pool is None
                if own_pool:
                    pool = self.start_multi_process_pool(devices)
                try:
                    out = torch.from_numpy(pool.encode(items, self._hidden_size(), progress=bar.update,
                                                       settings=self._settings(), encoder=self, **options))
                finally:
                    if own_pool:
                        pool.close()
            elif distributed:
                out = encode_over_ranks(lambda part: self._encode_items(part, device, bar, **options), items,
                                        self._hidden_size())
            else:
                out = self._encode_items(items, device, bar, **options)
        if repeats:
            out = out[torch.tensor(inverse, dtype=torch.long)]
        out = _truncate(out, truncate_dim, normalize_embeddings)
        if convert_to_tensor:
            convert_to_numpy = False
        return out.numpy() if convert_to_numpy else out

    def _encode_items(self, items: Sequence[InputItem], device: Optional[str], bar, *, batch_size: int,
                      normalize_embeddings: bool, max_tokens_per_batch: Optional[int]) -> Tensor:
        """The single-process encode of normalised items (see :meth:`encode`); ``bar`` counts texts.

        Per chunk of inputs (:func:`plan_chunks`): tokenise, sort, batch; each batch's embeddings are written
        (``index_copy_``, by input index) into one float32 buffer of the chunk on the output device.
        On a CUDA device:
        - each batch is prepared in pinned memory and only enqueued (no host sync inside a batch), so the host
          prepares the next batch while the device runs this one; at most ``GPU_LOOKAHEAD + 1`` batches are in
          flight (their pinned buffers stay referenced until their CUDA event has completed);
        - the next chunk is tokenised on a background thread meanwhile (:meth:`_chunk_plans`), and the first
          chunks are small (the device starts once a few texts are tokenised);
        - a chunk's rows go to the CPU through pinned memory (:class:`_Landing`), awaited only once the next
          chunk's first batch is queued: the device never waits for the host between chunks, and the host
          never blocks on the whole stream, only on events.
        The progress bar counts a batch (texts and tokens/s) once it has completed on the device. On the CPU
        every batch completes before the next is prepared (no pinned memory).
        """
        target_device, budget = self._ready(device, batch_size, max_tokens_per_batch)
        packable = self._packable()
        hidden_size = self._hidden_size()
        out = torch.zeros((len(items), hidden_size), dtype=torch.float32)
        progress = _Progress(bar)
        in_flight: List[_InFlight] = []  # across chunks: the device runs on while the host starts the next one
        landing: Optional[_Landing] = None  # the previous chunk's rows on their way to `out`
        ahead = _plan_ahead(target_device)
        with torch.no_grad():
            for start, plan in self._chunk_plans(items, ahead=ahead, ramp=ahead and packable):
                lengths = [len(ids) for ids in plan.input_ids]
                order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
                bar.update(len(lengths) - len(order))  # inputs without tokens embed to zeros
                target = out.narrow(0, start, len(lengths))
                chunk: Optional[Tensor] = None  # the chunk's rows on the output device (target itself on the CPU)
                pending = collections.deque(token_batches(order, lengths, budget, padded=not packable))
                while pending:
                    batch = pending.popleft()
                    try:
                        prepared = self._prepare_batch([plan.input_ids[i] for i in batch],
                                                       [plan.embed_counts[i] for i in batch])
                        emb = self._run_batch(prepared, normalize_embeddings)
                    except torch.OutOfMemoryError as err:  # smaller batches from here on; nothing is lost
                        prepared = emb = None
                        progress.settle(in_flight, keep=0)
                        budget = _budget_after_oom(batch, lengths, budget, packable, err)
                        rest = batch + [i for later in pending for i in later]
                        pending = collections.deque(token_batches(rest, lengths, budget, padded=not packable))
                        continue
                    if landing is not None:  # awaited now that the device has this chunk's first batch to run
                        landing.land()
                        landing = None
                    if chunk is None:
                        chunk = target if emb.device.type == "cpu" else \
                            torch.zeros((len(lengths), hidden_size), dtype=torch.float32, device=emb.device)
                    rows = torch.tensor(batch, dtype=torch.long)
                    cuda = emb.device.type == "cuda"
                    if cuda:
                        rows = rows.pin_memory()
                    chunk.index_copy_(0, _to(rows, emb.device, cuda), emb.float())
                    texts, tokens = len(batch), sum(lengths[i] for i in batch)
                    if not cuda:  # done: the CPU ran it
                        progress.done(texts, tokens)
                        continue
                    event = torch.cuda.Event()
                    event.record(torch.cuda.current_stream(emb.device))
                    in_flight.append(_InFlight(event, texts, tokens, (prepared, rows)))
                    progress.settle(in_flight, keep=max(GPU_LOOKAHEAD, 0))
                if chunk is not None and chunk is not target:  # (any earlier landing has landed: a batch ran)
                    landing = _Landing(chunk, target)
                    del chunk
            if landing is not None:
                landing.land()
            progress.settle(in_flight, keep=0)
        return out

    def _ready(self, device: Optional[str], batch_size: int,
               max_tokens_per_batch: Optional[int]) -> Tuple[torch.device, int]:
        """Eval mode on ``device`` (default CUDA when available; a model dispatched with a device_map stays
        where it is): (the output device, the token budget per batch)."""
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        target_device = _target_device(self.model, device)
        budget = max_tokens_per_batch
        if budget is None:
            budget = batch_size * self.max_length
            if target_device.type == "cpu":
                budget = min(budget, CPU_TOKEN_BUDGET)
        self.eval()
        if getattr(_unwrap(self.model), "hf_device_map", None) is None:
            self.to(device)
        return target_device, budget

    def encode_tokens(self, sentences: Union[str, Sequence], batch_size: int = 32, show_progress_bar: bool = False,
                      device: Optional[str] = None, *, max_tokens_per_batch: Optional[int] = None,
                      output_value: str = "token_embeddings", normalize_embeddings: bool = False,
                      truncate_dim: Optional[int] = None):
        """Per input, the last hidden state of every token the model reads for it (special tokens and the
        instruction included; the text's own tokens, which mean pooling uses under skip_instruction, are
        the last ones): a list of (n_i, hidden) float32 CPU tensors in input order, as
        sentence-transformers' ``output_value="token_embeddings"``. Same tokenisation, batching and forward
        as :meth:`encode` (one process; no out-of-memory splitting).

        ``output_value=None`` returns, per input, a dict of ``input_ids`` (long), ``token_embeddings`` and
        ``sentence_embedding`` (pooled from the same forward; ``truncate_dim`` keeps its first dimensions,
        as sentence-transformers cuts it, and ``normalize_embeddings`` L2-normalises it after the cut).
        """
        from tqdm.auto import tqdm

        if output_value not in ("token_embeddings", None):
            raise ValueError(f"output_value must be 'token_embeddings' or None, got {output_value!r}")
        items = normalize_inputs(sentences)
        self._check_settings()
        _check_batching(batch_size, max_tokens_per_batch)
        _check_truncate_dim(truncate_dim, self._hidden_size())
        _, budget = self._ready(device, batch_size, max_tokens_per_batch)
        packable = self._packable()
        plan = self.plan(items)
        lengths = [len(ids) for ids in plan.input_ids]
        tokens: List[Optional[Tensor]] = [None] * len(items)
        pooled: List[Optional[Tensor]] = [None] * len(items)
        order = sorted((i for i, n in enumerate(lengths) if n > 0), key=lambda i: -lengths[i])
        with torch.no_grad(), tqdm(total=len(items), unit="text", desc="Encoding tokens",
                                   disable=not show_progress_bar) as bar:
            bar.update(len(items) - len(order))
            for batch in token_batches(order, lengths, budget, padded=not packable):
                prepared = self._prepare_batch([plan.input_ids[i] for i in batch],
                                               [plan.embed_counts[i] for i in batch])
                hidden, layout = self._batch_hidden(prepared)
                if output_value is None:
                    # With a cut, the rows are normalised after it (as in encode), not in the pooling.
                    rows = self._pool(hidden, normalize=normalize_embeddings and truncate_dim is None, **layout)
                    rows = _truncate(rows.cpu(), truncate_dim, normalize_embeddings)
                    for i, row in zip(batch, rows):
                        pooled[i] = row
                hidden = hidden.float().cpu()
                if hidden.dim() == 2:  # packed: consecutive sequences in batch order
                    per_input = hidden.split([lengths[i] for i in batch])
                else:  # padded on the right (positions from 0 in every row)
                    per_input = [hidden[row, :lengths[i]] for row, i in enumerate(batch)]
                for i, states in zip(batch, per_input):
                    tokens[i] = states.clone()
                bar.update(len(batch))
        width = self._hidden_size()
        tokens = [t if t is not None else torch.zeros((0, width)) for t in tokens]  # inputs without tokens
        if output_value == "token_embeddings":
            return tokens
        return [{"input_ids": torch.tensor(ids, dtype=torch.long), "token_embeddings": t,
                 "sentence_embedding": p if p is not None else _truncate(torch.zeros(1, width), truncate_dim, False)[0]}
                for ids, t, p in zip(plan.input_ids, tokens, pooled)]

    def _chunk_plans(self, items: Sequence[InputItem], ahead: bool, ramp: bool) -> Iterator[Tuple[int, Plan]]:
        """(first input, plan) per chunk of :func:`plan_chunks` (``ramp``: small chunks first). With ``ahead``
        the next chunk is tokenised on a background thread while the caller runs this one, so that a GPU is
        not idle while the host tokenises (the fast tokenizers release the GIL)."""
        chunks = plan_chunks(len(items), ramp)
        if not ahead or len(chunks) < 2:
            for start, stop in chunks:
                yield start, self.plan(items[start:stop])
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm2vec-fast-plan") as planner:
            future = planner.submit(self.plan, items[slice(*chunks[0])])
            for number, (start, _) in enumerate(chunks):
                plan = future.result()
                if number + 1 < len(chunks):
                    future = planner.submit(self.plan, items[slice(*chunks[number + 1])])
                yield start, plan

    def _settings(self) -> Dict[str, object]:
        """The encoder settings a pool worker applies to its copy before each job."""
        return {"pooling_mode": self.pooling_mode, "max_length": self.max_length,
                "doc_max_length": self.doc_max_length, "skip_instruction": self.skip_instruction}

    def start_multi_process_pool(self, devices: Sequence[str], load_in_workers: Optional[bool] = None) -> EncodePool:
        """One encoding process per device (``['cuda:0', 'cuda:1']``; ``'cpu'`` entries work too), for
        ``encode(..., pool=pool)`` across calls; close it with ``pool.close()`` (or use ``with``).

        Each worker holds one copy of the model. By default a model on the CPU is shared with the workers
        once, as it is now, and a model elsewhere is loaded again by each worker from the ``from_pretrained``
        arguments (``load_in_workers=True`` forces that), so changes made to its weights after loading are
        not seen there (move it to the CPU first to share it).
        """
        return EncodePool(self, devices, load_in_workers=load_in_workers)

    @staticmethod
    def stop_multi_process_pool(pool: EncodePool) -> None:
        """Closes a pool from :meth:`start_multi_process_pool` (sentence-transformers' name)."""
        pool.close()

    def _hidden_size(self) -> int:
        config = self.model.config
        size = getattr(config, "hidden_size", None)
        if size is None and hasattr(config, "get_text_config"):
            size = config.get_text_config().hidden_size
        return int(size)

    # ---------------------------------------------------------------------------------- llm2vec extras

    def _text_length(self, text) -> int:
        """llm2vec's length of a text, a token list or a list of texts (characters / items)."""
        if isinstance(text, str) or (isinstance(text, list) and text and isinstance(text[0], int)) or len(text) == 0:
            return len(text)
        if isinstance(text, dict):
            return len(next(iter(text.values())))
        if not hasattr(text, "__len__"):
            return 1
        return sum(len(t) for t in text)

    def resize_token_embeddings(self, new_num_tokens: Optional[int] = None,
                                pad_to_multiple_of: Optional[int] = None) -> nn.Embedding:
        return self.model.resize_token_embeddings(new_num_tokens=new_num_tokens,
                                                  pad_to_multiple_of=pad_to_multiple_of)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs)


class _PreparedBatch:
    """One batch on the model's input device (copies possibly still in flight), with ``keep``: the host
    tensors they are copied from, referenced until the batch has completed (pinned buffers are not reused
    before their copy has run)."""
    __slots__ = ("packed", "ids", "mask", "embed", "keep")

    def __init__(self, *, packed=None, ids=None, mask=None, embed=None, keep=()):
        self.packed, self.ids, self.mask, self.embed, self.keep = packed, ids, mask, embed, keep


class _InFlight:
    """A batch enqueued on a CUDA device: its completion event, its counts for the progress bar and the
    host buffers its copies read."""
    __slots__ = ("event", "texts", "tokens", "keep")

    def __init__(self, event, texts: int, tokens: int, keep):
        self.event, self.texts, self.tokens, self.keep = event, texts, tokens, keep


class _Landing:
    """A chunk's rows on their way from the device to their place in the output: on a CUDA device copied
    into pinned memory on the current stream (enqueued after the chunk's batches, no host wait) and moved
    into place by :meth:`land`, which waits for that copy alone (an event); on another device copied at once."""

    def __init__(self, rows: Tensor, target: Tensor):
        self.target, self.event = target, None
        if rows.device.type != "cuda":
            target.copy_(rows)
            self.staging = None
            return
        self.staging = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
        self.staging.copy_(rows, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record(torch.cuda.current_stream(rows.device))

    def land(self) -> None:
        if self.staging is not None:
            self.event.synchronize()
            self.target.copy_(self.staging)
            self.staging = None


class _Progress:
    """The progress bar's counts of completed work: texts, and tokens per second since the start."""

    def __init__(self, bar):
        self.bar = bar
        self.tokens = 0
        self.started = time.perf_counter()

    def done(self, texts: int, tokens: int) -> None:
        self.tokens += tokens
        self.bar.update(texts)
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens / elapsed:,.0f} tok/s", refresh=False)

    def settle(self, in_flight: List["_InFlight"], keep: int) -> None:
        """Counts the batches that have completed, oldest first, waiting for the oldest ones until at most
        ``keep`` remain in flight; completed batches release their host buffers."""
        while in_flight:
            entry = in_flight[0]
            if not entry.event.query():
                if len(in_flight) <= keep:
                    break
                entry.event.synchronize()  # waits for this batch only: later ones stay queued on the device
            in_flight.pop(0)
            self.done(entry.texts, entry.tokens)


def plan_chunks(count: int, ramp: bool = False) -> List[Tuple[int, int]]:
    """(start, stop) of the chunks of ``count`` inputs that encode tokenises, sorts and batches together:
    PLAN_CHUNK inputs each; with ``ramp``, FIRST_PLAN_CHUNK first, doubling up to PLAN_CHUNK, a remainder
    under half the last chunk taken into it (no tiny last batch) where that stays within PLAN_CHUNK."""
    chunks: List[Tuple[int, int]] = []
    size = min(FIRST_PLAN_CHUNK, PLAN_CHUNK) if ramp else PLAN_CHUNK
    start = 0
    while start < count:
        stop = min(start + size, count)
        if ramp and count - stop < size // 2 and count - start <= PLAN_CHUNK:
            stop = count
        chunks.append((start, stop))
        start, size = stop, min(2 * size, PLAN_CHUNK)
    return chunks


def _check_count(name: str, value, low: int = 1, high: Optional[int] = None, high_is: str = "") -> None:
    """An int (Python's or numpy's, not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be {'a positive int' if low == 1 else f'an int >= {low}'}, got {value!r}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}{high_is}, got {value!r}")


def _check_batching(batch_size, max_tokens_per_batch) -> None:
    _check_count("batch_size", batch_size)
    if max_tokens_per_batch is not None:
        _check_count("max_tokens_per_batch", max_tokens_per_batch)


def _check_truncate_dim(truncate_dim, hidden: int) -> None:
    if truncate_dim is not None:
        _check_count("truncate_dim", truncate_dim, high=hidden, high_is=" (the model's hidden size)")


def _truncate(rows: Tensor, truncate_dim: Optional[int], normalize: bool) -> Tensor:
    """(N, D) rows cut to their first ``truncate_dim`` dimensions (a Matryoshka-trained model), then
    L2-normalised with ``normalize``; rows that are not cut are returned as they are."""
    if truncate_dim is None:
        return rows
    rows = rows[:, :truncate_dim]
    return torch.nn.functional.normalize(rows, dim=-1) if normalize else rows


def _to(x: Tensor, device, non_blocking: bool) -> Tensor:
    return x.to(device, non_blocking=non_blocking)


def _plan_ahead(device: torch.device) -> bool:
    """Whether encode tokenises the next chunk while this one runs: on a GPU (on the CPU both would
    compete for the same cores)."""
    return device.type == "cuda"


def _budget_after_oom(batch: List[int], lengths: Sequence[int], budget: int, packable: bool,
                      err: BaseException) -> int:
    """The token budget after ``batch`` ran out of device memory: half of what the batch held (its real
    tokens, or rows x longest when padded), with a warning naming it. A batch of one input cannot be
    split: that raises, naming the input's length."""
    widest = max(lengths[i] for i in batch)
    if len(batch) == 1:
        raise torch.OutOfMemoryError(
            f"encode: one input of {widest} tokens does not fit in device memory on its own; lower max_length "
            f"(now truncating at it) or free memory on the device ({err})") from err
    held = sum(lengths[i] for i in batch) if packable else len(batch) * widest
    new_budget = max(held // 2, 1)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    warnings.warn(f"encode: out of device memory with {held} tokens in a batch (budget {budget}); continuing "
                  f"with at most {new_budget} (pass max_tokens_per_batch={new_budget} to start there)",
                  RuntimeWarning, stacklevel=3)
    return new_budget


def token_batches(order: Sequence[int], lengths: Sequence[int], budget: int, padded: bool = False) -> List[List[int]]:
    """Consecutive runs of ``order`` (longest first) holding at most ``budget`` tokens each: real tokens,
    or, with ``padded``, rows times the longest row. An input longer than the budget goes alone."""
    batches: List[List[int]] = []
    current: List[int] = []
    used = widest = 0
    for i in order:
        n = lengths[i]
        if padded:
            cost = (len(current) + 1) * max(widest, n)
        else:
            cost = used + n
        if current and cost > budget:
            batches.append(current)
            current, used, widest = [], 0, 0
        current.append(i)
        used += n
        widest = max(widest, n)
    if current:
        batches.append(current)
    return batches


def _unwrap(model):
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _target_device(model, device) -> torch.device:
    """Where encode will run: the model's own device when it was dispatched with a device_map."""
    if getattr(_unwrap(model), "hf_device_map", None) is not None:
        return _input_device(model)
    return torch.device(device)


def _input_device(model) -> torch.device:
    embeddings = _unwrap(model).get_input_embeddings()
    return embeddings.weight.device

