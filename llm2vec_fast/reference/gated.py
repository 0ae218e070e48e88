"""Reference gated activation, ``act(gate) * up``: the elementwise middle of the families' gated MLPs.

- ``activation="silu"`` (Llama, Mistral, Qwen2/3, Phi-3: SwiGLU), ``"gelu_tanh"`` (Gemma 1/2/3: GeGLU with
  transformers' ``gelu_pytorch_tanh``, GELU's tanh approximation).
- Rounding as transformers' forward: act(gate) is rounded to the input dtype, then the product is rounded
  (``act_fn(gate) * up`` in that dtype), bit for bit on the same device.

Backward (float32 inside, each gradient rounded once): d up = dy * act(gate), d gate = dy * up * act'(gate), with
    silu'(g) = s (1 + g (1 - s)), s = sigmoid(g);
    gelu_tanh'(g) = 0.5 (1 + t) + 0.5 g (1 - t^2) c (1 + 3 k g^2),
    with t = tanh(c (g + k g^3)), c = sqrt(2/pi), k = 0.044715.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("silu", "gelu_tanh")
GELU_TANH_SCALE = math.sqrt(2.0 / math.pi)
GELU_TANH_CUBIC = 0.044715


def activate(gate: Tensor, activation: str) -> Tensor:
    """act(gate) in gate's dtype, as transformers computes it."""
    return F.silu(gate) if activation == "silu" else F.gelu(gate, approximate="tanh")


def activation_derivative(gate32: Tensor, activation: str) -> Tensor:
    """act'(gate) for a float32 (or float64) gate."""
    if activation == "silu":
        s = torch.sigmoid(gate32)
        return s * (1 + gate32 * (1 - s))
    t = torch.tanh(GELU_TANH_SCALE * (gate32 + GELU_TANH_CUBIC * gate32 ** 3))
    return 0.5 * (1 + t) + 0.5 * gate32 * (1 - t * t) * GELU_TANH_SCALE * (1 + 3 * GELU_TANH_CUBIC * gate32 ** 2)


def gated_forward(gate: Tensor, up: Tensor, activation: str, out: Optional[Tensor] = None) -> Tensor:
    """act(gate) * up, rounded as transformers rounds it; written into ``out`` when given (which may be gate)."""
    value = activate(gate, activation) * up
    if out is None:
        return value
    return out.copy_(value)


def gated_backward(grad: Tensor, gate: Tensor, up: Tensor, activation: str):
    """(d gate, d up) in the inputs' dtypes, by the formulas in the module docstring."""
    grad32, gate32 = grad.float(), gate.float()
    grad_up = grad32 * activate(gate32, activation)
    grad_gate = grad32 * up.float() * activation_derivative(gate32, activation)
    return grad_gate.to(gate.dtype), grad_up.to(up.dtype)
