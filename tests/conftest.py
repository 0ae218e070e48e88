"""Shared pytest configuration."""
import signal
import threading

import pytest
import torch


def pytest_configure(config):
    """SIGTERM ends the session as Ctrl-C does: the failures so far, the short summary and the junit file are still
    written. The device check runs the GPU tests under ``timeout`` (SIGTERM), where a plain kill would leave only the
    progress dots of a one-off GPU run. A handler someone else installed is left alone."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, signal.default_int_handler)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (registered in pyproject.toml) are skipped where no CUDA GPU is present."""
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionstart(session):
    """Load the kernel modules once, under the run's own TRITON_INTERPRET: triton.jit picks the interpreter or
    the GPU compiler when a kernel is defined, so a test that clears the variable (to check dispatch without the
    interpreter) must not be the one that first imports them, or every later test gets GPU-only kernels."""
    from llm2vec_fast import dispatch

    dispatch._load_backends()


@pytest.fixture(autouse=True)
def _cuda_kernels_in_the_emulator(request, monkeypatch):
    """Tests marked ``emulated_cuda`` run ``backend="cuda"`` on CPU tensors: the kernels of csrc/ in the CPU
    emulator, behind the extension's interface (tests/cuda_support.py); yields that emulated extension."""
    if request.node.get_closest_marker("emulated_cuda") is None:
        yield None
        return
    from cuda_support import run_cuda_backend_in_the_emulator

    yield run_cuda_backend_in_the_emulator(monkeypatch)


FUSED_ON_CPU_ENV = "LLM2VEC_FAST_TEST_FUSED_CPU"


@pytest.fixture(autouse=True)
def _fused_ops_on_the_cpu(monkeypatch):
    """With LLM2VEC_FAST_TEST_FUSED_CPU=<backend> (torch or triton), the lean layers run their fused ops (rms_norm,
    gated_activation, rotary_embedding) on CPU tensors with that backend, as they do on a GPU: CI reruns the
    encoder, model and training suites this way, so that the GPU's code path (the probes included) is tested
    here. The fused backward rounds once where autograd rounds each step, so tests that compare lean gradients
    with transformers' to the bit are not part of that rerun."""
    import os

    backend = os.environ.get(FUSED_ON_CPU_ENV, "").strip()
    if backend:
        from llm2vec_fast.models import lean
        monkeypatch.setattr(lean, "FUSED_BACKENDS", {**lean.FUSED_BACKENDS, "cpu": backend})
    yield
