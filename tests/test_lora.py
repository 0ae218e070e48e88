"""Tests of the LoRA term's fused kernels (``kernels/lora.py``: ``lora_down`` and the in-place ``lora_up_add_``),
which the lean LoRA linears run without gradients (encoding with an unmerged adapter): the reference
(``llm2vec_fast.reference.lora``) is peft's expression bit for bit; the kernels (through the Triton interpreter
under ``make test``, on a GPU otherwise) against float64 within flash-attention's bound of torch's own error,
at odd sizes, both adapter dtypes, strided rows and every rank up to MAX_RANK; and inside the models: the fused
path taken where FUSED_BACKENDS names the device and dropout draws nothing, with peft's outputs.
"""
from __future__ import annotations

import pytest
import torch

from llm2vec_fast import dispatch
from llm2vec_fast.reference import lora as reference

from elementwise_support import assert_within_bound_of_torch, max_err, randn, triton_device

needs_triton = pytest.mark.skipif(triton_device() is None,
                                  reason="triton runs in the interpreter (TRITON_INTERPRET=1) or on a GPU")
SHAPES = [(1, 96, 160, 4), (17, 100, 130, 16), (113, 64, 96, 64), (40, 33, 7, 1)]  # (T, in, out, r)


def kernels():
    from llm2vec_fast.kernels import lora
    return lora


def inputs(tokens, width_in, width_out, rank, *, dtype, adapter_dtype, seed, device="cpu"):
    x = randn(tokens, width_in, seed=seed, dtype=dtype, device=device)
    a = randn(rank, width_in, seed=seed + 1, dtype=adapter_dtype, device=device, scale=width_in ** -0.5)
    b = randn(width_out, rank, seed=seed + 2, dtype=adapter_dtype, device=device, scale=0.5)
    result = randn(tokens, width_out, seed=seed + 3, dtype=dtype, device=device)
    return x, a, b, result


def exact(result, x, a, b, scale):
    return result.double() + scale * (x.double() @ a.double().t()) @ b.double().t()


def test_reference_is_peft_bit_for_bit():
    """peft's LoRA Linear forward (eval: no dropout) is result + the reference's term, to the bit, for a float32
    adapter on a bf16 base (peft's autocast) and for matching dtypes."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(48, 72, bias=False)

    for dtype, adapter_dtype in ((torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                 (torch.bfloat16, torch.bfloat16)):
        torch.manual_seed(0)
        model = get_peft_model(Holder().to(dtype), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                              target_modules=["proj"])).eval()
        layer = model.base_model.model.proj
        for weights in (layer.lora_A, layer.lora_B):
            weights["default"].weight.data = randn(*weights["default"].weight.shape, seed=5,
                                                   dtype=adapter_dtype, scale=0.3)
        x = randn(11, 48, seed=6, dtype=dtype)
        with torch.no_grad():
            want = layer(x)
            got = reference.lora_add(layer.base_layer(x), x, layer.lora_A["default"].weight,
                                     layer.lora_B["default"].weight, layer.scaling["default"])
        assert got.dtype == want.dtype == dtype and torch.equal(got, want), (dtype, adapter_dtype)


def test_reference_matches_float64():
    x, a, b, result = inputs(9, 40, 24, 4, dtype=torch.float64, adapter_dtype=torch.float64, seed=1)
    torch.testing.assert_close(reference.lora_add(result, x, a, b, 2.0), exact(result, x, a, b, 2.0))


@needs_triton
@pytest.mark.parametrize("tokens,width_in,width_out,rank", SHAPES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
                         ids=["bf16-fp32", "fp16-fp32", "bf16-bf16", "fp32-fp32"])
def test_kernels_within_bound_of_torch(tokens, width_in, width_out, rank, dtype, adapter_dtype):
    """h = x @ A^T in float32 and result + scale * h @ B^T rounded once to result's dtype, against float64:
    within 2x the error of peft's own expression in the same dtypes."""
    device = triton_device()
    x, a, b, result = inputs(tokens, width_in, width_out, rank, dtype=dtype, adapter_dtype=adapter_dtype, seed=10,
                             device=device)
    scale = 2.0
    h = kernels().lora_down(x, a)
    assert h.dtype == torch.float32 and h.shape == (tokens, rank)
    truth_h = x.double() @ a.double().t()
    torch_h = reference.lora_down(x, a.float())  # torch's float32 product of the same operands
    assert max_err(h, truth_h) <= 2 * max_err(torch_h, truth_h) + 1e-6
    out = result.clone()
    returned = kernels().lora_up_add_(out, h, b, scale)
    assert returned is out and out.dtype == dtype
    truth = exact(result, x, a, b, scale)
    theirs = reference.lora_add(result, x, a, b, scale)
    # one rounding to a 16-bit dtype at the end; the interpreter truncates bf16 where a GPU rounds: one unit more
    truncating = dispatch.triton_interpreting() and dtype == torch.bfloat16
    assert_within_bound_of_torch(["out"], [out], [theirs], truth, truncation_ulps=1 if truncating else 0)
    assert not torch.equal(out, result)  # the term was added


