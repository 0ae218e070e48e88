"""Tests of ``llm2vec_fast.dispatch``: resolving "auto", refusing backends that cannot run (naming the
ones that can), AUTO_TABLE fallback on a (simulated) CUDA device, and registering a backend."""
from __future__ import annotations

import pytest
import torch

import llm2vec_fast as lf
from llm2vec_fast import dispatch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a device object only: nothing is allocated on it


_ORIGINAL_REGISTRY = {}
_ORIGINAL_AUTO_TABLE = dict(dispatch.AUTO_TABLE)


@pytest.fixture
def registry(monkeypatch):
    """A private, bare registry (the torch reference of every op only) and an empty AUTO_TABLE, so that
    the dispatch rules are tested whatever kernels the package registers; restored after the test."""
    dispatch._load_backends()
    saved = dict(dispatch._REGISTRY)
    if not _ORIGINAL_REGISTRY:
        _ORIGINAL_REGISTRY.update(saved)
    bare = {key: impl for key, impl in saved.items() if key[1] == "torch"}
    monkeypatch.setattr(dispatch, "_REGISTRY", bare)
    monkeypatch.setattr(dispatch, "AUTO_TABLE", {})
    yield bare


@pytest.fixture(autouse=True)
def no_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_reference_registered_for_every_op():
    for op in dispatch.OPS:
        assert "torch" in dispatch.available_backends(op, CPU)
        impl = dispatch.implementation(op, "torch")
        assert callable(impl.forward) and callable(impl.backward)


@pytest.mark.parametrize("op", dispatch.OPS)
def test_auto_is_torch_on_cpu(op, registry, monkeypatch):
    assert dispatch.resolve(op, "auto", CPU) == "torch"
    # Even with an accelerated backend registered and runnable on the CPU (interpreter), and a table
    # entry naming it: on the CPU "auto" means torch.
    dispatch.register(op, "triton", lambda *a: None, lambda *a: None)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setitem(dispatch.AUTO_TABLE, op, "triton")
    assert "triton" in dispatch.available_backends(op, CPU)
    assert dispatch.resolve(op, "auto", CPU) == "torch"
    assert dispatch.resolve(op, "triton", CPU) == "triton"


def test_auto_on_cpu_through_public_ops(monkeypatch):
    calls = []
    real = dispatch.resolve

    def spy(op, backend, device):
        chosen = real(op, backend, device)
        calls.append((op, backend, chosen))
        return chosen

    monkeypatch.setattr(dispatch, "resolve", spy)
    g = torch.Generator().manual_seed(0)
    lf.pool(torch.randn(2, 3, 8, generator=g))
    lf.contrastive_loss(torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g))
    assert calls == [("pool", "auto", "torch"), ("contrastive_loss", "auto", "torch")]


@pytest.mark.parametrize("op", dispatch.OPS)
@pytest.mark.parametrize("backend", ("nope", "Torch", "", "AUTO"))
def test_unknown_backend_names_available(op, backend):
    with pytest.raises(ValueError, match=rf"backend={backend!r}: unknown backend.*\['auto', 'torch'\]"):
        dispatch.resolve(op, backend, CPU)


@pytest.mark.parametrize("backend", (None, 1, ["torch"]))
def test_backend_not_a_string(backend):
    with pytest.raises(TypeError, match=r"backend must be a str.*" + type(backend).__name__):
        dispatch.resolve("pool", backend, CPU)


@pytest.mark.parametrize("op", dispatch.OPS)
@pytest.mark.parametrize("backend", ("cuda", "flash_attn", "triton"))
def test_unavailable_backend_on_cpu(op, backend):
    with pytest.raises(ValueError, match=rf"backend={backend!r}: backend cannot run {op} on cpu.*"
                                          rf"available backends for {op} on cpu: \['auto', 'torch'\]"):
        dispatch.resolve(op, backend, CPU)


