"""One mechanism that makes a loaded transformers 5 decoder bidirectional, and its packed forward.

:func:`make_bidirectional` uses only transformers' own switches:
- ``config.is_causal = False``: ``masking_utils.create_causal_mask`` (and the sliding-window
  variant) then build bidirectional masks, with padding, for every attention implementation;
- ``is_causal = False`` on every attention module: what "sdpa", the flash-attention paths and our
  ``"llm2vec_fast"`` read to decide causality ("eager" only reads the mask);
- a forward pre-hook on the decoder body (the ``XxxModel``) that, for a padded batch, gives each
  sequence positions counted from its first real token (RoPE: a left-padded sequence equals the
  sequence alone) and, where a sliding-window layer is shorter than the batch, hands "eager"/"sdpa"/
  "flex" the window |i - j| < w (see ``reference.attention.window_keeps``) instead of transformers' own
  bidirectional window (|i - j| <= w), so that every implementation agrees with the kernel path.
No modeling code is copied: any model of a supported family, including peft-wrapped ones, works.

:func:`forward_packed` runs the decoder on T real tokens in one row (``packing.pack``) with
transformers' padding-free kwargs (``position_ids`` restarting per sequence, ``cu_seq_lens_q/k``,
``max_length_q/k``): with ``"llm2vec_fast"`` (or a flash-attention implementation) attention sees
``cu_seqlens``; with "eager"/"sdpa"/"flex" it gets a block-diagonal mask (a reference, not fast).
With ``causal=True`` it runs a model that was not made bidirectional, causally per sequence.
Without gradients its gated MLPs compute in place (``lean.py``: same bits, fewer large buffers).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from transformers import PreTrainedModel
from transformers.masking_utils import create_bidirectional_mask

from ..reference.attention import window_keeps
from ..validation import check_cu_seqlens
from .attention import ATTN_IMPLEMENTATION, set_attention_backend
from .lean import lean_layers
from .packing import PackedBatch, pack, repad

@dataclass(frozen=True)
class Family:
    """What the generic mechanism needs to know of a family: whether its ``XxxModel.forward`` accepts a dict of
    masks keyed by layer type ("full_attention", "sliding_attention"; the others take one mask for all layers),
    and whether every layer slides when the config has a ``sliding_window`` but no ``layer_types``."""
    masks_by_layer_type: bool
    every_layer_slides: bool = False


FAMILIES: Dict[str, Family] = {
    "llama": Family(False),
    "mistral": Family(False, every_layer_slides=True),
    "qwen2": Family(True),
    "qwen3": Family(True),
    "gemma": Family(False),
    "gemma2": Family(True),
    "gemma3_text": Family(True),
    "phi3": Family(False, every_layer_slides=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
_HOOK_FLAG = "_llm2vec_fast_bidirectional_hook"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """A peft model's transformers model; anything else as is."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def decoder_body(model: torch.nn.Module) -> PreTrainedModel:
    """The family's ``XxxModel`` inside ``model`` (itself, an ``XxxForCausalLM``'s ``.model``, or through peft)."""
    model = _unwrap(model)
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers PreTrainedModel (or a peft model around one), got "
                        f"{type(model).__name__}")
    body = model.base_model
    return body if isinstance(body, PreTrainedModel) else model


