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

from elementwise_support import assert_rounds_like, assert_within_bound_of_torch, max_err, randn, triton_device

needs_triton = pytest.mark.skipif(triton_device() is None,
                                  reason="triton runs in the interpreter (TRITON_INTERPRET=1) or on a GPU")
SHAPES = [(1, 96, 160, 4), (17, 100, 130, 16), (113, 64, 96, 64), (40, 33, 7, 1)]  # (T, in, out, r)


OP_BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


def backend_device(backend: str) -> str:
    """Where a test of ``backend`` runs: triton in the interpreter (CPU) or on a GPU, torch on the CPU."""
    return triton_device() if backend == "triton" else "cpu"


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
# The op, lora_linear: the base linear and the term, forward and backward, with dropout
# ---------------------------------------------------------------------------------------------------
def layer_inputs(tokens, width_in, width_out, rank, *, dtype, adapter_dtype, seed, device="cpu", bias=True):
    """(x, weight, bias, lora_a, lora_b): a linear in ``dtype`` with an adapter in ``adapter_dtype``."""
    x, a, b, _ = inputs(tokens, width_in, width_out, rank, dtype=dtype, adapter_dtype=adapter_dtype, seed=seed,
                        device=device)
    weight = randn(width_out, width_in, seed=seed + 4, dtype=dtype, device=device, scale=width_in ** -0.5)
    bias_values = randn(width_out, seed=seed + 5, dtype=dtype, device=device) if bias else None
    return x, weight, bias_values, a, b


def exact_linear(x, weight, bias, a, b, scale, keep=None, dropout_p=0.0):
    """The layer in float64 (autograd gives its gradients), dropout as ``keep`` masks it."""
    dropped = x if keep is None else x * keep.double() / (1 - dropout_p)
    out = x @ weight.t() + scale * (dropped @ a.t()) @ b.t()
    return out if bias is None else out + bias


class MaskDropout(torch.nn.Module):
    """torch's dropout with a given keep mask (peft's dropout module, made deterministic)."""

    def __init__(self, keep, p):
        super().__init__()
        self.keep, self.p = keep, p

    def forward(self, x):
        return x * (self.keep.to(x.dtype) * (1.0 / (1.0 - self.p)))


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16)], ids=["bf16-fp32", "fp32", "bf16"])
def test_reference_layer_is_peft_forward_and_backward_bit_for_bit(dtype, adapter_dtype):
    """peft's LoRA Linear in training mode, its dropout given a mask: the reference's output and gradients of x, A
    and B (given the same mask) are peft's, to the bit (the backward is written out as autograd runs peft's graph)."""
    from peft import LoraConfig, get_peft_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(48, 72)

    torch.manual_seed(0)
    model = get_peft_model(Holder().to(dtype), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.25,
                                                          target_modules=["proj"]))
    layer = model.base_model.model.proj
    lora_a, lora_b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    for weight, seed in ((lora_a, 5), (lora_b, 6)):
        weight.data = randn(*weight.shape, seed=seed, dtype=adapter_dtype, scale=0.3)
    keep = torch.rand(11, 48, generator=torch.Generator().manual_seed(7)) >= 0.25
    layer.lora_dropout["default"] = MaskDropout(keep, 0.25)
    x = randn(11, 48, seed=8, dtype=dtype).requires_grad_(True)
    grad = randn(11, 72, seed=9, dtype=dtype)
    want = layer(x)
    want_grads = torch.autograd.grad(want, (x, lora_a, lora_b), grad)
    base = layer.base_layer
    out, h = reference.lora_linear_forward(x.detach(), base.weight, base.bias, lora_a.detach(), lora_b.detach(),
                                           layer.scaling["default"], 0.25, keep=keep)
    got_grads = reference.lora_linear_backward(grad, x.detach(), base.weight, lora_a.detach(), lora_b.detach(), h,
                                               layer.scaling["default"], 0.25, keep=keep)
    assert out.dtype == dtype and torch.equal(out, want.detach())
    for name, got, expected in zip(("x", "lora_a", "lora_b"), got_grads, want_grads):
        assert got.dtype == expected.dtype and torch.equal(got, expected), name


