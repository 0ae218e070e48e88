"""``gated_activation``: act(gate) * up in one pass, the elementwise middle of the families' gated MLPs.

Anatomy as in ``ops/attention.py``: validate -> resolve the backend once -> the
``llm2vec_fast::gated_activation_forward`` custom op (fake implementation included), differentiated by the
``llm2vec_fast::gated_activation_backward`` custom op; ``inplace=True`` runs
``llm2vec_fast::gated_activation_inplace``, which writes into gate (inference: one (N, I) buffer fewer).
Every backend sees rows: (N, I).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .. import dispatch
from ..reference.gated import ACTIVATIONS
from ..validation import (check_choice, check_last_dim, check_same_device, check_same_dtype, check_tensor,
                          check_writable)

OP = "gated_activation"


@torch.library.custom_op("llm2vec_fast::gated_activation_forward", mutates_args=())
def _forward(gate: Tensor, up: Tensor, activation: str, backend: str) -> Tensor:
    return dispatch.implementation(OP, backend).forward(gate, up, activation)


@_forward.register_fake
def _(gate, up, activation, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("llm2vec_fast::gated_activation_inplace", mutates_args=("gate",))
def _forward_inplace(gate: Tensor, up: Tensor, activation: str, backend: str) -> None:
    dispatch.implementation(OP, backend).forward(gate, up, activation, out=gate)


@torch.library.custom_op("llm2vec_fast::gated_activation_backward", mutates_args=())
def _backward(grad: Tensor, gate: Tensor, up: Tensor, activation: str, backend: str) -> Tuple[Tensor, Tensor]:
    return dispatch.implementation(OP, backend).backward(grad, gate, up, activation)


@_backward.register_fake
def _(grad, gate, up, activation, backend):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.save_for_backward(gate, up)  # act(gate) is recomputed in the backward, not kept
    ctx.options = (activation, backend)


def _autograd_backward(ctx, grad):
    gate, up = ctx.saved_tensors
    grad_gate, grad_up = _backward(grad.contiguous(), gate, up, *ctx.options)
    return grad_gate, grad_up, None, None


_forward.register_autograd(_autograd_backward, setup_context=_setup_context)


def gated_activation(gate: Tensor, up: Tensor, activation: str = "silu", *, inplace: bool = False,
                     backend: str = "auto") -> Tensor:
    """act(gate) * up (same shape and dtype as gate): ``activation="silu"`` (SwiGLU: Llama, Mistral, Qwen,
    Phi-3) or ``"gelu_tanh"`` (GeGLU with GELU's tanh approximation: Gemma 1/2/3). Rounded as transformers'
    ``act_fn(gate) * up``: act(gate) in the input dtype, then the product. Differentiable in gate and up;
    only gate and up are kept for the backward. Strided rows (the two halves of a fused gate_up projection)
    are read where they are.

    ``inplace=True`` writes the result into ``gate`` and returns it (no gradients: gate must not require
    one, or grad mode must be off).
    """
    check_tensor("gate", gate)
    check_tensor("up", up)
    check_last_dim("gate", gate, "width")
    if up.shape != gate.shape:
        raise ValueError(f"up must have gate's shape {tuple(gate.shape)}, got {tuple(up.shape)}")
    check_same_dtype(gate=gate, up=up)
    check_same_device(gate=gate, up=up)
    check_choice("activation", activation, ACTIVATIONS)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be a bool, got {type(inplace).__name__} {inplace!r}")
    backend = dispatch.resolve(OP, backend, gate.device)
    width = gate.shape[-1]
    if inplace:
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            raise ValueError("inplace=True computes no gradients: gate and up must not require grad while grad "
                             "mode is on (use inplace=False for training)")
        if not gate.is_contiguous():
            raise ValueError(f"inplace=True needs a contiguous gate (it is written in place), got strides "
                             f"{gate.stride()}")
        gate_rows, up_rows = gate.view(-1, width), up.reshape(-1, width)
        check_writable({"gate": gate_rows}, {"up": up_rows}, same_ok=True)
        _forward_inplace(gate_rows, up_rows, activation, backend)
        return gate
    return _forward(gate.reshape(-1, width), up.reshape(-1, width), activation, backend).reshape(gate.shape)