def test_triton_on_cpu_hint_and_interpreter(registry, monkeypatch):
    dispatch.register("pool", "triton", lambda *a: None, lambda *a: None)
    with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*\['auto', 'torch'\]"):
        dispatch.resolve("pool", "triton", CPU)
    for off in ("0", ""):
        monkeypatch.setenv("TRITON_INTERPRET", off)
        with pytest.raises(ValueError, match=r"backend='triton'"):
            dispatch.resolve("pool", "triton", CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch.resolve("pool", "triton", CPU) == "triton"
    assert dispatch.available_backends("pool", CPU) == ["torch", "triton"]
    # Registered for pool only: the other ops still refuse it.
    with pytest.raises(ValueError, match=r"contrastive_loss on cpu: \['auto', 'torch'\]"):
        dispatch.resolve("contrastive_loss", "triton", CPU)


def _extension_not_built(monkeypatch):
    """Simulates a checkout without llm2vec_fast._C (a developer may have built it in place)."""
    importable = dispatch._importable
    monkeypatch.setattr(dispatch, "_importable", lambda module: module != "llm2vec_fast._C" and importable(module))


def test_cuda_backend_not_built_hint(registry, monkeypatch):
    """A registered cuda backend on a CUDA device whose extension is not built: the hint says so."""
    _extension_not_built(monkeypatch)
    assert not dispatch._backend_runs_on("cuda", CUDA)
    dispatch.register("contrastive_loss", "cuda", lambda *a: None, lambda *a: None)
    with pytest.raises(ValueError, match=r"llm2vec_fast\._C is not built.*on cuda: \['auto', 'torch'\]"):
        dispatch.resolve("contrastive_loss", "cuda", CUDA)


# ---------------------------------------------------------------------------------------------------
# "auto" on a simulated CUDA device: AUTO_TABLE first, then triton, then torch.
# ---------------------------------------------------------------------------------------------------
def test_auto_on_cuda_falls_back_to_torch_without_kernels(registry, monkeypatch):
    for op in dispatch.OPS:
        assert dispatch.resolve(op, "auto", CUDA) == "torch"
    monkeypatch.setitem(dispatch.AUTO_TABLE, "pool", "cuda")  # measured fastest, but not built
    assert dispatch.resolve("pool", "auto", CUDA) == "torch"
    monkeypatch.setitem(dispatch.AUTO_TABLE, "pool", "flash_attn")  # not even registered for pool
    assert dispatch.resolve("pool", "auto", CUDA) == "torch"


def test_auto_on_cuda_falls_back_to_triton(registry, monkeypatch):
    runs = {"torch": True, "triton": True, "cuda": False, "flash_attn": False}
    monkeypatch.setattr(dispatch, "_backend_runs_on", lambda backend, device: runs[backend])
    noop = lambda *a: None  # noqa: E731
    dispatch.register("pool", "triton", noop, noop)
    dispatch.register("pool", "cuda", noop, noop)
    assert dispatch.resolve("pool", "auto", CUDA) == "triton"  # no table entry: triton
    monkeypatch.setitem(dispatch.AUTO_TABLE, "pool", "cuda")  # table names a backend that cannot run
    assert dispatch.resolve("pool", "auto", CUDA) == "triton"
    runs["cuda"] = True  # now it can: the table wins
    assert dispatch.resolve("pool", "auto", CUDA) == "cuda"
    runs["triton"] = runs["cuda"] = False
    assert dispatch.resolve("pool", "auto", CUDA) == "torch"
    # Explicit requests are refused with the runnable list.
    with pytest.raises(ValueError, match=r"backend='cuda'.*on cuda: \['auto', 'torch'\]"):
        dispatch.resolve("pool", "cuda", CUDA)


def test_auto_passes_over_backends_that_cannot_take_the_call(registry, monkeypatch):
    """flash_attn cannot replay dropout: with dropout_p > 0, "auto" takes the next choice even where the
    table names flash_attn; an explicit request is not redirected."""
    monkeypatch.setattr(dispatch, "_backend_runs_on", lambda backend, device: True)
    noop = lambda *a: None  # noqa: E731
    for backend in ("triton", "flash_attn"):
        dispatch.register("flash_attention", backend, noop, noop)
    monkeypatch.setitem(dispatch.AUTO_TABLE, "flash_attention", "flash_attn")
    assert dispatch.resolve("flash_attention", "auto", CUDA) == "flash_attn"
    assert dispatch.resolve("flash_attention", "auto", CUDA, cannot=("flash_attn",)) == "triton"
    assert dispatch.resolve("flash_attention", "flash_attn", CUDA, cannot=("flash_attn",)) == "flash_attn"
    seen = []
    monkeypatch.setattr(dispatch, "resolve", lambda op, backend, device, cannot=(): seen.append(cannot) or "torch")
    import llm2vec_fast as lf
    q = torch.randn(5, 2, 64)
    lf.flash_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5, dropout_p=0.1)
    lf.flash_attention(q, q, q, torch.tensor([0, 5], dtype=torch.int32), 5)
    assert seen == [("flash_attn",), ()]


def test_real_registry_auto_on_cuda(monkeypatch):
    """With the package's own registrations: "auto" on a CUDA device takes the AUTO_TABLE entry, else
    triton where a Triton kernel is registered, else torch; on the CPU always torch."""
    _extension_not_built(monkeypatch)
    monkeypatch.setattr(dispatch, "AUTO_TABLE", {})
    dispatch._load_backends()
    for op in dispatch.OPS:
        expected = "triton" if ((op, "triton") in dispatch._REGISTRY and dispatch._importable("triton")) else "torch"
        assert dispatch.resolve(op, "auto", CUDA) == expected
        assert dispatch.resolve(op, "auto", CPU) == "torch"
        monkeypatch.setitem(dispatch.AUTO_TABLE, op, "cuda")  # measured fastest but not built here
        assert dispatch.resolve(op, "auto", CUDA) == expected


def test_real_registry_triton_needs_interpreter_on_cpu(monkeypatch):
    dispatch._load_backends()
    ops = [op for op in dispatch.OPS if (op, "triton") in dispatch._REGISTRY]
    if not ops:
        pytest.skip("no Triton kernel registered")
    for op in ops:
        with pytest.raises(ValueError, match=r"TRITON_INTERPRET=1.*\['auto', 'torch'\]"):
            dispatch.resolve(op, "triton", CPU)
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert dispatch.resolve(op, "triton", CPU) == "triton"
        assert "triton" in dispatch.available_backends(op, CPU)
        monkeypatch.delenv("TRITON_INTERPRET")