@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_reference_layer_matches_float64(dropout_p):
    x, weight, bias, a, b = layer_inputs(9, 40, 24, 4, dtype=torch.float64, adapter_dtype=torch.float64, seed=1)
    keep = torch.rand(9, 40, generator=torch.Generator().manual_seed(2)) >= dropout_p
    grad = randn(9, 24, seed=3, dtype=torch.float64)
    out, h = reference.lora_linear_forward(x, weight, bias, a, b, 2.0, dropout_p, keep=keep)
    dx, da, db = reference.lora_linear_backward(grad, x, weight, a, b, h, 2.0, dropout_p, keep=keep)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    want = exact_linear(leaves[0], weight, bias, leaves[1], leaves[2], 2.0, keep if dropout_p else None, dropout_p)
    torch.testing.assert_close(out, want.detach())
    for got, expected in zip((dx, da, db), torch.autograd.grad(want, leaves, grad)):
        torch.testing.assert_close(got, expected)


LAYER_CASES = [(1, 96, 160, 4, 0.0), (17, 100, 130, 16, 0.3), (113, 64, 96, 64, 0.1), (40, 33, 7, 1, 0.5),
               (70, 130, 33, 40, 0.2)]  # (T, in, out, r, dropout_p); 70 rows: several row splits of 64


@needs_triton
@pytest.mark.parametrize("tokens,width_in,width_out,rank,dropout_p", LAYER_CASES)
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)],
                         ids=["bf16-fp32", "fp16-fp32", "bf16-bf16", "fp32-fp32"])
def test_triton_layer_within_bound_of_torch(tokens, width_in, width_out, rank, dropout_p, dtype, adapter_dtype):
    """The triton backend's output and gradients of x, A and B, with its own dropout mask (from
    ``dropout_mask``), against the float64 layer under that mask: within 2x (output) and 3x (gradients) the error of
    the reference (peft's expression) in the same dtypes."""
    from llm2vec_fast.kernels import lora as kernels_module
    device = triton_device()
    x, weight, bias, a, b = layer_inputs(tokens, width_in, width_out, rank, dtype=dtype, adapter_dtype=adapter_dtype,
                                         seed=11, device=device, bias=rank != 1)
    grad = randn(tokens, width_out, seed=12, dtype=dtype, device=device)
    seed = 1234 + tokens
    keep = kernels_module.dropout_mask(tokens, width_in, dropout_p, seed, device)
    out, h = kernels_module.forward(x, weight, bias, a, b, 2.0, dropout_p, seed)
    dx, da, db = kernels_module.backward(grad, x, weight, a, b, h, 2.0, dropout_p, seed)
    base_out, base_h = reference.lora_linear_forward(x, weight, bias, a, b, 2.0, dropout_p, keep=keep)
    base_grads = reference.lora_linear_backward(grad, x, weight, a, b, base_h, 2.0, dropout_p, keep=keep)
    leaves = [t.detach().cpu().double().requires_grad_(True) for t in (x, a, b)]
    truth = exact_linear(leaves[0], weight.cpu().double(), None if bias is None else bias.cpu().double(), leaves[1],
                         leaves[2], 2.0, keep.cpu(), dropout_p)
    truth_grads = torch.autograd.grad(truth, leaves, grad.cpu().double())
    assert (out.dtype, dx.dtype, da.dtype, db.dtype) == (dtype, dtype, adapter_dtype, adapter_dtype)
    assert h.dtype == torch.float32 and h.shape == (tokens, rank)
    truncating = dispatch.triton_interpreting() and torch.bfloat16 in (dtype, adapter_dtype)
    assert_within_bound_of_torch(["out", "dx", "dA", "dB"], [out, dx, da, db], [base_out, *base_grads],
                                 [truth.detach(), *truth_grads], truncation_ulps=2 if truncating else 0)


