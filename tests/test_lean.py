"""Tests of ``llm2vec_fast.models.lean``: gated MLPs in place without gradients; with gradients, MLPs,
RMSNorms and peft LoRA linears keeping only their inputs and recomputing the rest in the backward.

The claim is "same bits": every path runs the same kernels on the same values as transformers' and
peft's own modules and their autograd backward. The oracle is each module's own forward (tiny random
configs of the real architectures; SiLU for Llama/Mistral/Qwen, tanh-GELU and (1 + w) norms for Gemma).
Memory is what a forward leaves allocated for the backward: the net bytes torch's profiler records
(allocations minus frees) during the forward, the output included.
"""
from __future__ import annotations

import contextlib
import copy
import pickle

import pytest
import torch

from llm2vec_fast.models import bidirectional, lean
from llm2vec_fast.models.lean import (is_gated_mlp, is_lora_linear, is_rms_norm, is_rotary_attention, lean_layers,
                                      lean_mlp_forward)

from test_models import FAMILIES, bi_model, family_state, make_batch
from test_training_contrastive import files  # noqa: F401  (a fixture)


def _mlps(model):
    return [m for m in model.modules() if is_gated_mlp(m)]


def _norms(model):
    return [m for m in model.modules() if is_rms_norm(m)]


def _attention(model):
    return [m for m in model.modules() if is_rotary_attention(m)]


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
        patch.setattr(bidirectional, "lean_layers", lambda body, **options: contextlib.nullcontext())
        with torch.no_grad():
            plain_hidden = model.forward_packed(ids, mask).hidden
    assert counter.calls == model.config.num_hidden_layers
    assert torch.equal(lean_hidden, plain_hidden)
    # Nothing stays on the instances after the forward.
    assert all("forward" not in m.__dict__ for m in _mlps(model))


class _Recomputes:
    """Counts the regions the gradient path hands to the checkpoint, by the function recomputed."""

    def __init__(self, monkeypatch):
        self.names = []
        original = lean._recompute

        def counting(fn, *args, **kwargs):
            self.names.append(getattr(fn, "__name__", type(fn).__name__))
            return original(fn, *args, **kwargs)
        monkeypatch.setattr(lean, "_recompute", counting)


def test_forward_packed_with_gradients_keeps_the_transformers_forward(monkeypatch):
    """Only an enclosing block (the training step's) changes a module with gradients on: a checkpointed
    layer recomputed after forward_packed returned must save what its forward saved."""
    model = bi_model("llama", state=family_state("llama"))
    ids, mask = make_batch(seed=6)
    counter, recomputes = _Counter(monkeypatch), _Recomputes(monkeypatch)
    out = model.forward_packed(ids, mask).hidden
    out.square().sum().backward()
    assert counter.calls == 0 and recomputes.names == []
    with lean_layers(model) as changed:
        assert set(map(id, changed)) == set(map(id, _mlps(model) + _norms(model) + _attention(model)))
        model.forward_packed(ids, mask).hidden.sum().backward()
    layers = model.config.num_hidden_layers
    assert counter.calls == 0
    assert recomputes.names.count("_act_times") == layers and recomputes.names.count("forward") == 2 * layers + 1


RNG_STATE = torch.get_rng_state().numel()  # bytes a region with dropout keeps (the CPU RNG state)


