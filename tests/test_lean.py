"""Tests of ``llm2vec_fast.models.lean``: gated MLPs computed in place inside the packed inference forward.

The claim is "same bits": the in-place forward runs the same elementwise kernels on the same values as
transformers' ``down(act(gate(x)) * up(x))``. The oracle is each family's own MLP forward (tiny random
configs of the real architectures; SiLU for Llama/Mistral/Qwen, tanh-GELU for Gemma).
"""
from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch

from llm2vec_fast.models import bidirectional, lean
from llm2vec_fast.models.lean import is_gated_mlp, lean_mlp_forward, lean_mlps

from test_models import FAMILIES, bi_model, family_state, make_batch


def _mlps(model):
    return [m for m in model.modules() if is_gated_mlp(m)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_in_place_mlp_is_bitwise_the_family_forward(family, dtype):
    model = bi_model(family, state=family_state(family)).to(dtype)
    mlps = _mlps(model)
    assert len(mlps) == model.config.num_hidden_layers
    x = torch.randn(113, model.config.hidden_size, generator=torch.Generator().manual_seed(3)).to(dtype)
    with torch.no_grad():
        for mlp in mlps:
            expected = type(mlp).forward(mlp, x)
            got = lean_mlp_forward(mlp, x)
            assert got.dtype == expected.dtype and torch.equal(got, expected)
            assert expected.abs().max() > 0


class _Counter:
    def __init__(self, monkeypatch):
        self.calls = 0
        original = lean.lean_mlp_forward

        def counting(mlp, x):
            self.calls += 1
            return original(mlp, x)
        monkeypatch.setattr(lean, "lean_mlp_forward", counting)


@pytest.mark.parametrize("family", FAMILIES)
def test_forward_packed_uses_it_without_gradients_and_changes_no_bit(family, monkeypatch):
    model = bi_model(family, state=family_state(family))
    ids, mask = make_batch(seed=5)
    counter = _Counter(monkeypatch)
    with torch.no_grad():
        lean_hidden = model.forward_packed(ids, mask).hidden
    assert counter.calls == model.config.num_hidden_layers
    with monkeypatch.context() as patch:  # the same forward with transformers' MLPs
        patch.setattr(bidirectional, "lean_mlps", lambda body: contextlib.nullcontext())
        with torch.no_grad():
            plain_hidden = model.forward_packed(ids, mask).hidden
    assert counter.calls == model.config.num_hidden_layers
    assert torch.equal(lean_hidden, plain_hidden)
    # Nothing stays on the instances after the forward.
    assert all("forward" not in m.__dict__ for m in _mlps(model))


def test_gradients_keep_the_transformers_forward(monkeypatch):
    model = bi_model("llama", state=family_state("llama"))
    ids, mask = make_batch(seed=6)
    counter = _Counter(monkeypatch)
    out = model.forward_packed(ids, mask).hidden
    out.square().sum().backward()
    assert counter.calls == 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with torch.no_grad(), lean_mlps(model) as changed:  # inside the block, grad mode still decides
        assert len(changed) == model.config.num_hidden_layers
        with torch.enable_grad():
            model.forward_packed(ids, mask)
    assert counter.calls == 0


def test_a_hooked_mlp_keeps_its_buffers_intact(monkeypatch):
    """A hook on the activation must see act(gate(x)), not a buffer later multiplied in place."""
    model = bi_model("mistral", state=family_state("mistral"))
    first, second = _mlps(model)
    seen = []
    first.act_fn.register_forward_hook(lambda module, args, output: seen.append((args[0].clone(), output)))
    counter = _Counter(monkeypatch)
    ids, mask = make_batch(seed=7)
    with torch.no_grad():
        model.forward_packed(ids, mask)
    assert counter.calls == 1  # only the un-hooked MLP ran in place
    (gate, activated), = seen
    assert torch.equal(activated, torch.nn.functional.silu(gate))


def test_the_block_restores_the_modules_after_an_error():
    model = bi_model("qwen3", state=family_state("qwen3"))
    with pytest.raises(RuntimeError, match="stop"):
        with lean_mlps(model) as changed:
            assert all("forward" in m.__dict__ for m in changed)
            raise RuntimeError("stop")
    assert all("forward" not in m.__dict__ for m in _mlps(model))
    clone = copy.deepcopy(model)  # the modules copy and pickle as plain transformers modules
    restored = pickle.loads(pickle.dumps(model))
    ids, mask = make_batch(seed=8)
    with torch.no_grad():
        expected = model.forward_packed(ids, mask).hidden
        assert torch.equal(clone.forward_packed(ids, mask).hidden, expected)
        assert torch.equal(restored.forward_packed(ids, mask).hidden, expected)


def test_only_gated_mlps_of_transformers_are_changed():
    class MyMLP(torch.nn.Module):  # the right attributes, but not transformers' class
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()
    mine = MyMLP()
    model = bi_model("gemma", state=family_state("gemma"))
    assert not is_gated_mlp(mine) and not is_gated_mlp(model.layers[0].self_attn)
    with lean_mlps(torch.nn.ModuleList([mine, model])) as changed:
        assert set(map(id, changed)) == set(map(id, _mlps(model)))


@pytest.mark.gpu
def test_in_place_mlp_lowers_peak_memory_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    model = bi_model("mistral", state=family_state("mistral")).to("cuda", torch.bfloat16)
    mlp = _mlps(model)[0]
    x = torch.randn(8192, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    peaks = []
    for forward in (lambda: type(mlp).forward(mlp, x), lambda: lean_mlp_forward(mlp, x)):
        with torch.no_grad():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = forward()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            del out
    buffer = 8192 * model.config.intermediate_size * 2
    assert peaks[1] <= peaks[0] - buffer, peaks