@needs_triton
def test_triton_dropout_mask_statistics_and_replay():
    """philox keeps each element with probability 1 - p, independently of the seed's other draws; the same seed
    draws the same mask; the forward's h is x after that mask (scaled) times A^T."""
    from llm2vec_fast.kernels import lora as kernels_module
    device = triton_device()
    rows, cols = 200, 300
    for p in (0.05, 0.3):
        keep = kernels_module.dropout_mask(rows, cols, p, 99, device)
        kept = keep.float().mean().item()
        sigma = (p * (1 - p) / (rows * cols)) ** 0.5
        assert abs(kept - (1 - p)) < 5 * sigma, (p, kept)
        assert torch.equal(keep, kernels_module.dropout_mask(rows, cols, p, 99, device))
        assert not torch.equal(keep, kernels_module.dropout_mask(rows, cols, p, 100, device))
        # neighbouring rows and columns are not correlated (the counters are distinct)
        assert not torch.equal(keep[0], keep[1]) and not torch.equal(keep[:, 0], keep[:, 1])
    x, a = randn(rows, cols, seed=5, device=device), randn(8, cols, seed=6, device=device)
    h = kernels_module.lora_down(x, a, dropout_p=0.3, seed=99)
    keep = kernels_module.dropout_mask(rows, cols, 0.3, 99, device)
    torch.testing.assert_close(h, (x * keep / 0.7) @ a.t(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_dropout_follows_torch_manual_seed_and_is_replayed_by_checkpointing(backend):
    """The seed comes from torch's CPU generator: the same manual_seed gives the same output, another one another
    output, and a checkpointed call (its forward rerun in the backward, RNG state restored) the same gradients."""
    import llm2vec_fast as lf
    from torch.utils.checkpoint import checkpoint
    device = backend_device(backend)
    x, weight, bias, a, b = layer_inputs(13, 40, 24, 4, dtype=torch.float32, adapter_dtype=torch.float32, seed=3,
                                         device=device)

    def run(seed, checkpointed=False):
        torch.manual_seed(seed)
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]

        def layer(x, a, b):
            return lf.lora_linear(x, weight, a, b, 2.0, bias, dropout_p=0.3, backend=backend)
        out = checkpoint(layer, *leaves, use_reentrant=False) if checkpointed else layer(*leaves)
        out.square().sum().backward()
        return [out.detach()] + [leaf.grad for leaf in leaves]

    first, again, other, replayed = run(0), run(0), run(1), run(0, checkpointed=True)
    assert all(torch.equal(u, v) for u, v in zip(first, again))
    assert all(torch.equal(u, v) for u, v in zip(first, replayed))
    assert not torch.equal(first[0], other[0])
    no_dropout = lf.lora_linear(x, weight, a, b, 2.0, bias, backend=backend)
    assert not torch.equal(first[0], no_dropout)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_gradients_of_a_trained_base_and_three_dimensional_input(backend):
    """A base weight and bias that require grad get F.linear's gradients; (B, S, in) inputs keep their shape; a
    rank past the kernels' MAX_RANK runs the reference on the triton backend (the same bits as the torch one)."""
    import llm2vec_fast as lf
    device = backend_device(backend)
    for rank in (4, 80):
        x, weight, bias, a, b = layer_inputs(15, 40, 24, rank, dtype=torch.float32, adapter_dtype=torch.float32,
                                             seed=4, device=device)
        x = x.view(3, 5, 40)
        leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, a, b)]
        out = lf.lora_linear(leaves[0], leaves[1], leaves[3], leaves[4], 0.5, leaves[2], backend=backend)
        assert out.shape == (3, 5, 24)
        grad = randn(3, 5, 24, seed=5, device=device)
        got = torch.autograd.grad(out, leaves, grad)
        truth_leaves = [t.detach().double().requires_grad_(True) for t in (x, weight, bias, a, b)]
        truth = exact_linear(truth_leaves[0], truth_leaves[1], truth_leaves[2], truth_leaves[3], truth_leaves[4], 0.5)
        want = torch.autograd.grad(truth, truth_leaves, grad.double())
        torch.testing.assert_close(out.double(), truth.detach(), rtol=1e-5, atol=1e-5)
        for name, g, w in zip(("x", "weight", "bias", "lora_a", "lora_b"), got, want):
            torch.testing.assert_close(g.double(), w, rtol=1e-5, atol=1e-5, msg=name)
        if rank == 80 and backend == "triton":
            torch.manual_seed(0)
            fallback = lf.lora_linear(x, weight, a, b, 0.5, bias, dropout_p=0.2, backend="triton")
            torch.manual_seed(0)
            assert torch.equal(fallback, lf.lora_linear(x, weight, a, b, 0.5, bias, dropout_p=0.2, backend="torch"))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=["bf16-fp32", "bf16-bf16"])
