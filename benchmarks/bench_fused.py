"""Fused elementwise ops, judged in GB/s: ``rms_norm``, ``gated_activation`` (SwiGLU) and ``rotary_embedding``
(RoPE of q and k), each forward (no grad: what encoding runs; RoPE in place, as the lean attention modules run
it) and forward + backward (training: ops ``rms_norm_fwd_bwd``, ``gated_activation_fwd_bwd``,
``rotary_embedding_fwd_bwd``).

Impls, on the same inputs:
- ours: ``lf.rms_norm(x, weight, casting_mode="llama", backend=b)`` / ``lf.gated_activation(gate, up, "silu",
  backend=b)`` / ``lf.rotary_embedding(q, k, cos, sin, backend=b)`` for every backend that runs here;
- ``transformers_eager``: what the models run without us: ``LlamaRMSNorm.forward`` (upcast, square, mean,
  rsqrt, scale, downcast, weight: several passes over fp32 copies), ``act_fn(gate) * up``, Llama's
  ``apply_rotary_pos_emb`` on the (1, H, T, D) views the attention modules hand it (about ten kernels);
- ``liger``: Liger-Kernel's ``LigerRMSNorm`` (casting_mode="llama"), ``LigerSiLUMulFunction`` and
  ``liger_rotary_pos_emb``, when liger-kernel is importable (on a GPU).

GB/s counts the bytes a one-pass kernel must move, the same for every impl, so an impl that makes more
passes pays for them in time. rms_norm: forward reads x and writes y (2 * N * D * elem); forward + backward
also reads x and dy and writes dx (5 in all; the weight and the per-row statistics are negligible).
gated_activation: forward reads gate and up and writes the product (3 * N * I * elem); forward + backward
also reads dy, gate and up and writes d gate and d up (8 in all). rotary_embedding: forward reads q and k and
writes them rotated (2 * (q + k) bytes, plus cos and sin once); forward + backward also reads d q' and d k' and
writes d q and d k (4 * (q + k), plus cos and sin twice).

LoRA linears (``lora_linear``: no grad, eval; ``lora_linear_fwd_bwd``: training mode, LoRA dropout drawing, the
gradients of x and of the LoRA weights): a peft LoRA ``Linear`` (r 16, alpha 32, dropout 0.05) on Mistral-7B's
gate projection (4096 -> 14336) over 16k tokens, bf16 with the float32 adapter peft's autocast gives it.
``peft`` is its own forward, ``llm2vec_fast_lean`` the lean layers' (``models.lean``: on a GPU the fused
``lora_linear`` op, ``kernels/lora.py``, with and without gradients; its own dropout masks in training).
``lora_linear_base`` times the base linear alone (impl ``base_linear``), so that what the LoRA term costs on top
is read off the same run. GB/s counts reading x and writing the output once.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Sequence, Tuple

import torch

import llm2vec_fast as lf

from .harness import Case, SkipImpl, our_impls, randn

OPS = ("rms_norm", "rms_norm_fwd_bwd", "gated_activation", "gated_activation_fwd_bwd", "rotary_embedding",
       "rotary_embedding_fwd_bwd", "lora_linear", "lora_linear_fwd_bwd", "lora_linear_base")
# (rows, D): per-head q/k norms (Qwen3: 16k tokens x 32 heads of 128), then 7B- and 70B-class hidden sizes.
NORM_SHAPES = ((16384 * 32, 128), (16384, 4096), (16384, 8192))
GATED_SHAPES = ((16384, 14336),)  # Mistral-7B's MLP over 16k tokens
# (T, Hq, Hkv, D): Mistral-7B's q and k over 16k tokens, and Qwen2-1.5B-like heads of 128 (GQA 6)
ROTARY_SHAPES = ((16384, 32, 8, 128), (16384, 12, 2, 128))
# (T, in, out, r): Mistral-7B's gate projection over 16k tokens, the LoRA rank llm2vec's recipes use
LORA_SHAPES = ((16384, 4096, 14336, 16),)
CPU_LORA_SHAPES = ((2048, 1024, 3584, 16),)  # a CPU times the matmul, not the LoRA term, at 7B sizes
QUICK_NORM_SHAPES, QUICK_GATED_SHAPES, QUICK_ROTARY_SHAPES = ((256, 64),), ((64, 96),), ((33, 4, 2, 64),)
QUICK_LORA_SHAPES = ((65, 96, 160, 4),)
EPS = 1e-5

METHOD_NOTES = [
    "rms_norm (casting_mode=llama) and gated_activation (silu): GB/s = one pass's bytes for every impl (rms_norm "
    "fwd 2, fwd+bwd 5; gated fwd 3, fwd+bwd 8 tensors of the input's size); transformers_eager is LlamaRMSNorm / "
    "act_fn(gate) * up, liger is LigerRMSNorm / LigerSiLUMulFunction.",
    "rotary_embedding: GB/s = one pass's bytes (fwd 2, fwd+bwd 4 times q and k, plus cos and sin); ours runs in "
    "place without gradients; transformers_eager is Llama's apply_rotary_pos_emb on (1, H, T, D) views, liger is "
    "liger_rotary_pos_emb.",
    "lora_linear: a peft LoRA Linear (r 16, fp32 adapter on bf16) on the gate projection; peft = its forward, "
    "llm2vec_fast_lean = the lean layers' (on a GPU the fused lora_linear op of kernels/lora.py, forward and "
    "backward); lora_linear_base = the base "
    "linear alone, to read the LoRA term's cost off the same run. GB/s counts x read and the output written once.",
]


def _liger(module: str, name: str, device: torch.device):
    """``name`` from liger-kernel's ``module``; SkipImpl where liger-kernel is not installed or not on a GPU."""
    import importlib
    if device.type != "cuda":
        raise SkipImpl("liger-kernel runs on a GPU only")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as error:
        raise SkipImpl(f"liger-kernel's {module}.{name} is not importable ({error})") from None