def test_backend_runs_on():
    assert dispatch._backend_runs_on("torch", CPU) and dispatch._backend_runs_on("torch", CUDA)
    assert not dispatch._backend_runs_on("triton", CPU)
    assert not dispatch._backend_runs_on("flash_attn", CPU)
    assert not dispatch._backend_runs_on("cuda", CPU)
    assert not dispatch._backend_runs_on("nope", CUDA)


def test_backend_runs_on_triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert dispatch._backend_runs_on("triton", CPU) == dispatch._importable("triton")
    assert not dispatch._backend_runs_on("triton", torch.device("meta"))


# ---------------------------------------------------------------------------------------------------
# Registering a backend makes it selectable, and the public ops call it.
# ---------------------------------------------------------------------------------------------------
def test_registered_backend_is_called_by_pool(registry, monkeypatch):
    calls = []
    reference = dispatch.implementation("pool", "torch")

    def forward(*args):
        calls.append("forward")
        return reference.forward(*args) + 1.0  # visibly different from the reference

    def backward(*args):
        calls.append("backward")
        return reference.backward(*args) * 2.0

    dispatch.register("pool", "triton", forward, backward)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 5, 8, generator=g)
    h1, h2 = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    out_fake = lf.pool(h1, mode="mean", backend="triton")
    out_ref = lf.pool(h2, mode="mean", backend="torch")
    assert calls == ["forward"]
    torch.testing.assert_close(out_fake, out_ref + 1.0)
    out_fake.sum().backward()
    out_ref.sum().backward()
    assert calls == ["forward", "backward"]
    torch.testing.assert_close(h1.grad, 2.0 * h2.grad)


def test_registered_backend_is_called_by_contrastive_loss(registry, monkeypatch):
    calls = []
    reference = dispatch.implementation("contrastive_loss", "torch")

    def forward(anchors, candidates, label_offset, scale):
        calls.append(("forward", anchors.shape[0], candidates.shape[0], label_offset, scale))
        return reference.forward(anchors, candidates, label_offset, scale)

    def backward(grad_rows, anchors, candidates, lse, label_offset, scale):
        calls.append(("backward", anchors.shape[0], candidates.shape[0], label_offset, scale))
        return reference.backward(grad_rows, anchors, candidates, lse, label_offset, scale)

    dispatch.register("contrastive_loss", "triton", forward, backward)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(2)
    q, d_pos, d_neg = (torch.randn(n, 8, generator=g).requires_grad_(True) for n in (3, 3, 4))
    loss = lf.contrastive_loss(q, d_pos, d_neg, scale=50.0, symmetric=True, backend="triton")
    loss.backward()
    assert sorted(calls) == sorted([("forward", 3, 7, 0, 50.0), ("forward", 3, 3, 0, 50.0),
                                    ("backward", 3, 7, 0, 50.0), ("backward", 3, 3, 0, 50.0)])
    ref = lf.contrastive_loss(q.detach(), d_pos.detach(), d_neg.detach(), scale=50.0, symmetric=True)
    torch.testing.assert_close(loss.detach(), ref)


@pytest.mark.parametrize("op, backend, match", [
    ("attention", "torch", r"op must be one of .*got 'attention'"),
    ("Pool", "torch", r"op must be one of .*got 'Pool'"),
    ("pool", "auto", r"backend must be one of .*got 'auto'"),
    ("pool", "cutlass", r"backend must be one of .*got 'cutlass'"),
])
def test_register_rejects_unknown_names(registry, op, backend, match):
    before = dict(registry)
    with pytest.raises(ValueError, match=match):
        dispatch.register(op, backend, lambda *a: None, lambda *a: None)
    assert dispatch._REGISTRY == before


def test_registry_restored_after_registering():
    """Runs after the tests above (file order): none of their fake backends or table entries leaked."""
    assert _ORIGINAL_REGISTRY, "the registry fixture ran earlier in this file"
    assert dispatch._REGISTRY == _ORIGINAL_REGISTRY
    assert dispatch.AUTO_TABLE == _ORIGINAL_AUTO_TABLE


def test_resolving_a_backend_never_looks_up_modules(monkeypatch):
    """Under torch.compile, dynamo of torch 2.11 (the GPU machine's) refuses to trace importlib's
    find_spec: resolving per call must only read what was looked up at import, for every op, backend
    and device."""
    import importlib.util

    def refuse(*args, **kwargs):
        raise AssertionError("find_spec called while resolving a backend")

    dispatch._load_backends()
    monkeypatch.setattr(importlib.util, "find_spec", refuse)
    for op in dispatch.OPS:
        for device in (CPU, CUDA):
            dispatch.resolve(op, "auto", device)
            for backend in dispatch.BACKENDS:
                dispatch._backend_runs_on(backend, device)