@pytest.mark.parametrize("rank,dropout_p", [(16, 0.05), (64, 0.0)])
def test_triton_layer_on_the_gpu_at_model_sizes(dtype, adapter_dtype, rank, dropout_p):
    """The compiled forward and backward at a 7B layer's widths (4096 in, a 1536-column slice of an output) and an
    odd token count, within the bound of peft's own expression against float64, under the kernels' own mask."""
    from llm2vec_fast.kernels import lora as kernels_module
    tokens, width_in, width_out = 4099, 4096, 1536
    x, weight, bias, a, b = layer_inputs(tokens, width_in, width_out, rank, dtype=dtype, adapter_dtype=adapter_dtype,
                                         seed=40, device="cuda", bias=False)
    grad = randn(tokens, width_out, seed=41, dtype=dtype, device="cuda")
    keep = kernels_module.dropout_mask(tokens, width_in, dropout_p, 77, "cuda")
    out, h = kernels_module.forward(x, weight, None, a, b, 2.0, dropout_p, 77)
    got = [out, *kernels_module.backward(grad, x, weight, a, b, h, 2.0, dropout_p, 77)]
    base_out, base_h = reference.lora_linear_forward(x, weight, None, a, b, 2.0, dropout_p, keep=keep)
    base = [base_out, *reference.lora_linear_backward(grad, x, weight, a, b, base_h, 2.0, dropout_p, keep=keep)]
    leaves = [t.detach().double().requires_grad_(True) for t in (x, a, b)]
    truth = exact_linear(leaves[0], weight.double(), None, leaves[1], leaves[2], 2.0, keep, dropout_p)
    truth_grads = torch.autograd.grad(truth, leaves, grad.double())
    assert_within_bound_of_torch(["out", "dx", "dA", "dB"], got, base, [truth.detach(), *truth_grads])
    # dx rounded as autograd rounds peft's: the branch's gradient to bf16 first, then its sum with the base's
    assert_rounds_like(got[1], base[1])


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_takes_an_empty_batch(backend):
    """No rows: an empty output, an empty dx, and zero gradients of A and B (nothing to learn from), with dropout."""
    import llm2vec_fast as lf
    device = backend_device(backend)
    x, weight, bias, a, b = layer_inputs(0, 40, 24, 4, dtype=torch.float32, adapter_dtype=torch.float32, seed=12,
                                         device=device)
    leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
    out = lf.lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, bias, dropout_p=0.1, backend=backend)
    assert out.shape == (0, 24)
    dx, da, db = torch.autograd.grad(out.sum(), leaves)
    assert dx.shape == (0, 40) and torch.equal(da, torch.zeros_like(a)) and torch.equal(db, torch.zeros_like(b))


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_reads_strided_rows_where_they_are(backend):
    """x a view whose rows are further apart than its width (a slice of a wider tensor), and a transposed B: the
    output and gradients of contiguous copies."""
    import llm2vec_fast as lf
    device = backend_device(backend)
    x, weight, bias, a, b = layer_inputs(21, 40, 24, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=13,
                                         device=device)
    wide = torch.cat([x, randn(21, 7, seed=14, dtype=torch.bfloat16, device=device)], dim=1)[:, :40]
    b_strided = b.t().contiguous().t()
    assert wide.stride(0) == 47 and b_strided.stride() == (1, 24)

    def run(x, b):
        leaves = [t.clone().requires_grad_(True) if t.is_contiguous() else t.requires_grad_(True) for t in (x, a, b)]
        out = lf.lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, bias, backend=backend)
        return [out] + list(torch.autograd.grad(out.float().square().sum(), leaves))

    for got, want in zip(run(wide.detach(), b_strided.detach()), run(x, b)):
        if backend == "triton":  # the kernels index rows by their stride: the same bits
            assert torch.equal(got, want)
        else:  # a CPU BLAS blocks a transposed operand otherwise: float32 rounding
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_op_skips_dx_where_x_needs_no_gradient(backend, monkeypatch):
    """x without requires_grad (a first layer's input): no gradient of x is computed (the base's g @ W is never
    run), and A's and B's gradients are the bits of a call where x needs one."""
    import llm2vec_fast as lf
    device = backend_device(backend)
    x, weight, bias, a, b = layer_inputs(19, 40, 24, 4, dtype=torch.bfloat16, adapter_dtype=torch.float32, seed=15,
                                         device=device)
    grad = randn(19, 24, seed=16, dtype=torch.bfloat16, device=device)

    def run(x_needs_grad):
        leaves = [x.clone().requires_grad_(x_needs_grad), a.clone().requires_grad_(True),
                  b.clone().requires_grad_(True)]
        torch.manual_seed(3)
        out = lf.lora_linear(leaves[0], weight, leaves[1], leaves[2], 2.0, bias, dropout_p=0.2, backend=backend)
        out.backward(grad)
        return [leaf.grad for leaf in leaves]

    with_dx = run(True)
    products = []
    real_mm = torch.Tensor.mm
    monkeypatch.setattr(torch.Tensor, "mm", lambda self, other: products.append(other.shape) or real_mm(self, other))
    without_dx = run(False)
    monkeypatch.undo()
    assert without_dx[0] is None and with_dx[0] is not None
    assert tuple(weight.shape) not in products  # g @ W (W is (out, in)) was not computed
    assert torch.equal(without_dx[1], with_dx[1]) and torch.equal(without_dx[2], with_dx[2])