def _llama_norm(weight: torch.Tensor) -> torch.nn.Module:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    module = LlamaRMSNorm(weight.shape[0], eps=EPS).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


def _liger_norm(weight: torch.Tensor) -> torch.nn.Module:
    LigerRMSNorm = _liger("liger_kernel.transformers.rms_norm", "LigerRMSNorm", weight.device)
    module = LigerRMSNorm(weight.shape[0], eps=EPS, casting_mode="llama").to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        module.weight.copy_(weight)
    return module


def _timed(fn: Callable, inputs: Sequence[torch.Tensor], with_backward: bool, outputs: int = 1) -> Callable:
    """fn(*inputs) without gradients, or its gradients with respect to every input. fn returns one tensor shaped
    like inputs[0], or (``outputs`` > 1) a tuple shaped like the first ``outputs`` inputs."""
    if not with_backward:
        def forward():
            with torch.no_grad():
                return fn(*inputs)
        return forward
    leaves = [x.detach().requires_grad_(True) for x in inputs]
    grads = [randn(x.shape, x.dtype, x.device) for x in inputs[:outputs]]
    grad = grads[0] if outputs == 1 else grads

    def forward_backward():
        return torch.autograd.grad(fn(*leaves), leaves, grad)
    return forward_backward


def norm_impls(x: torch.Tensor, weight: torch.Tensor, with_backward: bool) -> List[Tuple[str, Callable]]:
    def ours(name):
        return lambda: _timed(lambda t: lf.rms_norm(t, weight, EPS, backend=name), [x], with_backward)

    def module(make):
        return lambda: _timed(make(weight), [x], with_backward)

    return (our_impls("rms_norm", x.device, ours) +
            [("transformers_eager", module(_llama_norm)), ("liger", module(_liger_norm))])


def gated_impls(gate: torch.Tensor, up: torch.Tensor, with_backward: bool) -> List[Tuple[str, Callable]]:
    from transformers.activations import ACT2FN
    act = ACT2FN["silu"]

    def ours(name):
        return lambda: _timed(lambda g, u: lf.gated_activation(g, u, "silu", backend=name), [gate, up],
                              with_backward)

    def liger():
        return _timed(_liger("liger_kernel.ops.swiglu", "LigerSiLUMulFunction", gate.device).apply, [gate, up],
                      with_backward)

    return (our_impls("gated_activation", gate.device, ours) +
            [("transformers_eager", lambda: _timed(lambda g, u: act(g) * u, [gate, up], with_backward)),
             ("liger", liger)])


def rotary_impls(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 with_backward: bool) -> List[Tuple[str, Callable]]:
    """Ours per backend, in place without gradients; transformers' and Liger's on the (1, H, T, D) views of the
    same (T, H, D) storage, as the attention modules hold q and k."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def timed(fn):
        return _timed(fn, [q, k], with_backward, outputs=2)

    def ours(name):
        return lambda: timed(lambda a, b: lf.rotary_embedding(a, b, cos, sin, inplace=not with_backward,
                                                              backend=name))

    def heads_first(fn):
        """fn on (1, H, T, D) views, its outputs seen as (T, H, D) again."""
        def call(a, b):
            rotated = fn(a.transpose(0, 1)[None], b.transpose(0, 1)[None], cos[None], sin[None])
            return tuple(x[0].transpose(0, 1) for x in rotated)
        return call

    def liger():
        return timed(heads_first(_liger("liger_kernel.transformers.rope", "liger_rotary_pos_emb", q.device)))

    return (our_impls("rotary_embedding", q.device, ours) +
            [("transformers_eager", lambda: timed(heads_first(apply_rotary_pos_emb))), ("liger", liger)])


def _lora_linear(width_in: int, width_out: int, rank: int, dtype: torch.dtype, device: torch.device):
    """A model holding one peft LoRA Linear (``proj``) as ``get_peft_model`` makes it: in ``dtype``, the adapter
    in float32 (peft's autocast_adapter_dtype), B drawn non-zero as after some training."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(width_in, width_out, bias=False)

    torch.manual_seed(0)
    holder = get_peft_model(Holder().to(device=device, dtype=dtype),
                            LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["proj"]))
    layer = holder.base_model.model.proj
    with torch.no_grad():
        for weights in (layer.lora_A, layer.lora_B):
            weights["default"].weight.normal_(0, 0.02)
    return holder, layer


