"""Lean layers: the same outputs and gradients, bit for bit, with fewer large buffers.

Four kinds of modules change, inside a ``with lean_layers(model):`` block only.

**On a GPU** (:data:`FUSED_BACKENDS`), with or without gradients, RMSNorms run the fused ``rms_norm`` op
(one read and one write per row where transformers' forward makes about six passes over fp32 copies, and a
backward that keeps x and one float per row) and gated MLPs the fused ``gated_activation`` (act(gate) * up in
one pass, into gate's buffer without gradients; with them it keeps gate and up, as the recompute below does,
without running a second forward). Same functions (each family's rounding reproduced; checked on a random
probe per class, dtype and device before first use), not always the same bits: sums run in another order.
Attention modules (q/k/v/o projections or Phi-3's fused qkv, with or without Qwen3's and Gemma 3's q/k
norms) rotate q and k with the fused ``rotary_embedding`` (one pass over both, in place without gradients; its
backward keeps only cos and sin), where transformers' ``apply_rotary_pos_emb`` runs about ten elementwise
kernels. The module's forward is replaced by a generic one (projections, norms, RoPE, the attention function,
o_proj), checked once per module, dtype and device: the family's forward runs on a random probe with a
recording attention function, which also captures what the module passes it (scaling, sliding window,
softcap). Where q, k, v or the output differ, the module keeps transformers' forward (with a warning).
``LLM2VEC_FAST_FUSED_OPS=0`` switches the fusion off.

**Without gradients** (encoding): each gated MLP, ``down(act(gate(x)) * up(x))``, writes the activation
and the product into gate(x)'s buffer (SiLU in place, then ``mul_``), instead of holding four
(T, intermediate) buffers, the largest of a layer (4 MiB per 1,024 fp32 tokens of a hidden-256 model,
56 MiB per 2,048 bf16 tokens of Mistral-7B). On the CPU, glibc returns freed buffers of that size to
the system and page-faults them in again on the next layer: computing in place cut the page faults of
the small CPU encode benchmark's call by 3–4×. On a GPU it lowers a batch's peak memory.
A peft LoRA linear (an unmerged adapter, llm2vec's default for its supervised models) adds its term in place
and shares its cast input: peft computes ``(result + B(A(x.to(fp32))) * scaling).to(result.dtype)`` for a
float32 adapter on a bf16 model, which writes and reads a float32 (T, out) copy of the result (8 bytes per
output element that the in-place add, rounded once all the same, does not move) and casts x once per linear
(q, k and v cast the same hidden states three times). Same bits as peft's forward.

**LoRA linears on a GPU** (``FUSED_BACKENDS``), with or without gradients, run the fused ``lora_linear`` op
instead (``kernels/lora.py``): the base linear (cuBLAS), then x read once in its own dtype into a (T, r) float32
middle and ``result += scaling * h @ B^T`` in place, each output element read and written once; the backward
adds the branch's gradient of x in place into the base's and reads the (T, out) gradient twice in bf16, where
peft casts it to float32 and scales a copy. It keeps x and the (T, r) middle, not the mask or x after dropout.
Checked by a first-use probe against peft's expression (:func:`_agrees`, in eval; float32 products, so within a
few units in the last place). Its dropout masks are its own (philox, from a seed drawn from torch's CPU
generator, so that checkpointing and GradCache replay them): peft's distribution, not peft's draws.

**With gradients** (training), cheap elementwise regions keep only their inputs for the backward and are
recomputed there (torch's non-reentrant checkpoint; the RNG state restored where LoRA dropout draws),
where autograd would keep their intermediates:
- gated MLPs: ``act(gate) * up`` keeps gate and up, not act(gate) (one (T, intermediate) buffer);
- RMSNorms: keep their input, not the fp32 upcast transformers' RMSNorm keeps (4 bytes per element,
  6 when the weight trains);
- peft LoRA linears (where the fused op does not run): the LoRA term ``B(A(dropout(x))) * scaling`` keeps x,
  not peft's fp32 copy of x after dropout and its dropout mask (5 bytes per input element, for every adapted
  projection); with one adapter it is added in place (no float32 copy of the (T, out) result, same bits and
  gradients).
On one bf16 Mistral-shaped LoRA layer (hidden 512, MLP 1792, all seven projections adapted) that is
19 KB per token after the forward instead of 52 KB. Only elementwise work and the rank-r matmuls run
twice: about 8% of the small fp32 CPU training step (``benchmarks/bench_train.py``; a smaller share is
expected where the base matmuls dominate, not yet measured on a GPU). The autograd graph is unchanged
(checkpointing only changes where saved tensors come from), so gradients are the same bits in every dtype.

:func:`lean_layers` replaces the ``forward`` of those modules for the duration of the block, and only
on instances: transformers' and peft's classes are not touched, and nothing survives the block
(pickling and deep copies see the modules unchanged). :func:`forward_packed` enters it when gradients
are off (with peft's LoRA dropout where it draws: GradCache's second pass may run outside any block, and must
draw the same masks). Training enters it around each whole step (``training.loop``), forward and backward: a
checkpointed layer recomputed in the backward must save what its forward saved, and both GradCache passes
draw the fused op's masks. A module keeps its own
forward under ``torch.compile``, with extra arguments, or when it or any of its sub-modules has a hook
(a hook could see a buffer that is later overwritten); LoRA linears also when merged, disabled or using
a variant (DoRA, ...).
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
import weakref
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# A gated MLP ``down(act(gate(x)) * up(x))`` comes in two layouts: separate gate/up projections (Llama, Mistral,
# Qwen, Gemma) or one fused ``gate_up_proj`` whose output halves are gate and up (Phi-3).
_SPLIT = ("gate_proj", "up_proj", "down_proj", "act_fn")
_FUSED = ("gate_up_proj", "down_proj", "activation_fn")


def _silu_like(act: nn.Module) -> bool:
    """Whether ``act`` is SiLU (torch's or transformers'), which torch can apply in place."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _from_transformers(module: nn.Module, suffix: str) -> bool:
    return type(module).__name__.endswith(suffix) and type(module).__module__.startswith("transformers.models.")