def test_op_refuses_bad_arguments_naming_them():
    import llm2vec_fast as lf
    x, weight, bias, a, b = layer_inputs(5, 16, 8, 2, dtype=torch.float32, adapter_dtype=torch.float32, seed=6)
    cases = [
        (dict(x=[1.0]), TypeError, r"x must be a torch.Tensor, got list"),
        (dict(x=torch.tensor(1.0)), ValueError, r"x must be \(..., in_features >= 1\), got shape \(\)"),
        (dict(x=x[:, :0]), ValueError, r"x must be \(..., in_features >= 1\), got shape \(5, 0\)"),
        (dict(x=x.long()), TypeError, r"x must have dtype in .*got int64"),
        (dict(weight=weight[0]), ValueError, r"weight must have 2 dimensions, got shape \(16,\)"),
        (dict(weight=weight.double()), TypeError, r"x must have dtype in|weight must have"),
        (dict(weight=weight.half()), TypeError, r"weight must have the same dtype as x \(float32\), got float16"),
        (dict(weight=weight[:, :15]), ValueError, r"weight must be \(out_features, 16\) .* got \(8, 15\)"),
        (dict(bias=bias[:7]), ValueError, r"bias must be \(8,\), got \(7,\)"),
        (dict(bias=bias.half()), TypeError, r"bias must have the same dtype as x"),
        (dict(lora_a=a[:, :15]), ValueError, r"lora_a must be \(rank >= 1, 16\), got \(2, 15\)"),
        (dict(lora_a=a[:0]), ValueError, r"lora_a must be \(rank >= 1, 16\), got \(0, 16\)"),
        (dict(lora_b=b[:, :1]), ValueError, r"lora_b must be \(8, 2\), got \(8, 1\)"),
        (dict(lora_b=b.half()), TypeError, r"lora_b must have the same dtype as lora_a \(float32\), got float16"),
        (dict(scaling="2"), TypeError, r"scaling must be a number, got str"),
        (dict(scaling=float("inf")), ValueError, r"scaling must be <= 3\.4\d*e\+38, got inf"),
        (dict(scaling=-1e39), ValueError, r"scaling must be >= -3\.4\d*e\+38, got -1e\+39"),
        (dict(scaling=float("nan")), ValueError, r"scaling must be a number, got nan"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be < 1.0, got 1.0"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be >= 0.0, got -0.1"),
        (dict(dropout_p=True), TypeError, r"dropout_p must be a number, got bool"),
        (dict(backend="cuda"), ValueError, r"backend='cuda'.*lora_linear on cpu: \['auto', 'torch'"),
    ]
    for change, error, match in cases:
        arguments = dict(x=x, weight=weight, lora_a=a, lora_b=b, scaling=2.0, bias=bias, dropout_p=0.0)
        backend = change.pop("backend", "auto")
        arguments.update(change)
        with pytest.raises(error, match=match):
            lf.lora_linear(**arguments, backend=backend)


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_opcheck(dropout_p):
    x, weight, bias, a, b = layer_inputs(7, 16, 12, 4, dtype=torch.float32, adapter_dtype=torch.float32, seed=7)
    seed = torch.tensor([5]) if dropout_p else None
    leaves = [t.requires_grad_(True) for t in (x, a, b)]
    ops = torch.ops.llm2vec_fast
    torch.library.opcheck(ops.lora_linear_forward.default,
                          (leaves[0], weight, bias, leaves[1], leaves[2], 2.0, dropout_p, seed, "torch"))
    _, h = ops.lora_linear_forward.default(x.detach(), weight, bias, a.detach(), b.detach(), 2.0, dropout_p, seed,
                                           "torch")
    for need_dx in (True, False):
        torch.library.opcheck(ops.lora_linear_backward.default,
                              (randn(7, 12, seed=8), x.detach(), weight, a.detach(), b.detach(), h, 2.0, dropout_p,
                               seed, "torch", need_dx))


