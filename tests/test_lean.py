"""Tests of ``llm2vec_fast.models.lean``: gated MLPs in place without gradients and saving two buffers with
them; RMSNorms saving their input only and recomputed in the backward.

The claim is "same bits": every path runs the same kernels on the same values as transformers' own
modules and their autograd backward. The oracle is each family's own module forward (tiny random
configs of the real architectures; SiLU for Llama/Mistral/Qwen, tanh-GELU and (1 + w) norms for Gemma).
The one exception is documented in lean.py: in fp32 a norm's input gradient may sum its terms in
another order.
"""
from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch

from llm2vec_fast.models import bidirectional, lean
from llm2vec_fast.models.lean import SiluMul, is_gated_mlp, is_rms_norm, lean_layers, lean_mlp_forward

from test_models import FAMILIES, bi_model, family_state, make_batch


def _mlps(model):
    return [m for m in model.modules() if is_gated_mlp(m)]


def _norms(model):
    return [m for m in model.modules() if is_rms_norm(m)]


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
        patch.setattr(bidirectional, "lean_layers", lambda body: contextlib.nullcontext())
        with torch.no_grad():
            plain_hidden = model.forward_packed(ids, mask).hidden
    assert counter.calls == model.config.num_hidden_layers
    assert torch.equal(lean_hidden, plain_hidden)
    # Nothing stays on the instances after the forward.
    assert all("forward" not in m.__dict__ for m in _mlps(model))


def test_forward_packed_with_gradients_keeps_the_transformers_forward(monkeypatch):
    """Only an enclosing block (the training step's) changes an MLP with gradients on: a checkpointed
    layer recomputed after forward_packed returned must save what its forward saved."""
    model = bi_model("llama", state=family_state("llama"))
    ids, mask = make_batch(seed=6)
    counter = _Counter(monkeypatch)
    calls = []
    original_apply = SiluMul.apply
    monkeypatch.setattr(SiluMul, "apply", lambda *a: calls.append(1) or original_apply(*a))
    out = model.forward_packed(ids, mask).hidden
    out.square().sum().backward()
    assert counter.calls == 0 and calls == []
    with lean_layers(model) as changed:
        assert set(map(id, changed)) == set(map(id, _mlps(model) + _norms(model)))
        model.forward_packed(ids, mask).hidden.sum().backward()
    assert counter.calls == 0 and len(calls) == model.config.num_hidden_layers


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of ``fn()`` (each storage once)."""
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return sum(storages.values())


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_with_gradients_same_bits_and_one_buffer_less_saved(family, dtype):
    model = bi_model(family, state=family_state(family)).to(dtype).train()
    mlp = _mlps(model)[0]
    tokens, intermediate = 113, model.config.intermediate_size
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(tokens, model.config.hidden_size, generator=generator).to(dtype)
    grad_out = torch.randn(tokens, model.config.hidden_size, generator=generator).to(dtype)

    def run(lean: bool):
        mlp.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        holder = {}

        def forward():
            with lean_layers(mlp) if lean else contextlib.nullcontext():
                holder["out"] = mlp(leaf)
        saved = _saved_bytes(forward)
        holder["out"].backward(grad_out)
        grads = [leaf.grad] + [p.grad for p in mlp.parameters()]
        return holder["out"].detach(), grads, saved

    plain_out, plain_grads, plain_saved = run(False)
    lean_out, lean_grads, lean_saved = run(True)
    assert torch.equal(lean_out, plain_out)
    for got, want in zip(lean_grads, plain_grads):
        assert torch.equal(got, want) and want.abs().max() > 0
    buffer = tokens * intermediate * dtype.itemsize
    assert plain_saved - lean_saved == buffer, (plain_saved, lean_saved, buffer)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_checkpointed_training_step_gives_the_same_gradients(family, dtype):
    """A training step under the block, with non-reentrant gradient checkpointing and LoRA dropout:
    the recomputed layers save what their forward saved, and every gradient equals the plain step's
    (bit for bit in bf16; in fp32 a norm's input gradient may add its terms in another order)."""
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast.models import forward_packed
    ids, mask = make_batch(seed=9)

    def step(lean: bool):
        model = bi_model(family, state=family_state(family)).to(dtype)
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                                 target_modules=["gate_proj", "up_proj", "down_proj", "q_proj"]))
        torch.manual_seed(4)
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: make every LoRA gradient non-zero
                torch.nn.init.normal_(param, std=0.1)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(5)
        with lean_layers(model) if lean else contextlib.nullcontext():
            forward_packed(model, ids, mask).hidden.float().square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, lean_grads = step(False), step(True)
    assert sorted(plain) == sorted(lean_grads) and plain
    for name in plain:
        assert plain[name].abs().max() > 0, name
        if dtype == torch.bfloat16:
            assert torch.equal(lean_grads[name], plain[name]), name
        else:
            torch.testing.assert_close(lean_grads[name], plain[name], rtol=1e-5, atol=1e-5 * plain[name].abs().max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("trainable_weight", [False, True], ids=["frozen", "trained"])
def test_recomputed_norm_same_bits_and_saves_its_input_only(family, trainable_weight):
    model = bi_model(family, state=family_state(family)).to(torch.bfloat16).train()
    tokens, hidden = 113, model.config.hidden_size
    norm = next(n for n in _norms(model) if n.weight.shape[0] == hidden)  # (Qwen3's q_norm comes first)
    norm.weight.requires_grad_(trainable_weight)
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)
    grad_out = torch.randn(tokens, hidden, generator=generator).to(torch.bfloat16)

    def run(lean: bool):
        norm.weight.grad = None
        leaf = x.clone().requires_grad_(True)
        holder = {}

        def forward():
            with lean_layers(norm) if lean else contextlib.nullcontext():
                holder["out"] = norm(leaf)
        saved = _saved_bytes(forward)
        holder["out"].backward(grad_out)
        return holder["out"].detach(), leaf.grad, norm.weight.grad, saved

    plain_out, plain_dx, plain_dw, plain_saved = run(False)
    lean_out, lean_dx, lean_dw, lean_saved = run(True)
    assert torch.equal(lean_out, plain_out) and torch.equal(lean_dx, plain_dx) and plain_dx.abs().max() > 0
    if trainable_weight:
        assert torch.equal(lean_dw, plain_dw) and plain_dw.abs().max() > 0
    else:
        assert lean_dw is None and plain_dw is None
    assert lean_saved == tokens * hidden * 2  # the bf16 input
    # transformers: its fp32 upcast, and the bf16 normalised input when the weight trains
    assert plain_saved >= tokens * hidden * (6 if trainable_weight else 4)