def _held_bytes(fn) -> int:
    """Bytes that ``fn()`` leaves allocated (allocations minus frees during it, on the CPU)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return sum(event.self_cpu_memory_usage for event in prof.key_averages())


def _compare(module, x, grad_out, lean_too=None):
    """(plain, lean) runs of ``module(x)`` with gradients: output, input gradient, parameter gradients and the
    bytes the forward left allocated."""
    runs = []
    for lean_on in (False, True):
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_(True)
        holder = {}

        def forward():
            with lean_layers(lean_too or module) if lean_on else contextlib.nullcontext():
                holder["out"] = module(leaf)
        held = _held_bytes(forward)
        with lean_layers(lean_too or module) if lean_on else contextlib.nullcontext():
            holder["out"].backward(grad_out)
        grads = {name: p.grad for name, p in module.named_parameters() if p.grad is not None}
        runs.append((holder["out"].detach(), leaf.grad, grads, held))
    (out, dx, grads, held), (lean_out, lean_dx, lean_grads, lean_held) = runs
    assert torch.equal(lean_out, out) and torch.equal(lean_dx, dx) and dx.abs().max() > 0
    assert sorted(lean_grads) == sorted(grads)
    for name in grads:
        assert torch.equal(lean_grads[name], grads[name]), name
    return held, lean_held


def _inputs(tokens, width, dtype, seed):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(tokens, width, generator=generator).to(dtype),
            torch.randn(tokens, width, generator=generator).to(dtype))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mlp_with_gradients_same_bits_and_one_buffer_less(family, dtype):
    model = bi_model(family, state=family_state(family)).to(dtype).train()
    mlp = _mlps(model)[0]
    tokens, intermediate = 113, model.config.intermediate_size
    x, grad_out = _inputs(tokens, model.config.hidden_size, dtype, 11)
    held, lean_held = _compare(mlp, x, grad_out)
    buffer = tokens * intermediate * dtype.itemsize
    assert held - lean_held >= buffer - RNG_STATE, (held, lean_held)  # act(gate) is not kept


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("trainable_weight", [False, True], ids=["frozen", "trained"])
def test_norm_with_gradients_same_bits_and_keeps_its_input_only(family, dtype, trainable_weight):
    model = bi_model(family, state=family_state(family)).to(dtype).train()
    tokens, hidden = 113, model.config.hidden_size
    norm = next(n for n in _norms(model) if n.weight.shape[0] == hidden)  # (Qwen3's q_norm comes first)
    norm.weight.requires_grad_(trainable_weight)
    x, grad_out = _inputs(tokens, hidden, dtype, 12)
    held, lean_held = _compare(norm, x, grad_out)
    assert lean_held <= tokens * hidden * dtype.itemsize + RNG_STATE  # the output (and the RNG state)
    if dtype == torch.bfloat16:  # transformers keeps its fp32 upcast of the input
        assert held - lean_held >= tokens * hidden * 4 - RNG_STATE, (held, lean_held)


def _lora_model(family, dtype, dropout=0.1, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"), adapter_dtype=None):
    """A LoRA (r 4) on a random bidirectional model in ``dtype``: in float32 by default (peft's
    autocast_adapter_dtype), so that peft casts each input of a bf16 model up; ``adapter_dtype`` sets it."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(bi_model(family, state=family_state(family)).to(dtype),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=list(targets)))
    torch.manual_seed(4)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: make every LoRA gradient non-zero
            torch.nn.init.normal_(param, std=0.1)
        if "lora_" in name and adapter_dtype is not None:
            param.data = param.data.to(adapter_dtype)
    return model.train()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lora_linear_with_gradients_same_bits_and_keeps_no_dropout_copy(dtype):
    model = _lora_model("mistral", dtype)
    layer = next(m for m in model.modules() if is_lora_linear(m) and m.in_features == model.config.hidden_size)
    tokens, width = 113, layer.in_features
    x, _ = _inputs(tokens, width, dtype, 13)
    grad_out = torch.randn(tokens, layer.out_features, generator=torch.Generator().manual_seed(14)).to(dtype)
    torch.manual_seed(21)  # the dropout mask: both runs draw it from the same state (_compare runs plain first)
    state = torch.get_rng_state()

    class SameMask(torch.nn.Module):  # replays the RNG state before each run, so both draw the same mask
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, value):
            torch.set_rng_state(state)
            return self.inner(value)
    held, lean_held = _compare(SameMask(layer), x, grad_out, lean_too=layer)
    # peft keeps the fp32 copy of x after dropout (4 bytes per element) and the mask (1 byte)
    assert held - lean_held >= tokens * width * 5 - RNG_STATE, (held, lean_held)


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, None)], ids=["bf16-fp32", "bf16", "fp32"])
@pytest.mark.parametrize("dropout_draws", [False, True], ids=["eval", "train"])
def test_lora_linears_without_gradients_same_bits_one_cast_per_input(dtype, adapter_dtype, dropout_draws,
                                                                    monkeypatch):
    """Encoding with an unmerged adapter (no gradients): the lean LoRA linears give the model's output bit for bit
    (in eval mode, and in training mode, where dropout draws: GradCache's first pass), adding the LoRA term in
    place and casting each input once for the linears that read it (q/k/v, gate/up), where peft casts per linear."""
    from peft.tuners.lora.layer import Linear
    model = _lora_model("mistral", dtype, adapter_dtype=adapter_dtype).train(dropout_draws)
    ids, mask = make_batch(seed=3)
    casts = []
    cast_input = Linear._cast_input_dtype

    def counting(self, x, cast_dtype):
        out = cast_input(self, x, cast_dtype)
        casts.append(out is not x)
        return out
    monkeypatch.setattr(Linear, "_cast_input_dtype", counting)

    def run(lean: bool):
        casts.clear()
        torch.manual_seed(7)
        with torch.no_grad(), lean_layers(model) if lean else contextlib.nullcontext():
            out = model(input_ids=ids, attention_mask=mask).last_hidden_state
        return out, sum(casts)
    (plain, plain_casts), (lean, lean_casts) = run(False), run(True)
    assert torch.equal(lean, plain)
    layers = model.config.num_hidden_layers
    if adapter_dtype not in (None, dtype):  # q, k, v | o | gate, up | down: 4 inputs a layer, 7 linears
        assert (plain_casts, lean_casts) == (7 * layers, 4 * layers)
    else:
        assert plain_casts == lean_casts == 0
    if dropout_draws:  # the masks count: another draw gives another output
        torch.manual_seed(8)
        with torch.no_grad(), lean_layers(model):
            assert not torch.equal(model(input_ids=ids, attention_mask=mask).last_hidden_state, plain)