def test_torch_compile_fullgraph():
    import llm2vec_fast as lf
    x, weight, bias, a, b = layer_inputs(7, 16, 12, 4, dtype=torch.float32, adapter_dtype=torch.float32, seed=9)

    def fn(x, a, b):
        return lf.lora_linear(x, weight, a, b, 2.0, bias)

    def run(function):
        leaves = [t.clone().requires_grad_(True) for t in (x, a, b)]
        out = function(*leaves)
        return [out] + list(torch.autograd.grad(out.square().sum(), leaves))

    for got, want in zip(run(torch.compile(fn, fullgraph=True, backend="aot_eager")), run(fn)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# Inside the models: the lean LoRA linears (the fused op with and without gradients)
# ---------------------------------------------------------------------------------------------------
def _model():
    """A bf16 Mistral with a float32 LoRA on its seven projections (peft's autocast), in eval mode."""
    from test_lean import _lora_model
    return _lora_model("mistral", torch.bfloat16, adapter_dtype=torch.float32).eval()


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_lean_lora_linears_run_the_fused_term_where_the_device_is_named(monkeypatch, backend):
    """Encoding a bf16 model with a float32 adapter: with FUSED_BACKENDS naming the device, every LoRA linear adds
    its term through the fused path (the probe passing once), and the output is peft's (bit for bit through the
    torch reference, within bf16 rounding through the kernels), in training mode too (dropout drawn by the op); a
    rank above MAX_RANK keeps the unfused path."""
    from test_models import make_batch

    from llm2vec_fast.models import lean
    model = _model()
    ids, mask = make_batch(seed=3)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).last_hidden_state
    calls = []
    real = lean._fused_lora

    def recording(layer, adapter, x, fuse_dropout=True):
        fused = real(layer, adapter, x, fuse_dropout)
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
        monkeypatch.setattr(lean, "_fused_lora", lambda *args: None)
        with torch.no_grad(), lean.lean_layers(model):
            unfused = model(input_ids=ids, attention_mask=mask).last_hidden_state
        ours, theirs = max_err(fused, truth), max_err(unfused, truth)
        assert not torch.equal(fused, unfused) and ours <= 2 * theirs, (ours, theirs)
        monkeypatch.setattr(lean, "_fused_lora", recording)
    calls.clear()
    model.train()  # LoRA dropout draws: the fused op draws its own masks
    with torch.no_grad(), lean.lean_layers(model):
        model(input_ids=ids, attention_mask=mask)
    assert calls == [True] * len(loras)
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