def check_family(body: PreTrainedModel) -> str:
    model_type = getattr(body.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ValueError(f"{type(body).__name__} (model_type={model_type!r}) is not supported for bidirectional "
                         f"attention; supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}")
    return model_type


def is_bidirectional(model: torch.nn.Module) -> bool:
    body = decoder_body(model)
    return getattr(body.config, "is_causal", True) is False and hasattr(body, _HOOK_FLAG)


def layer_windows(config) -> List[Optional[int]]:
    """Each decoder layer's sliding window (None: full attention)."""
    window = getattr(config, "sliding_window", None) or None
    layers = config.num_hidden_layers
    if window is None:
        return [None] * layers
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return [window if kind == "sliding_attention" else None for kind in layer_types[:layers]]
    family = FAMILIES.get(config.model_type)
    if family is not None and family.every_layer_slides:  # every layer passes config.sliding_window
        return [int(window)] * layers
    return [None] * layers


def _uses_masks(config) -> bool:
    """True where transformers builds masks (eager, sdpa, flex, ...); False for our implementation and the
    flash-attention ones, which take the padding mask / cu_seqlens and apply windows themselves."""
    impl = config._attn_implementation or "eager"
    return impl != ATTN_IMPLEMENTATION and not impl.startswith("flash_attention")


def _same_sequence(sequence_ids: Tensor):
    def keep(batch_idx, head_idx, q_idx, kv_idx):
        return sequence_ids[batch_idx, q_idx] == sequence_ids[batch_idx, kv_idx]
    return keep


def _symmetric_window(window: int):
    def keep(batch_idx, head_idx, q_idx, kv_idx):
        return window_keeps(q_idx, kv_idx, window)
    return keep


def _and(first, second):
    if first is None or second is None:
        return first or second

    def keep(batch_idx, head_idx, q_idx, kv_idx):
        return first(batch_idx, head_idx, q_idx, kv_idx) & second(batch_idx, head_idx, q_idx, kv_idx)
    return keep


def bidirectional_masks(body: PreTrainedModel, batch_size: int, seqlen: int, attention_mask: Optional[Tensor],
                        sequence_ids: Optional[Tensor] = None, device=None) -> Any:
    """The masks to hand ``body``'s forward for a mask-based implementation (eager, sdpa, flex).

    Built by transformers' ``create_bidirectional_mask`` (so each implementation gets its own format)
    with our symmetric window on sliding layers and, when ``sequence_ids`` (B, S) is given, attention
    kept within each sequence. Returns one mask, or a dict by layer type for the families that take it.
    """
    config = body.config
    device = device or body.device
    dtype = body.get_input_embeddings().weight.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    shape_only = torch.empty((batch_size, seqlen, 0), dtype=dtype, device=device)
    within = _same_sequence(sequence_ids) if sequence_ids is not None else None
    # A window no shorter than the batch changes nothing: such layers share the full mask.
    windows = [w if w is not None and seqlen > w else None for w in layer_windows(config)]
    by_window: Dict[Optional[int], Any] = {}
    for window in dict.fromkeys(windows):
        extra = _and(within, _symmetric_window(window) if window is not None else None)
        by_window[window] = create_bidirectional_mask(config=config, inputs_embeds=shape_only,
                                                      attention_mask=attention_mask, and_mask_function=extra)
    if FAMILIES[config.model_type].masks_by_layer_type:
        sliding = [w for w in by_window if w is not None]
        full = by_window.get(None)
        return {"full_attention": full, "sliding_attention": by_window[sliding[0]] if sliding else full}
    if len(by_window) != 1:
        raise ValueError(f"{config.model_type} mixes sliding and full layers but takes one mask")
    return next(iter(by_window.values()))


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """(B, S) positions counting each row's real tokens from 0 (padding gets 0). Any nonzero value is a real
    token, as the attention masks read it (no device read to refuse a mask of other values)."""
    mask = (attention_mask != 0).to(torch.long)
    return (mask.cumsum(dim=-1) - 1).clamp_(min=0)


def _packed_sequence_ids(position_ids: Tensor, seqlen: int) -> Optional[Tensor]:
    """(1, S) sequence index of each token of one row of packed sequences (positions restarting, transformers'
    padding-free convention), or None where the positions never restart (one sequence)."""
    if position_ids.numel() != seqlen or seqlen < 2:
        return None
    positions = position_ids.reshape(1, seqlen)
    starts = positions[:, 1:] != positions[:, :-1] + 1
    if not bool(starts.any()):  # a device read, only on this mask-building path (as transformers' own)
        return None
    return torch.nn.functional.pad(starts.to(torch.long).cumsum(dim=-1), (1, 0))


_FORWARD_ARGS = ("input_ids", "attention_mask", "position_ids")


def _before_forward(body: PreTrainedModel, args: Tuple, kwargs: Dict) -> Optional[Tuple[Tuple, Dict]]:
    """Forward pre-hook of the decoder body: RoPE positions per sequence; symmetric windows for mask paths."""
    if len(args) > len(_FORWARD_ARGS):
        return None  # an unusual positional call: leave it as transformers would run it
    kwargs = dict(kwargs)
    for name, value in zip(_FORWARD_ARGS, args):
        kwargs[name] = value
    mask = kwargs.get("attention_mask")
    embeds = kwargs.get("inputs_embeds")
    reference = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else embeds
    if reference is None or reference.dim() < 2:
        return (), kwargs
    batch_size, seqlen = reference.shape[:2]
    if mask is None and batch_size == 1 and kwargs.get("position_ids") is not None and _uses_masks(body.config):
        sequence_ids = _packed_sequence_ids(kwargs["position_ids"], seqlen)
        if sequence_ids is not None:  # attention within each packed sequence, as "llm2vec_fast" keeps it
            kwargs["attention_mask"] = bidirectional_masks(body, 1, seqlen, None, sequence_ids=sequence_ids,
                                                           device=reference.device)
            return (), kwargs
    padded = isinstance(mask, Tensor) and mask.dim() == 2
    if padded and kwargs.get("position_ids") is None:
        kwargs["position_ids"] = positions_from_mask(mask)
    if (mask is None or padded) and _uses_masks(body.config):
        windows = [w for w in layer_windows(body.config) if w is not None]
        if windows and seqlen > min(windows):
            kwargs["attention_mask"] = bidirectional_masks(body, batch_size, seqlen, mask, device=reference.device)
    return (), kwargs


def make_bidirectional(model: torch.nn.Module, *, backend: Optional[str] = None) -> torch.nn.Module:
    """Makes a loaded Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2, Gemma3 or Phi-3 model bidirectional, in place.

    Works on the family's ``XxxModel``, ``XxxForCausalLM`` (or any model whose ``base_model`` is
    one), also inside peft. ``backend`` picks the flash_attention backend for
    ``attn_implementation="llm2vec_fast"``. Raises ValueError for other families. Returns ``model``.
    Note: ``config.is_causal = False`` is saved with the model by ``save_pretrained``, and so is
    ``use_bidirectional_attention = True`` where the config has that switch (Gemma3, as EmbeddingGemma
    uses it): plain transformers then reloads the saved model bidirectional, but with its own window on
    sliding layers, |i - j| <= w (ours, the kernels', is |i - j| < w): the two differ on inputs longer than
    the window (Gemma3's 512 tokens); reload with llm2vec_fast's classes to keep ours.
    A row of packed sequences (B = 1, ``position_ids`` restarting, no mask: transformers' padding-free
    convention) attends within each sequence with every attention implementation.
    """
    body = decoder_body(model)
    check_family(body)
    outer = _unwrap(model)
    for config in (body.config,) if outer.config is body.config else (body.config, outer.config):
        config.is_causal = False
        if hasattr(config, "use_bidirectional_attention"):
            config.use_bidirectional_attention = True
    for module in outer.modules():
        if isinstance(getattr(module, "is_causal", None), bool):
            module.is_causal = False
    if not hasattr(body, _HOOK_FLAG):
        body.register_forward_pre_hook(_before_forward, with_kwargs=True)
        setattr(body, _HOOK_FLAG, True)
    if backend is not None:
        set_attention_backend(outer, backend)
    return model


@dataclass
class PackedOutput:
    """The packed forward's result: ``hidden`` (T, H) last hidden states of the real tokens, with the
    batch's ``cu_seqlens`` (B+1,) int32 and ``max_seqlen`` (pool straight from them), and ``batch`` to
    re-pad. ``hidden_states``: every layer's (T, H) output when ``output_hidden_states=True``."""
    hidden: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    batch: PackedBatch
    hidden_states: Optional[Tuple[Tensor, ...]] = None

    def padded(self, value: float = 0.0) -> Tensor:
        """(B, S, H) in the input's padded layout (left or right), ``value`` at padding."""
        return repad(self.hidden, self.batch, value)


def forward_packed(model: torch.nn.Module, input_ids: Optional[Tensor] = None,
                   attention_mask: Optional[Tensor] = None, *, batch: Optional[PackedBatch] = None,
                   causal: bool = False, **kwargs) -> PackedOutput:
    """Runs the bidirectional decoder body of ``model`` on the real tokens only (see the module docstring).

    Give a padded ``input_ids`` (B, S) with its ``attention_mask`` (left or right padding), or a
    ``batch`` from ``packing.pack``/``pack_sequences``. Extra kwargs go to the model's forward.
    ``causal=True`` runs a model of a supported family that was *not* made bidirectional, each sequence
    causally on its own (llm2vec's ``enable_bidirectional=False``); the flag is explicit so that a model
    someone forgot to convert raises instead of silently encoding causally.
    A batch built on the host (``pack_sequences``, with ``pin_memory=True`` for a CUDA model) is only enqueued
    on the device: its copies are asynchronous and its lengths are known on the host, so the llm2vec_fast
    attention never reads the device (checked under ``torch.cuda.set_sync_debug_mode("error")`` in
    tests/test_encode_gpu.py). A padded ``input_ids`` is packed on its device, which reads the longest length.
    """
    body = decoder_body(model)
    check_family(body)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if is_bidirectional(body) == causal:
        raise ValueError("forward_packed runs bidirectional models: call make_bidirectional(model) first, or use "
                         "one of the *BiModel classes (or pass causal=True to run a causal model causally)"
                         if not causal else "causal=True was given for a bidirectional model")
    if batch is None:
        if input_ids is None:
            raise ValueError("forward_packed needs input_ids (B, S) (with attention_mask) or batch=")
        batch = pack(input_ids, attention_mask)
    device = body.get_input_embeddings().weight.device
    # Host -> device copies never make the host wait (from pinned memory, see PackedBatch.pin_memory, they
    # run asynchronously; pageable memory is staged by the driver first), and the batch's lengths
    # (max_seqlen, cu_seqlens' values) come from the host: nothing here reads the device.
    batch = batch.to(device, non_blocking=True)
    if batch.input_ids is None:
        raise ValueError("batch has no input_ids (it was packed from a mask alone)")
    total = batch.num_tokens
    check_cu_seqlens(batch.cu_seqlens, total, name="batch.cu_seqlens", like=batch.position_ids)
    if total == 0:  # every sequence empty: transformers' attention cannot reshape 0 tokens; (0, H), in the graph
        hidden = body.get_input_embeddings()(batch.input_ids)
        wanted = kwargs.get("output_hidden_states", body.config.output_hidden_states)
        states = (hidden,) * (body.config.num_hidden_layers + 1) if wanted else None
        return PackedOutput(hidden, batch.cu_seqlens, batch.max_seqlen, batch, states)
    if _uses_masks(body.config):
        # A causal model needs no mask: transformers finds the packed sequences from the restarting
        # position_ids and builds block-diagonal causal (and sliding-window) masks itself.
        masks = None if causal else bidirectional_masks(body, 1, total, None, sequence_ids=batch.sequence_ids[None],
                                                        device=device)
        extra: Dict[str, Any] = {"attention_mask": masks}
    else:
        extra = {"attention_mask": None, "cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
                 "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen}
    kwargs.setdefault("use_cache", False)
    # Without gradients the MLPs compute in place (same bits, see lean.py). LoRA dropout that draws keeps peft's
    # masks here: a second pass with gradients outside any block (GradCache) must draw the same ones.
    lean = lean_layers(body, fuse_dropout=False) if not torch.is_grad_enabled() else contextlib.nullcontext()
    with lean:
        out = body(input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], **extra, **kwargs)
    hidden_states = getattr(out, "hidden_states", None)
    if hidden_states is not None:
        hidden_states = tuple(h[0] for h in hidden_states)
    return PackedOutput(out.last_hidden_state[0], batch.cu_seqlens, batch.max_seqlen, batch, hidden_states)
