"""``llm2vec-fast check``: the installation self-test passes on a correct install and fails on a wrong kernel."""
import pytest
import torch

from llm2vec_fast import check, dispatch
from llm2vec_fast.cli import main

from cuda_support import needs_emulator


def test_check_command_passes_here(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert main(["check", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "backends for flash_attention" in out
    assert out.rstrip().endswith("checks passed") and "FAIL" not in out
    backends = dispatch.available_backends("pool", torch.device("cpu"))
    checked = {line.split()[2] for line in out.splitlines() if line.startswith("ok ")}
    assert checked == ({"triton"} if "triton" in backends else {"torch"})


@pytest.mark.parametrize("op", ["pool", "contrastive_loss", "flash_attention", "rms_norm"])
def test_check_catches_a_wrong_backend(monkeypatch, op):
    """A backend whose forward is off by 1e-3 relative fails (its gradients may too: attention's and the
    loss's backward read the forward's outputs); pooling's correct backward still passes."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if "triton" not in dispatch.available_backends(op, torch.device("cpu")):
        pytest.skip("triton is not importable")
    real = dispatch.implementation(op, "triton")

    def off(*args, **kwargs):
        out = real.forward(*args, **kwargs)
        first = out[0] if isinstance(out, tuple) else out
        first.mul_(1.001)
        return out
    monkeypatch.setitem(dispatch._REGISTRY, (op, "triton"), dispatch.Implementation(off, real.backward))
    results = [r for r in check.run_checks(torch.device("cpu"), backends=["triton"], quick=True) if r.op == op]
    forward = [r for r in results if r.output == "out"]
    assert forward and not any(r.ok for r in forward)
    if op == "pool":
        assert all(r.ok for r in results if r.output != "out")


def test_exact_formulas_agree_with_the_reference():
    """The check's float64 formulas and the torch backend agree (else every bound is meaningless)."""
    results = check.run_checks(torch.device("cpu"), backends=["torch"], quick=True)
    assert results and all(r.error < 1e-4 for r in results)
    assert {r.op for r in results} == set(dispatch.OPS) == set(check.CHECKS)


@pytest.mark.gpu
def test_every_gpu_backend_passes_the_check():
    results = check.run_checks(torch.device("cuda"))
    failed = [line for line, r in zip(check.report(results), results) if not r.ok]
    assert results and not failed, "\n".join(failed)


def test_check_runs_only_the_ops_asked_for(capsys):
    results = check.run_checks(torch.device("cpu"), backends=["torch"], quick=True, ops=["rms_norm", "pool"])
    assert {r.op for r in results} == {"rms_norm", "pool"}
    with pytest.raises(ValueError, match=r"ops must be among .* got \['rmsnorm'\]"):
        check.run_checks(torch.device("cpu"), quick=True, ops=["rmsnorm"])
    assert main(["check", "--quick", "--backend", "torch", "--op", "gated_activation"]) == 0
    out = capsys.readouterr().out
    assert "gated_activation" in out and " rms_norm " not in out


@pytest.mark.emulated_cuda
@needs_emulator
def test_check_runs_the_cuda_row_kernels_in_the_emulator(_cuda_kernels_in_the_emulator):
    """What the device check's first contact (step a4) runs for rms_norm, gated_activation and rotary_embedding:
    the kernels themselves (not a decline to the fallback), on 16-byte vectors, within the checks' bounds."""
    emulated = _cuda_kernels_in_the_emulator
    ops = {"rms_norm", "gated_activation", "rotary_embedding"}
    results = check.run_checks(torch.device("cpu"), backends=["cuda"], quick=True, dtypes=(torch.bfloat16,),
                               ops=sorted(ops))
    assert {r.op for r in results} == ops and all(r.ok for r in results), results
    assert emulated.launches["rms_norm_forward"] and emulated.launches["gated_forward"] and not emulated.declined
    assert emulated.launches["rotary_forward"] and emulated.launches["rotary_backward"]
    assert emulated.last_plan["vec"] == 8


@pytest.mark.parametrize("args, choices", [
    (["--device", "gpu7"], "choose cpu"),
    (["--device", "cuda"], "choose cpu"),
    (["--device", "meta"], "choose cpu"),
    (["--backend", "nosuch"], "choose from 'torch', 'triton', 'cuda', 'flash_attn'"),
    (["--backend", "flash_attn", "--op", "pool"], "choose from torch"),
])
def test_bad_options_are_usage_errors(capsys, monkeypatch, args, choices):
    """An option this machine cannot honour exits 2 with argparse's one line naming the valid choices, not 1 (the
    checks failed), a traceback, or a silent run of nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without a GPU
    with pytest.raises(SystemExit) as exited:
        main(["check", "--quick", *args])
    assert exited.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("llm2vec-fast check: error: argument ") and choices in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