def test_the_training_loop_runs_each_step_under_the_block(tmp_path, monkeypatch):
    from test_training_mntp import mntp_config
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    calls = []
    original_apply = SiluMul.apply
    monkeypatch.setattr(SiluMul, "apply", lambda *a: calls.append(1) or original_apply(*a))
    recipe = MNTPRecipe(mntp_config(str(tmp_path), output_dir=str(tmp_path / "out"), max_steps=2,
                                    save_steps=2, max_train_samples=8))
    Trainer(recipe).train()
    layers = len(_mlps(recipe.model))
    assert layers == 2 and len(calls) >= 2 * layers  # every step's forward (and its recompute under checkpointing)
    assert all("forward" not in m.__dict__ for m in recipe.model.modules())


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
        with lean_layers(model) as changed:
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


def test_only_transformers_mlps_and_norms_are_changed():
    class MyMLP(torch.nn.Module):  # the right attributes, but not transformers' class
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()
    mine = MyMLP()
    model = bi_model("gemma", state=family_state("gemma"))
    assert not is_gated_mlp(mine) and not is_gated_mlp(model.layers[0].self_attn)
    assert not is_rms_norm(torch.nn.LayerNorm(4)) and len(_norms(model)) == 2 * model.config.num_hidden_layers + 1
    with lean_layers(torch.nn.ModuleList([mine, model])) as changed:
        assert set(map(id, changed)) == set(map(id, _mlps(model) + _norms(model)))


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
            forward()  # warm-up: cuBLAS workspaces are allocated on first use, not counted below
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            out = forward()
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - base)
            del out
    buffer = 8192 * model.config.intermediate_size * 2  # one (T, intermediate) bf16 buffer
    assert peaks[1] <= peaks[0] - buffer, peaks  # transformers holds three at its peak, the in-place forward two