def _has(module: nn.Module, names) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def is_gated_mlp(module: nn.Module) -> bool:
    """A transformers gated MLP (``XxxMLP`` with gate/up/down projections and ``act_fn``, or Phi-3's fused
    ``gate_up_proj`` with ``activation_fn``)."""
    return _from_transformers(module, "MLP") and (_has(module, _SPLIT) or _has(module, _FUSED))


def _gate_up(mlp: nn.Module, x: Tensor):
    """(act, gate(x), up(x)) as the family computes them (gate before up: the order of LoRA dropout's draws)."""
    if hasattr(mlp, "gate_up_proj"):
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return mlp.activation_fn, gate, up
    return mlp.act_fn, mlp.gate_proj(x), mlp.up_proj(x)


def is_rms_norm(module: nn.Module) -> bool:
    """A transformers RMSNorm (``XxxRMSNorm``, a weight and no sub-modules)."""
    return (_from_transformers(module, "RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and not any(True for _ in module.children()))


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def lean_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp.down_proj(act(gate(x)) * up(x))`` with the activation written into gate(x)'s buffer, and the product
    too where gate(x) is a buffer of its own (no gradients). A fused gate_up output's halves are strided views:
    there the product is a new contiguous tensor, so that down_proj reads the layout the family's forward gives it.
    Where :data:`FUSED_BACKENDS` names the device, both steps are one ``gated_activation`` pass."""
    act, hidden, up = _gate_up(mlp, x)
    fused = _fused_gate(act, hidden)
    if fused is not None:  # one pass, into gate(x)'s buffer where it has its own
        return mlp.down_proj(fused(hidden, up, inplace=hidden.is_contiguous()))
    hidden = F.silu(hidden, inplace=True) if _silu_like(act) else act(hidden)
    hidden = hidden.mul_(up) if hidden.is_contiguous() else hidden * up
    return mlp.down_proj(hidden)


def _recompute(fn, *args, random: bool = False):
    """``fn(*args)``, keeping only its inputs for the backward: torch's non-reentrant checkpoint reruns ``fn``
    when the backward needs what it would have saved (``random``: with the RNG state of the first run, for
    dropout). The autograd graph is the plain one, so the gradients are the same bits in every dtype."""
    return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=random)


def _draws_random(dropout: nn.Module) -> bool:
    """Whether peft's LoRA dropout module draws random numbers (an unknown module is assumed to)."""
    if isinstance(dropout, nn.Identity):
        return False
    if isinstance(dropout, nn.Dropout):
        return dropout.training and dropout.p > 0
    return True


def _act_times(act_fn: nn.Module, gate: Tensor, up: Tensor) -> Tensor:
    return act_fn(gate) * up


def _lora_branch(layer: nn.Module, adapter: str, x: Tensor) -> Tensor:
    """peft's vanilla LoRA term of ``layer`` for ``adapter``, written as peft's ``Linear.forward`` writes it."""
    lora_a = layer.lora_A[adapter]
    x = layer._cast_input_dtype(x, lora_a.weight.dtype)
    # scaled in place: B's output is not saved for its backward, and the product's bits are the same
    return layer.lora_B[adapter](lora_a(layer.lora_dropout[adapter](x))).mul_(layer.scaling[adapter])


def _plain(args, kwargs) -> bool:
    """Whether transformers' (or peft's) own forward must run: extra arguments, or torch.compile tracing."""
    return bool(args or kwargs) or torch.compiler.is_compiling()


def _mlp_forward_for(mlp: nn.Module):
    original = type(mlp).forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if _plain(args, kwargs):
            return original(mlp, x, *args, **kwargs)
        if not torch.is_grad_enabled():
            return lean_mlp_forward(mlp, x)
        act, gate, up = _gate_up(mlp, x)
        fused = _fused_gate(act, gate)
        if fused is not None:  # keeps gate and up, as the recompute does, and needs no second forward
            return mlp.down_proj(fused(gate, up))
        return mlp.down_proj(_recompute(_act_times, act, gate, up))
    return forward


# Device type -> backend of the fused ops (``rms_norm``, ``gated_activation``) that lean RMSNorms and gated MLPs
# run on that device. Not on the CPU, where transformers' forward is as fast and the outputs stay its very bits.
FUSED_BACKENDS = {"cuda": "auto"}
FUSED_OPS_ENV = "LLM2VEC_FAST_FUSED_OPS"  # "0": transformers' own norms and MLP products everywhere (A/B, debugging)
_FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# (op, module or activation class, dtype, device type) -> whether the fused op reproduced transformers' forward
_PROBES: dict = {}


def _fusion_backend(x: Tensor):
    """The backend fused ops run on for ``x``, or None where transformers' own forward runs."""
    if x.dtype not in _FUSED_DTYPES or x.numel() == 0 or os.environ.get(FUSED_OPS_ENV, "1").strip() == "0":
        return None
    return FUSED_BACKENDS.get(x.device.type)


def _agrees(op: str, owner: type, x: Tensor, shapes, theirs, ours) -> bool:
    """Whether ``ours`` reproduces ``theirs`` (transformers' computation) to a few units in the last place on
    random inputs of ``shapes`` like x, checked once per (op, owner class, dtype, device type). A disagreement
    or an error is reported once, and that class keeps transformers' forward: an optional fusion must never
    stop or change a model (a release of transformers may change a forward)."""
    key = (op, owner, x.dtype, x.device.type)
    if key in _PROBES:
        return _PROBES[key]
    name = f"{owner.__name__} ({x.dtype}, {x.device.type})"
    try:
        with torch.no_grad():
            generator = torch.Generator(device=x.device).manual_seed(0)  # leaves the global RNG (dropout) alone
            inputs = [torch.randn(shape, device=x.device, generator=generator).to(x.dtype) for shape in shapes]
            expected, got = theirs(*inputs), ours(*inputs)
            same = expected.dtype == got.dtype and _reproduces(got, expected, x.dtype)
    except Exception as error:  # noqa: BLE001 - reported, and transformers' forward runs instead
        warnings.warn(f"llm2vec_fast: the fused {op} failed on {name} ({type(error).__name__}: {error}); that class "
                      f"keeps transformers' forward", RuntimeWarning)
        same = False
    else:
        if not same:
            warnings.warn(f"llm2vec_fast: the fused {op} does not reproduce {name}'s forward; that class keeps "
                          f"transformers' forward", RuntimeWarning)
    _PROBES[key] = same
    return same


def _reproduces(ours: Tensor, theirs: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``ours`` has ``theirs``' shape and values to a few units in the last place of ``dtype``."""
    tolerance = 4 * torch.finfo(dtype).eps
    return ours.shape == theirs.shape and torch.allclose(ours.float(), theirs.float(), rtol=tolerance,
                                                         atol=tolerance)


def _norm_style(norm: nn.Module):
    """(casting_mode, offset, eps) of a transformers RMSNorm, or None for a form the op does not take."""
    name = type(norm).__name__
    if name.startswith("Gemma") and isinstance(getattr(norm, "eps", None), float):
        return "gemma", 1.0, norm.eps  # (1 + weight), all in float32
    if isinstance(getattr(norm, "variance_epsilon", None), float):
        return "llama", 0.0, norm.variance_epsilon  # weight * n.to(input_dtype)
    return None


def _fused_norm(norm: nn.Module, original, x: Tensor):
    """``x -> rms_norm(x, ...)`` standing for ``original`` (transformers' forward) where that is the same
    function (checked by :func:`_agrees`), else None."""
    from ..ops.normalization import rms_norm

    backend, style = _fusion_backend(x), _norm_style(norm)
    if backend is None or style is None:
        return None
    mode, offset, eps = style
    if mode == "llama" and norm.weight.dtype != x.dtype:  # transformers would return the promoted dtype
        return None

    def fused(inputs: Tensor) -> Tensor:
        return rms_norm(inputs, norm.weight, eps, offset=offset, casting_mode=mode, backend=backend)

    agrees = _agrees("rms_norm", type(norm), x, [(5, x.shape[-1])], lambda probe: original(norm, probe), fused)
    return fused if agrees else None


def _activation_name(act: nn.Module):
    """The ``gated_activation`` name of a transformers activation module, or None for one it does not take."""
    if _silu_like(act):
        return "silu"
    if type(act).__name__ in ("GELUTanh", "PytorchGELUTanh"):
        return "gelu_tanh"
    return None


def _fused_gate(act: nn.Module, gate: Tensor):
    """``(gate, up, inplace) -> act(gate) * up`` through ``gated_activation`` where that is ``act``'s product
    (checked by :func:`_agrees`), else None."""
    from ..ops.gated import gated_activation

    backend, activation = _fusion_backend(gate), _activation_name(act)
    if backend is None or activation is None:
        return None

    def fused(gate: Tensor, up: Tensor, inplace: bool = False) -> Tensor:
        return gated_activation(gate, up, activation, inplace=inplace, backend=backend)

    shapes = [(5, gate.shape[-1])] * 2
    agrees = _agrees("gated_activation", type(act), gate, shapes, lambda g, u: act(g) * u, fused)
    return fused if agrees else None


def _norm_forward_for(norm: nn.Module):
    original = type(norm).forward
    plain = original.__get__(norm)  # transformers' forward, bound (what the backward reruns)

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if _plain(args, kwargs):
            return original(norm, x, *args, **kwargs)
        fused = _fused_norm(norm, original, x)
        if fused is not None:  # one kernel; its backward keeps x, the weight and one float per row
            return fused(x)
        if not torch.is_grad_enabled():
            return original(norm, x, *args, **kwargs)
        return _recompute(plain, x)
    return forward


class _SharedCast:
    """The last input that a LoRA linear of the block cast to its adapter's dtype, for the next one that reads the
    same tensor: q, k and v (gate and up) project the same hidden states, and peft casts them once per projection
    (a float32 adapter on a bf16 model: 6 bytes moved per element each time). One entry: the next input replaces
    it, so it holds at most one copy; an input changed in place since (its version) is cast again."""

    def __init__(self):
        self._source, self._version, self._cast = None, None, None

    def __call__(self, layer: nn.Module, x: Tensor, dtype: torch.dtype) -> Tensor:
        if x.dtype == dtype or not getattr(layer, "cast_input_dtype_enabled", True):
            return layer._cast_input_dtype(x, dtype)  # x itself: nothing to share
        source = self._source() if self._source is not None else None
        if source is x and self._version == x._version and self._cast.dtype == dtype:
            return self._cast
        cast = layer._cast_input_dtype(x, dtype)
        self._source, self._version, self._cast = weakref.ref(x), x._version, cast
        return cast


def _fused_lora(layer: nn.Module, adapter: str, x: Tensor, fuse_dropout: bool = True):
    """``x -> lora_linear(x, ...)``, the base linear and the LoRA term of ``adapter`` through the fused op
    (``kernels/lora.py``: x read once into a (T, r) float32 middle, the term added in place into the base's output,
    and in the backward into its gradient of x; dropout's mask drawn in the kernels and regenerated, not kept),
    where that stands for peft's forward of ``layer`` (checked by :func:`_agrees`, in eval): torch's dropout or
    none (drawing only where ``fuse_dropout``: the op's masks are not peft's), a plain linear base in x's dtype,
    no LoRA bias, a rank the kernels take. Else None."""
    from ..ops.lora import lora_linear

    backend = _fusion_backend(x)
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    dropout, base = layer.lora_dropout[adapter], layer.get_base_layer()
    if (backend is None or not (isinstance(dropout, nn.Identity) or type(dropout) is nn.Dropout)
            or (_draws_random(dropout) and not fuse_dropout)
            or getattr(layer, "lora_bias", {}).get(adapter, False)
            or getattr(layer, "fan_in_fan_out", False) or type(base) is not nn.Linear or base.weight.dtype != x.dtype
            or torch.is_autocast_enabled(x.device.type) or not getattr(layer, "cast_input_dtype_enabled", True)
            or lora_a.weight.dtype not in (torch.float32, x.dtype) or lora_a.weight.device != x.device):
        return None
    if backend != "torch":  # the "torch" backend (CPU tests of this path) runs the reference: peft's expression
        try:
            from ..kernels.lora import MAX_RANK
        except ImportError:  # no triton: peft's term, in place, is the faster one
            return None
        if lora_a.weight.shape[0] > MAX_RANK:
            return None
    scale = float(layer.scaling[adapter])

    def fused(inputs: Tensor, dropout_p: Optional[float] = None) -> Tensor:
        if dropout_p is None:  # the module's: drawn in training mode only, as torch's dropout draws
            dropout_p = dropout.p if isinstance(dropout, nn.Dropout) and dropout.training else 0.0
        return lora_linear(inputs, base.weight, lora_a.weight, lora_b.weight, scale, base.bias, dropout_p,
                           backend=backend)

    def theirs(inputs: Tensor) -> Tensor:
        from ..reference.lora import lora_add
        return lora_add(base(inputs), inputs, lora_a.weight, lora_b.weight, scale)

    op = f"LoRA term ({lora_a.weight.dtype} adapter)"
    return fused if _agrees(op, type(layer), x, [(5, x.shape[-1])], theirs, lambda probe: fused(probe, 0.0)) else None


def _shares_input(dropout: nn.Module) -> bool:
    """Whether peft's LoRA dropout leaves its input alone (so that a cast input may serve several linears)."""
    return isinstance(dropout, nn.Identity) or (type(dropout) is nn.Dropout and not dropout.inplace)


def _lora_forward_for(layer: nn.Module, shared_cast: _SharedCast, fuse_dropout: bool = True):
    original = type(layer).forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if (_plain(args, kwargs) or layer.disable_adapters or layer.merged
                or any(name in layer.lora_variant for name in layer.active_adapters)):
            return original(layer, x, *args, **kwargs)
        adapters = [name for name in layer.active_adapters if name in layer.lora_A.keys()]
        fused = _fused_lora(layer, adapters[0], x, fuse_dropout) if len(adapters) == 1 else None
        if fused is not None:
            return fused(x)
        if not torch.is_grad_enabled():
            if len(adapters) != 1:  # peft sums several adapters in the promoted dtype: its own forward
                return original(layer, x, *args, **kwargs)
            # peft's expression, ``(result + B(A(dropout(x.to(A's dtype)))) * scaling).to(result's dtype)``, with
            # the same bits: the sum is taken in the promoted dtype and rounded once either way, so it is added
            # in place (no promoted (T, out) copy), and the cast input is shared with the block's next linear.
            adapter = adapters[0]
            lora_input = x
            if _shares_input(layer.lora_dropout[adapter]):  # already in A's dtype: the branch's cast is a no-op
                lora_input = shared_cast(layer, x, layer.lora_A[adapter].weight.dtype)
            return layer.base_layer(x).add_(_lora_branch(layer, adapter, lora_input))
        result = layer.base_layer(x)
        if len(adapters) == 1:  # in place, as above: the same bits and gradients, no promoted copy
            random = _draws_random(layer.lora_dropout[adapters[0]])
            return result.add_(_recompute(_lora_branch, layer, adapters[0], x, random=random))
        dtype = result.dtype
        for adapter in adapters:  # peft's loop over the active adapters
            random = _draws_random(layer.lora_dropout[adapter])
            result = result + _recompute(_lora_branch, layer, adapter, x, random=random)
        return result.to(dtype)
    return forward


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft is a dependency, but the models work without it
        return None
    return Linear


def is_lora_linear(module: nn.Module) -> bool:
    """peft's LoRA ``Linear`` (exactly that class: its quantised subclasses keep their forward), from a peft
    whose forward :func:`_lora_branch` reproduces (one with ``lora_variant`` and ``_cast_input_dtype``)."""
    lora_linear = _lora_linear_class()
    return (lora_linear is not None and type(module) is lora_linear and hasattr(module, "lora_variant")
            and hasattr(module, "_cast_input_dtype"))


# ---------------------------------------------------------------------------------------------------
# Attention modules: q, k and v as the family projects them, RoPE in one ``rotary_embedding`` pass
# ---------------------------------------------------------------------------------------------------
_QKV_SPLIT = ("q_proj", "k_proj", "v_proj", "o_proj")
_QKV_FUSED = ("qkv_proj", "o_proj")  # Phi-3: one projection whose output is [q | k | v]
_CACHE_ARGUMENTS = ("cache", "past_key_values", "past_key_value")  # the name changed across transformers 5.x
PROBE_IMPLEMENTATION = "llm2vec_fast_probe"  # attention implementation that records what a module passes it
_RECORDED: List[dict] = []  # the probe's recordings, innermost last
# attention module -> {(dtype, device type, rotary width): the keyword arguments its forward passes the attention
# function besides dropout (scaling, sliding_window, softcap, ...), or None where the lean forward differs}
_ATTENTION_PLANS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def is_rotary_attention(module: nn.Module) -> bool:
    """A transformers self-attention module of the families' shape: ``XxxAttention`` with q/k/v/o projections
    (or Phi-3's fused ``qkv_proj``), ``head_dim`` and ``attention_dropout`` (its RoPE is checked on first use)."""
    return (_from_transformers(module, "Attention") and (_has(module, _QKV_SPLIT) or _has(module, _QKV_FUSED))
            and isinstance(getattr(module, "head_dim", None), int) and hasattr(module, "attention_dropout")
            and hasattr(module, "config"))


def _project(attn: nn.Module, hidden: Tensor):
    """(q, k, v) as (..., H, D) views of the family's projections, q and k normed where the family norms them
    (Qwen3, Gemma 3)."""
    shape = (*hidden.shape[:-1], -1, attn.head_dim)
    if hasattr(attn, "qkv_proj"):
        qkv = attn.qkv_proj(hidden)
        q_width = attn.config.num_attention_heads * attn.head_dim
        kv_width = attn.config.num_key_value_heads * attn.head_dim
        q, k, v = qkv[..., :q_width], qkv[..., q_width:q_width + kv_width], qkv[..., q_width + kv_width:]
    else:
        q, k, v = attn.q_proj(hidden), attn.k_proj(hidden), attn.v_proj(hidden)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)
    if isinstance(getattr(attn, "q_norm", None), nn.Module):
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def _attention_function(attn: nn.Module):
    """What the module's forward calls: the registered implementation its config names, else the family's eager
    attention."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    family = sys.modules[type(attn).__module__]
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation,
                                                 getattr(family, "eager_attention_forward", None))


def _record_attention_call(module, query, key, value, attention_mask, **kwargs):
    """The probe's attention implementation: records its inputs and answers a random (B, S, Hq, D) output."""
    recording = _RECORDED[-1]
    recording.update(query=query.clone(), key=key.clone(), value=value.clone(), kwargs=kwargs)
    generator = torch.Generator(device=query.device).manual_seed(1)
    batch, heads, length, dim = query.shape
    recording["out"] = torch.randn((batch, length, heads, dim), generator=generator, device=query.device,
                                   dtype=torch.float32).to(value.dtype)
    return recording["out"], None


@contextlib.contextmanager
def _probing(attn: nn.Module) -> Iterator[dict]:
    """The module in eval mode (no dropout draws), its config naming the recording implementation, for one call;
    everything restored after."""
    from transformers.modeling_utils import AttentionInterface
    AttentionInterface.register(PROBE_IMPLEMENTATION, _record_attention_call)
    modes = [(module, module.training) for module in attn.modules()]
    implementation = attn.config._attn_implementation
    recording: dict = {}
    _RECORDED.append(recording)
    try:
        attn.eval()
        attn.config._attn_implementation = PROBE_IMPLEMENTATION
        yield recording
    finally:
        attn.config._attn_implementation = implementation
        for module, mode in modes:
            module.training = mode
        _RECORDED.remove(recording)


def _probe_attention(attn: nn.Module, original, hidden: Tensor, width: int, rotate) -> Optional[dict]:
    """Runs the family's forward and the lean one on a random 5-token input with random angles, and returns the
    keyword arguments the family passes its attention function (besides dropout) where both give the same q, k, v
    and output (to a few units in the last place), else None, with a warning (the same text for every module of a
    class, so shown once; the family's forward then runs)."""
    name = f"{type(attn).__name__} ({hidden.dtype}, {hidden.device.type})"
    devices = [hidden.device] if hidden.device.type == "cuda" else []
    try:
        # the RNG states as they were after the probe, whatever a module draws: training replays dropout masks
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            generator = torch.Generator(device=hidden.device).manual_seed(0)

            def draw(*shape):
                return torch.randn(shape, generator=generator, device=hidden.device)

            probe = draw(1, 5, hidden.shape[-1]).to(hidden.dtype)
            phase = 10 * draw(1, 5, width // 2)
            phase = torch.cat((phase, phase), dim=-1)
            cos, sin = phase.cos().to(hidden.dtype), phase.sin().to(hidden.dtype)
            with _probing(attn) as recording:  # both forwards in eval mode: no dropout, no random draws
                expected = original(attn, probe, (cos, sin), None)[0]
                q, k, v = _project(attn, probe)
                q, k = rotate(q, k, cos, sin)
                got = attn.o_proj(recording["out"].reshape(*probe.shape[:-1], -1))
            kwargs = dict(recording["kwargs"])
            same = kwargs.pop("dropout", None) == 0.0 and all(
                _reproduces(ours, theirs, hidden.dtype)
                for ours, theirs in ((q.transpose(1, 2), recording["query"]), (k.transpose(1, 2), recording["key"]),
                                     (v.transpose(1, 2), recording["value"]), (got, expected)))
    except Exception as error:  # noqa: BLE001 - reported, and transformers' forward runs instead
        warnings.warn(f"llm2vec_fast: the fused rotary_embedding failed on {name} ({type(error).__name__}: "
                      f"{error}); that module keeps transformers' forward", RuntimeWarning)
        return None
    if not same:
        warnings.warn(f"llm2vec_fast: the lean attention forward does not reproduce {name}'s; that module keeps "
                      f"transformers' forward", RuntimeWarning)
        return None
    return kwargs


def _rotary_for(attn: nn.Module, original, hidden: Tensor, width: int):
    """``(q, k, cos, sin) -> (q, k)`` through ``rotary_embedding`` and the keyword arguments of the module's
    attention call, where the lean forward reproduces the module's (checked by :func:`_probe_attention` once per
    module, dtype, device and rotary width), else None."""
    from ..ops.rotary import rotary_embedding

    backend = _fusion_backend(hidden)
    if backend is None:
        return None

    def rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
        # without gradients, in place: q and k are the projections' own buffers (or views of qkv's)
        return rotary_embedding(q, k, cos, sin, inplace=not torch.is_grad_enabled(), backend=backend)

    plans = _ATTENTION_PLANS.setdefault(attn, {})
    key = (hidden.dtype, hidden.device.type, width)
    if key not in plans:
        plans[key] = _probe_attention(attn, original, hidden, width, rotate)
    return None if plans[key] is None else (rotate, plans[key])


def _attention_forward_for(attn: nn.Module):
    original = type(attn).forward

    def forward(hidden_states: Tensor, position_embeddings=None, attention_mask=None, *args, **kwargs):
        caches = [kwargs.get(name) for name in _CACHE_ARGUMENTS]
        fused = None
        # autocast, or angles in another dtype: transformers' RoPE promotes, the op takes one dtype
        if not (args or position_embeddings is None or any(cache is not None for cache in caches)
                or torch.compiler.is_compiling() or torch.is_autocast_enabled(hidden_states.device.type)
                or position_embeddings[0].dtype != hidden_states.dtype):
            fused = _rotary_for(attn, original, hidden_states, position_embeddings[0].shape[-1])
        if fused is None:
            return original(attn, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
        rotate, static = fused
        for name in _CACHE_ARGUMENTS:  # all None: the family's forward takes them and passes them on to nothing
            kwargs.pop(name, None)
        q, k, v = _project(attn, hidden_states)
        q, k = rotate(q, k, *position_embeddings)
        out, weights = _attention_function(attn)(
            attn, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attention_mask,
            dropout=attn.attention_dropout if attn.training else 0.0, **{**static, **kwargs})
        return attn.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights
    return forward


def _lean_forward_maker(module: nn.Module):
    if is_rotary_attention(module):
        return _attention_forward_for
    if is_gated_mlp(module):
        return _mlp_forward_for
    if is_rms_norm(module):
        return _norm_forward_for
    if is_lora_linear(module):
        return _lora_forward_for
    return None


@contextlib.contextmanager
def lean_layers(model: nn.Module, fuse_dropout: bool = True) -> Iterator[List[nn.Module]]:
    """Within the block, the attention modules, gated MLPs, RMSNorms and peft LoRA linears of ``model`` (without
    hooks) run lean (see the module docstring). Modules already changed by an enclosing block are left to it.
    Yields the modules this block changed.

    ``fuse_dropout=False`` keeps peft's own LoRA term where its dropout draws (training mode): the fused op draws
    other masks, so a block that covers only one of two passes that must draw the same masks (GradCache's pass
    without gradients and its pass with them) must not use it. Training enters one block around both."""
    changed = []
    shared_cast = _SharedCast()
    for module in model.modules():
        make = _lean_forward_maker(module)
        if make is None or "forward" in module.__dict__ or _hooked(module):
            continue
        module.forward = make(module, shared_cast, fuse_dropout) if make is _lora_forward_for else make(module)
        changed.append(module)
    try:
        yield changed
    finally:
        for module in changed:
            module.__dict__.pop("forward", None)