@needs_triton
def test_strided_rows_in_place_and_empty():
    device = triton_device()
    x, a, b, result = inputs(21, 64, 80, 8, dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=20,
                             device=device)
    wide_x = torch.cat([x, randn(21, 5, seed=21, dtype=torch.bfloat16, device=device)], dim=1)[:, :64]
    torch.testing.assert_close(kernels().lora_down(wide_x, a), kernels().lora_down(x.contiguous(), a))
    padded = torch.full((21, 90), 7.0, dtype=torch.bfloat16, device=device)
    padded[:, :80] = result
    view = padded[:, :80]  # rows 90 apart: the columns past 80 must keep their 7s
    h = kernels().lora_down(x, a)
    kernels().lora_up_add_(view, h, b, 0.5)
    assert torch.equal(padded[:, 80:], torch.full((21, 10), 7.0, dtype=torch.bfloat16, device=device))
    torch.testing.assert_close(view, kernels().lora_up_add_(result.clone(), h, b, 0.5), atol=0, rtol=0)
    empty = torch.empty(0, 80, dtype=torch.bfloat16, device=device)
    assert kernels().lora_up_add_(empty, kernels().lora_down(x[:0], a), b, 1.0).shape == (0, 80)
    with pytest.raises(ValueError, match="out must have unit stride in its last dim, got strides"):
        kernels().lora_up_add_(result.t(), h[:80], b[:21], 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)], ids=["bf16-fp32", "fp16-fp32",
                                                                                         "bf16-bf16"])
def test_kernels_on_the_gpu_at_model_sizes(dtype, adapter_dtype):
    """The compiled kernels at a 7B layer's widths (4096 in, rank 16, a 1536-column slice of an output) and an
    odd token count, within the bound of peft's own expression against float64."""
    x, a, b, result = inputs(4099, 4096, 1536, 16, dtype=dtype, adapter_dtype=adapter_dtype, seed=30, device="cuda")
    h = kernels().lora_down(x, a)
    truth_h = x.double() @ a.double().t()
    assert max_err(h, truth_h) <= 2 * max_err(reference.lora_down(x, a.float()), truth_h) + 1e-6
    out = kernels().lora_up_add_(result.clone(), h, b, 2.0)
    truth = exact(result, x, a, b, 2.0)
    assert_within_bound_of_torch(["out"], [out], [reference.lora_add(result, x, a, b, 2.0)], truth)


# ---------------------------------------------------------------------------------------------------
# Inside the models: the lean LoRA linears without gradients
# ---------------------------------------------------------------------------------------------------
def _model():
    """A bf16 Mistral with a float32 LoRA on its seven projections (peft's autocast), in eval mode."""
    from test_lean import _lora_model
    return _lora_model("mistral", torch.bfloat16, adapter_dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton)])
def test_lean_lora_linears_run_the_fused_term_where_the_device_is_named(monkeypatch, backend):
    """Encoding a bf16 model with a float32 adapter: with FUSED_BACKENDS naming the device, every LoRA linear adds
    its term through the fused path (the probe passing once), and the output is peft's (bit for bit through the
    torch reference, within bf16 rounding through the kernels); training mode, where dropout draws, and a rank
    above MAX_RANK keep the unfused path."""
    from test_models import make_batch

    from llm2vec_fast.models import lean
    model = _model()
    ids, mask = make_batch(seed=3)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
    calls = []
    real = lean._fused_lora

    def recording(layer, adapter, x):
        fused = real(layer, adapter, x)
        calls.append(fused is not None)
        return fused

    monkeypatch.setattr(lean, "_fused_lora", recording)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": backend})
    monkeypatch.setattr(lean, "_PROBES", {})
    with torch.no_grad(), lean.lean_layers(model):
        fused = model(input_ids=ids, attention_mask=mask).last_hidden_state
    loras = [m for m in model.modules() if lean.is_lora_linear(m)]
    assert calls == [True] * len(loras)
    assert "LoRA term (torch.float32 adapter)" in [key[0] for key in lean._PROBES] and all(lean._PROBES.values())
    if backend == "torch":  # the reference is peft's expression: the model's very bits
        assert torch.equal(fused, plain)
    else:  # against the same model in float32: within 2x the error of the unfused LoRA term (others fused alike)
        import copy
        with torch.no_grad():
            truth = copy.deepcopy(model).float()(input_ids=ids, attention_mask=mask).last_hidden_state.double()
        monkeypatch.setattr(lean, "_fused_lora", lambda layer, adapter, x: None)
        with torch.no_grad(), lean.lean_layers(model):
            unfused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours, theirs = max_err(fused, truth), max_err(unfused, truth)
        assert not torch.equal(fused, unfused) and ours <= 2 * theirs, (ours, theirs)
        monkeypatch.setattr(lean, "_fused_lora", recording)
    calls.clear()
    model.train()  # LoRA dropout draws: peft's own path, same masks
    with torch.no_grad(), lean.lean_layers(model):
        model(input_ids=ids, attention_mask=mask)
    assert calls == [] or not any(calls)
    if backend == "triton":  # a rank past the kernels' MAX_RANK keeps the unfused path
        model.eval()
        layer = loras[0]
        monkeypatch.setattr(layer.lora_A["default"], "weight", torch.nn.Parameter(torch.randn(200, layer.in_features)))
        assert real(layer, "default", torch.randn(3, layer.in_features, dtype=torch.bfloat16)) is None


def test_a_fused_term_that_differs_is_refused_once_with_a_warning(monkeypatch):
    """The probe's verdict is kept per layer class, dtype and adapter dtype: a term that does not reproduce peft's
    leaves every LoRA linear of that kind on the unfused path, with one RuntimeWarning."""
    from llm2vec_fast.models import lean
    model = _model()
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setattr(lean, "_PROBES", {})
    monkeypatch.setattr(lean, "_reproduces", lambda ours, theirs, dtype: False)
    layers = [m for m in model.modules() if lean.is_lora_linear(m)]
    x = torch.randn(3, layers[0].in_features, dtype=torch.bfloat16)
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        assert lean._fused_lora(layers[0], "default", x) is None
    assert lean._fused_lora(layers[1], "default", x) is None  # decided once
    assert list(lean._PROBES.values()) == [False]