def test_a_shared_cast_is_redone_for_an_input_changed_in_place():
    from llm2vec_fast.models.lean import _SharedCast
    model = _lora_model("llama", torch.bfloat16, adapter_dtype=torch.float32)
    layer = next(m for m in model.modules() if is_lora_linear(m))
    shared = _SharedCast()
    x = torch.randn(5, layer.in_features, dtype=torch.bfloat16)
    first = shared(layer, x, torch.float32)
    assert first.dtype == torch.float32 and shared(layer, x, torch.float32) is first
    x.mul_(2)  # the same tensor, new values
    again = shared(layer, x, torch.float32)
    assert again is not first and torch.equal(again, x.float())
    other = x.clone()
    assert shared(layer, other, torch.float32) is not again
    assert shared(layer, other, torch.bfloat16) is other  # nothing to cast


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, None),
                                                 (torch.bfloat16, torch.float32)], ids=["bf16", "fp32", "bf16-fp32"])
def test_checkpointed_training_step_gives_the_same_gradients(family, dtype, adapter_dtype):
    """A training step under the block, with non-reentrant gradient checkpointing and LoRA (dropout 0.1) on
    every projection (also a float32 LoRA on a bf16 model): the recomputed layers save what their forward saved,
    and every gradient equals the plain step's, bit for bit."""
    from llm2vec_fast.models import forward_packed
    ids, mask = make_batch(seed=9)

    def step(lean_on: bool):
        model = _lora_model(family, dtype, adapter_dtype=adapter_dtype)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(5)
        with lean_layers(model) if lean_on else contextlib.nullcontext():
            forward_packed(model, ids, mask).hidden.float().square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, lean_grads = step(False), step(True)
    assert sorted(plain) == sorted(lean_grads) and len(plain) == 2 * 7 * 2
    for name in plain:
        assert plain[name].abs().max() > 0, name
        assert torch.equal(lean_grads[name], plain[name]), name


def test_the_training_loop_runs_each_step_under_the_block(tmp_path, monkeypatch):
    from test_training_mntp import mntp_config
    from llm2vec_fast.training.loop import Trainer
    from llm2vec_fast.training.mntp import MNTPRecipe
    recomputes = _Recomputes(monkeypatch)
    recipe = MNTPRecipe(mntp_config(str(tmp_path), output_dir=str(tmp_path / "out"), max_steps=2,
                                    save_steps=2, max_train_samples=8))
    Trainer(recipe).train()
    layers = len(_mlps(recipe.model))
    assert layers == 2 and recomputes.names.count("_act_times") >= 2 * layers  # every step (and its recompute)
    assert recomputes.names.count("_lora_branch") >= 2 * 7 * layers  # LoRA on the 7 projections by default
    assert all("forward" not in m.__dict__ for m in recipe.model.modules())
    recomputes.names.clear()
    off = MNTPRecipe(mntp_config(str(tmp_path), output_dir=str(tmp_path / "off"), max_steps=1, save_steps=1,
                                 max_train_samples=8, lean_layers=False))
    Trainer(off).train()
    assert recomputes.names == []  # config key lean_layers: false runs the modules' own forwards


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


def test_only_transformers_attention_mlps_norms_and_peft_lora_linears_are_changed():
    class MyMLP(torch.nn.Module):  # the right attributes, but not transformers' class
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = (torch.nn.Linear(4, 4) for _ in range(3))
            self.act_fn = torch.nn.SiLU()
    mine = MyMLP()
    model = bi_model("gemma", state=family_state("gemma"))
    assert not is_gated_mlp(mine) and not is_gated_mlp(model.layers[0].self_attn)
    assert not is_rms_norm(torch.nn.LayerNorm(4)) and len(_norms(model)) == 2 * model.config.num_hidden_layers + 1
    assert not is_rotary_attention(model.layers[0].mlp) and len(_attention(model)) == model.config.num_hidden_layers
    with lean_layers(torch.nn.ModuleList([mine, model])) as changed:
        assert set(map(id, changed)) == set(map(id, _mlps(model) + _norms(model) + _attention(model)))


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


