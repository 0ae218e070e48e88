"""Lean layers: the same outputs and gradients, bit for bit, with fewer large buffers.

Two kinds of transformers modules are changed, inside a ``with lean_layers(model):`` block only.

**Gated MLPs.** Every supported family's MLP computes ``down(act(gate(x)) * up(x))``. Written as one
expression it holds four (T, intermediate) buffers, the largest in a layer (4 MiB per 1,024 fp32 tokens
of a hidden-256 model; 56 MiB per 2,048 bf16 tokens of Mistral-7B).
- Without gradients, the activation and the product overwrite gate(x): SiLU runs in place and the
  product is multiplied into the same buffer. On the CPU, glibc returns freed buffers of that size to
  the system and page-faults them in again on the next layer; on the small CPU encode benchmark
  computing in place cut the page faults of a call by 3–4×. On a GPU it lowers a batch's peak memory.
- With gradients (SiLU families), autograd would keep gate(x), act(gate(x)) and up(x) for the backward.
  :class:`SiluMul` keeps gate(x) and up(x) only and recomputes the activation in its backward (as
  Liger-Kernel's SwiGLU does): one (T, intermediate) buffer less per layer.

**RMSNorms, with gradients.** transformers' RMSNorm upcasts a bf16 input to fp32 and keeps that copy
for its backward (4 bytes per element; 6 when the weight trains: the normalised input too).
:class:`RecomputedInBackward` keeps only the input (2 bytes; for a layer's first norm that is the layer
input, which gradient checkpointing keeps anyway) and reruns the norm's own forward in the backward.

Both backwards run the kernels autograd would run on the same values, so outputs and gradients equal
transformers' bit for bit in bf16 and fp16. One exception, in fp32: there the norm's upcast is the
input itself, so autograd sums the input's gradient over three uses (two in the norm, the residual)
where the recomputed norm hands over its two as one sum first; the order of those additions can move
the last bits. Without gradients only the MLPs change (same bits in every dtype).

:func:`lean_layers` replaces the ``forward`` of those modules for the duration of the block, and only
on instances: transformers' classes are not touched, and nothing survives the block (pickling and deep
copies see the modules unchanged). :func:`forward_packed` enters it when gradients are off. Training
enters it around each whole step (``training.loop``), forward and backward: a checkpointed layer
recomputed in the backward must save what its forward saved. A module keeps transformers' forward under
``torch.compile``, with extra arguments, or when it or any of its sub-modules has a hook (a hook could
see a buffer that is later overwritten).
"""
from __future__ import annotations

import contextlib
from typing import Iterator, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj", "act_fn")


def _silu_like(act: nn.Module) -> bool:
    """Whether ``act`` is SiLU (torch's or transformers'), which torch can apply in place."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def _from_transformers(module: nn.Module, suffix: str) -> bool:
    return type(module).__name__.endswith(suffix) and type(module).__module__.startswith("transformers.models.")


def is_gated_mlp(module: nn.Module) -> bool:
    """A transformers gated MLP (``XxxMLP`` with gate/up/down projections and ``act_fn``)."""
    return _from_transformers(module, "MLP") and all(
        isinstance(getattr(module, name, None), nn.Module) for name in _PROJECTIONS)


def is_rms_norm(module: nn.Module) -> bool:
    """A transformers RMSNorm (``XxxRMSNorm``, a weight and no sub-modules)."""
    return (_from_transformers(module, "RMSNorm") and isinstance(getattr(module, "weight", None), nn.Parameter)
            and not any(True for _ in module.children()))


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def lean_mlp_forward(mlp: nn.Module, x: Tensor) -> Tensor:
    """``mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))`` with the activation and the
    product written into gate(x)'s buffer (no gradients)."""
    hidden = mlp.gate_proj(x)
    hidden = F.silu(hidden, inplace=True) if _silu_like(mlp.act_fn) else mlp.act_fn(hidden)
    hidden.mul_(mlp.up_proj(x))
    return mlp.down_proj(hidden)


class SiluMul(torch.autograd.Function):
    """``silu(gate) * up``, saving gate and up only: the backward recomputes silu(gate). The forward and
    both gradients run the kernels autograd would run on the same values (same bits)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:  # autograd: MulBackward (grad * up), then SiluBackward
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


class RecomputedInBackward(torch.autograd.Function):
    """``module_forward(x)``, saving x only: the backward reruns ``module_forward`` with gradients and
    differentiates that (the same kernels on the same values as autograd on the plain forward).
    ``params``: the module's parameters that need gradients (inputs here so that they get them)."""

    @staticmethod
    def forward(ctx, module_forward, x: Tensor, *params: Tensor) -> Tensor:
        ctx.module_forward, ctx.params = module_forward, params
        ctx.save_for_backward(x)
        return module_forward(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        needs_x, needs_params = ctx.needs_input_grad[1], ctx.needs_input_grad[2:]
        with torch.enable_grad():
            leaf = x.detach().requires_grad_(needs_x)
            out = ctx.module_forward(leaf)
        wanted = ([leaf] if needs_x else []) + [p for p, needed in zip(ctx.params, needs_params) if needed]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        grad_x = next(grads) if needs_x else None
        return (None, grad_x) + tuple(next(grads) if needed else None for needed in needs_params)


def _norm_forward_for(norm: nn.Module):
    original = type(norm).forward
    plain = original.__get__(norm)  # transformers' forward, bound (what the backward reruns)

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or torch.compiler.is_compiling() or not torch.is_grad_enabled():
            return original(norm, x, *args, **kwargs)
        params = [p for p in norm.parameters() if p.requires_grad]
        if not x.requires_grad and not params:
            return original(norm, x)
        return RecomputedInBackward.apply(plain, x, *params)
    return forward


def _forward_for(mlp: nn.Module):
    original = type(mlp).forward

    def forward(x: Tensor, *args, **kwargs) -> Tensor:
        if args or kwargs or torch.compiler.is_compiling():
            return original(mlp, x, *args, **kwargs)
        if not torch.is_grad_enabled():
            return lean_mlp_forward(mlp, x)
        if _silu_like(mlp.act_fn):  # gate_proj before up_proj, as transformers calls them (LoRA dropout RNG)
            return mlp.down_proj(SiluMul.apply(mlp.gate_proj(x), mlp.up_proj(x)))
        return original(mlp, x)
    return forward


@contextlib.contextmanager
def lean_layers(model: nn.Module) -> Iterator[List[nn.Module]]:
    """Within the block, the gated MLPs and RMSNorms of ``model`` (without hooks) run lean (see the module
    docstring). Modules already changed by an enclosing block are left to it. Yields the modules this
    block changed."""
    changed = []
    for module in model.modules():
        lean_forward = _forward_for if is_gated_mlp(module) else _norm_forward_for if is_rms_norm(module) else None
        if lean_forward is None or "forward" in module.__dict__ or _hooked(module):
            continue
        module.forward = lean_forward(module)
        changed.append(module)
    try:
        yield changed
    finally:
        for module in changed:
            module.__dict__.pop("forward", None)