def _training_grads(model, ids, mask, seed, checkpointed=True):
    from llm2vec_fast.models import forward_packed, lean
    if checkpointed:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with lean.lean_layers(model):
        forward_packed(model, ids, mask).hidden.float().square().mean().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("backend", OP_BACKENDS)
@pytest.mark.parametrize("family", ["mistral", "qwen2"])  # Qwen2: q, k and v have a bias
def test_lean_lora_linears_train_through_the_fused_op(monkeypatch, backend, family):
    """A checkpointed training step of a bf16 model with a float32 LoRA on its seven projections, FUSED_BACKENDS
    naming the device: every LoRA linear runs ``lora_linear`` with gradients. Without dropout the LoRA gradients are
    within 3x the error of peft's own bf16 step against the float32 model (not its bits: two linears that read the
    same x, gate and up, add their gradients of x in another order; one layer is peft's to the bit, above). With
    dropout, the recomputed layers replay their masks (the step without checkpointing, bit for bit) and another
    seed draws other masks."""
    import copy

    from test_lean import _lora_model
    from test_models import make_batch

    from llm2vec_fast.models import lean
    from llm2vec_fast.ops import lora as lora_op
    ids, mask = make_batch(seed=9)
    model = _lora_model(family, torch.bfloat16, dropout=0.0, adapter_dtype=torch.float32)
    truth = _training_grads(copy.deepcopy(model).float(), ids, mask, seed=5)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": backend})  # every fused op of the lean layers
    monkeypatch.setattr(lean, "_PROBES", {})
    real_fused_lora = lean._fused_lora
    monkeypatch.setattr(lean, "_fused_lora", lambda *args: None)
    plain = _training_grads(model, ids, mask, seed=5)  # the other ops fused, peft's LoRA term
    monkeypatch.setattr(lean, "_fused_lora", real_fused_lora)
    calls = []
    real = lora_op.lora_linear
    monkeypatch.setattr(lora_op, "lora_linear", lambda *a, **k: calls.append(torch.is_grad_enabled()) or real(*a, **k))
    fused = _training_grads(model, ids, mask, seed=5)
    loras = [m for m in model.modules() if lean.is_lora_linear(m)]
    assert calls.count(True) >= 2 * len(loras)  # each forward, and again in the checkpointed recompute
    assert sorted(fused) == sorted(plain) and len(plain) == 2 * 7 * 2
    for name in plain:
        assert fused[name].abs().max() > 0, name
        ours, theirs = max_err(fused[name], truth[name]), max_err(plain[name], truth[name])
        assert ours <= 3 * theirs, (name, ours, theirs)
    for module in model.modules():  # now with dropout: each LoRA's torch Dropout(0.2)
        if lean.is_lora_linear(module):
            module.lora_dropout["default"] = torch.nn.Dropout(0.2)
    checkpointed = _training_grads(model, ids, mask, seed=7)
    straight = _training_grads(model, ids, mask, seed=7, checkpointed=False)
    other = _training_grads(model, ids, mask, seed=8)
    assert all(torch.equal(checkpointed[name], straight[name]) for name in plain)
    assert not any(torch.equal(checkpointed[name], other[name]) for name in plain if "lora_A" in name)