def test_lora_linears_of_an_unknown_peft_keep_their_forward():
    """A peft LoRA Linear without the attributes whose forward _lora_branch reproduces (an older peft) is left
    as it is."""
    model = _lora_model("llama", torch.float32)
    loras = [m for m in model.modules() if is_lora_linear(m)]
    assert len(loras) == 7 * model.config.num_hidden_layers
    del loras[0].lora_variant  # as in a peft from before LoRA variants
    assert not is_lora_linear(loras[0])
    with lean_layers(model) as changed:
        assert loras[0] not in changed and all(m in changed for m in loras[1:])


def test_grad_cache_with_the_fused_ops_replays_the_full_batch(files, tmp_path, monkeypatch):  # noqa: F811
    """The SimCSE GradCache step (LoRA and attention dropout, masks replayed chunk by chunk) with every fused op
    of the lean layers on (their torch backends, as on a GPU with kernels): the loss and gradients of the full
    batch, and the random numbers one pass draws. The first step's probes must draw none."""
    import weakref

    from test_training_contrastive import test_grad_cache_equals_full_batch_with_dropout as same_as_full_batch

    from llm2vec_fast.ops import rotary

    calls = []
    real = rotary.rotary_embedding
    monkeypatch.setattr(rotary, "rotary_embedding", lambda *args, **kwargs: calls.append(1) or real(*args, **kwargs))
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setattr(lean, "_PROBES", {})
    monkeypatch.setattr(lean, "_ATTENTION_PLANS", weakref.WeakKeyDictionary())
    same_as_full_batch(files, tmp_path)
    assert calls and lean._PROBES and all(lean._PROBES.values())


def test_grad_cache_under_one_block_replays_the_fused_lora_dropout(files, tmp_path, monkeypatch):  # noqa: F811
    """As the training loop runs it, the whole GradCache step inside one ``lean_layers`` block with the fused ops on:
    both passes draw the fused ``lora_linear``'s own dropout masks (from seeds replayed with the RNG state), so the
    loss and gradients are the full batch's (embedded in the same chunks under the same block)."""
    import weakref

    from test_training_contrastive import test_grad_cache_equals_full_batch_with_dropout as same_as_full_batch

    from llm2vec_fast.ops import lora

    drawn = []
    real = lora.lora_linear

    def recording(*args, **kwargs):
        drawn.append(kwargs.get("dropout_p", args[6] if len(args) > 6 else 0.0))
        return real(*args, **kwargs)
    monkeypatch.setattr(lora, "lora_linear", recording)
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setattr(lean, "_PROBES", {})
    monkeypatch.setattr(lean, "_ATTENTION_PLANS", weakref.WeakKeyDictionary())
    same_as_full_batch(files, tmp_path, step_block=lean_layers)
    assert drawn and all(p == 0.1 for p in drawn if p)  # the op ran, with the LoRA's dropout
    assert sum(1 for p in drawn if p) >= len(drawn) // 2


def test_forward_packed_without_gradients_keeps_peft_lora_dropout_where_it_draws(monkeypatch):
    """forward_packed's own block (no gradients) fuses LoRA linears in eval, but keeps peft's term where dropout
    draws, so that a later pass with gradients outside any block draws the same masks; an enclosing training block
    fuses them."""
    from test_models import make_batch

    from llm2vec_fast.models import forward_packed
    from llm2vec_fast.ops import lora
    calls = []
    real = lora.lora_linear
    monkeypatch.setattr(lora, "lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(lean, "FUSED_BACKENDS", {"cpu": "torch"})
    monkeypatch.setattr(lean, "_PROBES", {})
    model = _lora_model("mistral", torch.float32)
    ids, mask = make_batch(seed=3)
    loras = [m for m in model.modules() if is_lora_linear(m)]
    with torch.no_grad():
        forward_packed(model.eval(), ids, mask)  # the first-use probes (the attention probe runs the LoRAs in eval)
        calls.clear()
        forward_packed(model.train(), ids, mask)
        assert calls == []
        with lean_layers(model):
            forward_packed(model, ids, mask)
        assert len(calls) == len(loras)
        forward_packed(model.eval(), ids, mask)
        assert len(calls) == 2 * len(loras)
    model.train()