def lora_impls(x: torch.Tensor, holder, layer, with_backward: bool) -> List[Tuple[str, Callable]]:
    """peft's forward and the lean one on the same layer: eval without gradients, or training mode with the
    gradients of x and of the LoRA weights. The lean forward is called as ``lean_layers`` installs it, with a
    fresh shared-cast cache per call (one linear: one cast, as peft)."""
    from llm2vec_fast.models.lean import _lora_forward_for, _SharedCast
    lora_weights = [p for name, p in layer.named_parameters() if "lora_" in name]

    def timed(lean: bool):
        holder.train(with_backward)

        def run(value):
            return _lora_forward_for(layer, _SharedCast())(value) if lean else layer(value)
        if not with_backward:
            def forward():
                with torch.no_grad():
                    return run(x)
            return forward
        leaf = x.detach().requires_grad_(True)
        grad = randn((x.shape[0], layer.out_features), x.dtype, x.device)

        def forward_backward():
            return torch.autograd.grad(run(leaf), [leaf] + lora_weights, grad)
        return forward_backward

    return [("llm2vec_fast_lean", lambda: timed(True)), ("peft", lambda: timed(False))]


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for rows, dim in QUICK_NORM_SHAPES if quick else NORM_SHAPES:
        x, weight = randn((rows, dim), dtype, device), randn((dim,), dtype, device, scale=0.5)
        for op, with_backward, tensors in (("rms_norm", False, 2), ("rms_norm_fwd_bwd", True, 5)):
            yield Case(op, f"T={rows},D={dim}", dtype, norm_impls(x, weight, with_backward),
                       nbytes=float(tensors * x.numel() * x.element_size()))
    for rows, width in QUICK_GATED_SHAPES if quick else GATED_SHAPES:
        gate, up = randn((rows, width), dtype, device, scale=2.0), randn((rows, width), dtype, device)
        for op, with_backward, tensors in (("gated_activation", False, 3), ("gated_activation_fwd_bwd", True, 8)):
            yield Case(op, f"T={rows},I={width},activation=silu", dtype, gated_impls(gate, up, with_backward),
                       nbytes=float(tensors * gate.numel() * gate.element_size()))
    for tokens, heads_q, heads_kv, dim in QUICK_ROTARY_SHAPES if quick else ROTARY_SHAPES:
        q, k = randn((tokens, heads_q, dim), dtype, device), randn((tokens, heads_kv, dim), dtype, device)
        phase = randn((tokens, dim // 2), torch.float32, device, scale=100.0)
        phase = torch.cat((phase, phase), dim=-1)
        cos, sin = phase.cos().to(dtype), phase.sin().to(dtype)
        rows, angles = (q.numel() + k.numel()) * q.element_size(), 2 * cos.numel() * cos.element_size()
        for op, with_backward, tensors in (("rotary_embedding", False, 2), ("rotary_embedding_fwd_bwd", True, 4)):
            yield Case(op, f"T={tokens},Hq={heads_q},Hkv={heads_kv},D={dim},R={dim}", dtype,
                       rotary_impls(q, k, cos, sin, with_backward),
                       nbytes=float(tensors * rows + tensors // 2 * angles))
    lora_shapes = QUICK_LORA_SHAPES if quick else LORA_SHAPES if device.type == "cuda" else CPU_LORA_SHAPES
    for tokens, width_in, width_out, rank in lora_shapes:
        holder, layer = _lora_linear(width_in, width_out, rank, dtype, device)
        x = randn((tokens, width_in), dtype, device)
        shape, nbytes = f"T={tokens},in={width_in},out={width_out},r={rank},lora=fp32", float(
            (tokens * width_in + tokens * width_out) * x.element_size())
        for op, with_backward in (("lora_linear", False), ("lora_linear_fwd_bwd", True)):
            yield Case(op, shape, dtype, lora_impls(x, holder, layer, with_backward), nbytes=nbytes)

        def base_linear(layer=layer, x=x):
            def forward():
                with torch.no_grad():
                    return layer.base_layer(x)
            return forward
        yield Case("lora_linear_base", shape, dtype, [("base_linear", base_linear)], nbytes=nbytes)
