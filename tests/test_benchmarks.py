"""The benchmark suite's own checks (CPU): the quick run writes DESIGN.md's results schema plus the .md and
.png next to it, and ``benchmarks/device_check.sh --dry-run`` goes through every step and exits 0."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

META_TYPES = {"device": (str,), "gpu_name": (str, type(None)), "torch": (str,), "triton": (str, type(None)),
              "cuda": (str, type(None)), "commit": (str,), "date": (str,), "rows": (list,)}
ROW_TYPES = {"op": (str,), "impl": (str,), "shape": (str,), "dtype": (str,), "ms": (float, int),
             "tflops": (float, int, type(None)), "gbps": (float, int, type(None)),
             "peak_mem_mb": (float, int, type(None))}
OPS = ("attention_fwd", "attention_bwd", "pool", "contrastive_loss_fwd", "contrastive_loss_fwd_bwd", "rms_norm",
       "rms_norm_fwd_bwd", "gated_activation", "gated_activation_fwd_bwd", "rotary_embedding",
       "rotary_embedding_fwd_bwd", "lora_linear", "lora_linear_fwd_bwd")
OURS = {"torch", "triton", "cuda", "llm2vec_fast_lean"}


def check_results(data: dict) -> None:
    assert set(data) == set(META_TYPES), f"top-level keys {sorted(data)}"
    for key, types in META_TYPES.items():
        assert isinstance(data[key], types), f"{key}={data[key]!r} is not {types}"
    assert data["device"] in ("cpu", "cuda")
    assert (data["gpu_name"] is None) == (data["device"] == "cpu")
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", data["date"])
    assert data["commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{7,64}", data["commit"])
    assert data["rows"], "no rows"
    for row in data["rows"]:
        assert set(row) == set(ROW_TYPES), f"row keys {sorted(row)}"
        for key, types in ROW_TYPES.items():
            assert isinstance(row[key], types) and not isinstance(row[key], bool), f"{key}={row[key]!r} in {row}"
        assert row["dtype"] in ("bf16", "fp16", "fp32")
        assert row["ms"] > 0
        if row["op"].startswith(("attention", "contrastive_loss")):
            assert row["tflops"] is not None and row["tflops"] > 0, row
        if row["op"] in ("pool", "rms_norm", "rms_norm_fwd_bwd", "gated_activation", "gated_activation_fwd_bwd",
                         "rotary_embedding", "rotary_embedding_fwd_bwd", "lora_linear", "lora_linear_fwd_bwd",
                         "lora_linear_base"):
            assert row["gbps"] is not None and row["gbps"] > 0, row
    for op in OPS:
        impls = {row["impl"] for row in data["rows"] if row["op"] == op}
        assert impls & OURS, f"{op}: none of our impls in {impls}"
        assert impls - OURS, f"{op}: no baseline in {impls}"
    windowed = {row["impl"] for row in data["rows"] if row["op"] == "attention_fwd" and "window=" in row["shape"]}
    assert windowed & OURS and windowed - OURS, f"sliding-window attention: ours and a baseline, got {windowed}"


def check_files(out_dir: str) -> dict:
    (json_path,) = glob.glob(os.path.join(out_dir, "*.json"))
    stem = json_path[:-len(".json")]
    assert re.fullmatch(r"cpu-\d{4}-\d{2}-\d{2}-([0-9a-f]{7}|unknown)-quick", os.path.basename(stem)), stem
    assert os.path.getsize(stem + ".png") > 10_000
    with open(stem + ".md") as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    assert "| op | shape | dtype | impl | ms |" in "\n".join(lines)
    assert lines[-1].startswith("| ")  # the table is last
    with open(json_path) as f:
        return json.load(f)


def test_execution_order_puts_the_named_ops_first():
    from benchmarks import run
    every = list(run.SUITES)
    assert run.execution_order(every) == list(run.EXECUTION_ORDER)  # cheapest first
    assert run.execution_order(every, ["encode", "train"]) == ["encode", "train", "pool", "fused", "loss", "model",
                                                                "attention"]
    assert run.execution_order(["pool", "attention"], ["train", "attention"]) == ["attention", "pool"]
    with pytest.raises(ValueError, match="unknown ops"):
        run.run_suite(quick=True, ops=["pool"], first=["nope"], device="cpu")


def test_quick_run_writes_the_results_schema(tmp_path):
    from benchmarks import run

    result = run.run_suite(quick=True, out=str(tmp_path), device="cpu")
    assert not result["interrupted"]
    data = check_files(str(tmp_path))
    check_results(data)
    assert data == json.loads(json.dumps(result["results"]))
    assert data["device"] == "cpu"
    # every row of the markdown table is a row of the JSON
    assert result["markdown"].count("\n| ") == len(data["rows"]) + 1


def test_results_writer_without_rows_on_cpu_is_still_valid_json(tmp_path):
    import torch
    from benchmarks import harness

    meta = harness.environment(torch.device("cpu"))
    paths = harness.write_results(meta, [], str(tmp_path), quick=True)
    with open(paths["json"]) as f:
        data = json.load(f)
    assert set(data) == set(META_TYPES) and data["rows"] == []
    assert "png" not in paths


def test_device_check_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("DRY_RUN", None)
    proc = subprocess.run(["bash", "benchmarks/device_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert "(b) pytest -m gpu: ok" in proc.stdout
    assert "(c) benchmarks: ok" in proc.stdout
    check_results(check_files(str(tmp_path)))
    assert os.path.exists(os.path.join(tmp_path, "device_check.log"))
    tail = [line for line in proc.stdout.splitlines() if line.strip()]
    assert tail[-1].startswith("| "), tail[-5:]  # the summary table is printed last


# A stand-in interpreter for device_check.sh's GPU-run steps (no GPU here): each step's command exits as the
# FAKE_* variables say, and the benchmark runner writes a results table.
FAKE_PYTHON = """#!/usr/bin/env bash
case "$1 $2" in
  "setup.py build_ext"|"-c import"*|"-m pytest") exit 0 ;;
  "benchmarks/diagnose_cuda_attention.py"*) exit ${FAKE_DIAG_RC:-0} ;;
  "-m llm2vec_fast.cli") for op in ${FAKE_BAD_OPS:-}; do [[ "$*" == *"--op $op"* ]] && exit 1; done; exit 0 ;;
  "benchmarks/run.py"*) printf '## Results\\n\\n| op |\\n' > "$OUT/h100-fake.md"; exit 0 ;;
esac
exit 99
"""


@pytest.mark.parametrize("diag_rc, bad_ops, status", [(0, "", 0), (1, "", 1), (0, "rms_norm", 1)],
                         ids=["all-pass", "attention-fails-its-diagnosis", "a-kernel-fails-its-check"])
def test_device_check_gpu_steps_exit_1_when_a_kernel_fails(tmp_path, diag_rc, bad_ops, status):
    """The GPU run's steps (build, (a2) diagnosis, (a4) checks) with a stand-in interpreter: a CUDA kernel that fails
    its first contact (switched off for the later steps) makes the run's exit status 1, as the header promises."""
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(fake), CUDA_HOME=str(tmp_path / "no-toolkit"),
               FAKE_DIAG_RC=str(diag_rc), FAKE_BAD_OPS=bad_ops)
    for name in ("DRY_RUN", "LLM2VEC_FAST_CUDA_ATTENTION", "LLM2VEC_FAST_CUDA_OFF"):
        env.pop(name, None)
    proc = subprocess.run(["bash", "benchmarks/device_check.sh"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == status, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert ("LLM2VEC_FAST_CUDA_ATTENTION=off for the later steps" in proc.stdout) == (diag_rc == 1)
    assert ("LLM2VEC_FAST_CUDA_OFF=rms_norm for the later steps" in proc.stdout) == (bad_ops == "rms_norm")


def test_a_test_run_stopped_by_sigterm_still_reports(tmp_path):
    """The device check stops the GPU tests with ``timeout`` (SIGTERM): tests/conftest.py makes pytest end as on
    Ctrl-C, so the failures so far, the summary and the junit file are still written (a plain kill leaves only the
    progress dots)."""
    started = tmp_path / "started"
    (tmp_path / "test_stopped.py").write_text(textwrap.dedent(f"""
        import pathlib
        import time

        def test_fails():
            assert 0, "boom"

        def test_runs_too_long():
            pathlib.Path({str(started)!r}).touch()
            time.sleep(300)
        """))
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "tests"), REPO]))
    proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "conftest", "-q", "-rfE", "-p", "no:cacheprovider",
                             f"--junitxml={junit}", "--rootdir", str(tmp_path), "test_stopped.py"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the long test never started"
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert "FAILED test_stopped.py::test_fails" in output and "KeyboardInterrupt" in output, output[-3000:]
    assert junit.exists() and 'failures="1"' in junit.read_text()


def test_a_cuda_kernel_switched_off_is_not_timed_under_its_name(monkeypatch):
    """With LLM2VEC_FAST_CUDA_OFF naming an op (the device check's (a4) sets it for a kernel that failed its check),
    the benchmarks skip that op's "cuda" impl instead of timing the Triton fallback as "cuda": make_auto_table.py
    could otherwise pick the failed kernel for "auto". ("cuda" is offered here on the CPU for the test.)"""
    import torch
    from benchmarks import bench_fused, bench_loss, bench_pool, harness
    from llm2vec_fast import dispatch
    real = dispatch.available_backends
    monkeypatch.setattr(dispatch, "available_backends", lambda op, device: [*real(op, device), "cuda"])
    monkeypatch.setenv("LLM2VEC_FAST_CUDA_OFF", "pool,contrastive_loss,rms_norm,gated_activation,rotary_embedding")
    device = torch.device("cpu")
    skipped = set()
    for module in (bench_pool, bench_loss, bench_fused):
        for case in module.cases(True, device):
            rows, skips = harness.run_case(case, device, impls=["cuda"], log=lambda line: None)
            assert rows == [], (case.op, rows)
            skipped.update(skip.op for skip in skips if "LLM2VEC_FAST_CUDA_OFF" in skip.reason)
    assert {"pool", "contrastive_loss_fwd", "rms_norm", "gated_activation", "rotary_embedding"} <= skipped


def test_make_auto_table_picks_the_measured_winner(tmp_path):
    """The "auto" table comes from GPU results: per op, the backend faster on the cases both ran."""
    from benchmarks import make_auto_table

    def row(op, impl, ms, shape="S=1"):
        return {"op": op, "impl": impl, "shape": shape, "dtype": "bf16", "ms": ms, "tflops": None, "gbps": None,
                "peak_mem_mb": None}

    results = tmp_path / "results"
    results.mkdir()
    (results / "gpu.json").write_text(json.dumps({"device": "cuda", "rows": [
        row("pool", "triton", 2.0), row("pool", "cuda", 1.0),                      # cuda wins pool
        row("attention_fwd", "triton", 1.0), row("attention_fwd", "cuda", 3.0),    # triton wins attention
        row("attention_fwd", "sdpa_cudnn", 0.5),                                   # baselines never chosen
        row("attention_bwd", "triton", 9.0), row("attention_bwd", "cuda", 1.0),    # both Triton's: not counted
        row("pool", "triton", -0.01, "S=2"), row("pool", "cuda", 2.0, "S=2"),    # a differential time <= 0: no pair
        row("contrastive_loss_fwd", "triton", 1.0)]}))                              # only triton measured
    (results / "cpu.json").write_text(json.dumps({"device": "cpu", "rows": [row("pool", "triton", 0.1)]}))
    dispatch_copy = tmp_path / "dispatch.py"
    dispatch_copy.write_text("x = 1\nAUTO_TABLE: Dict[str, str] = {}\ny = 2\n")
    assert make_auto_table.main([str(results), "--dispatch", str(dispatch_copy), "--check"]) == 1
    assert make_auto_table.main([str(results), "--dispatch", str(dispatch_copy)]) == 0
    text = dispatch_copy.read_text()
    assert ('AUTO_TABLE: Dict[str, str] = {"contrastive_loss": "triton", "flash_attention": "triton", '
            '"pool": "cuda"}') in text
    assert text.startswith("x = 1\n") and text.endswith("y = 2\n")
    assert make_auto_table.main([str(results), "--dispatch", str(dispatch_copy), "--check"]) == 0


def test_cuda_attention_diagnosis_without_a_gpu(capsys):
    """The device check's first-contact diagnosis runs anywhere: without an sm_90 GPU it has nothing to do."""
    import torch
    from benchmarks import diagnose_cuda_attention
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_cuda_attention_diagnosis_on_the_gpu covers it")
    assert diagnose_cuda_attention.main([]) == 0
    assert "nothing to diagnose" in capsys.readouterr().out


@pytest.mark.gpu
def test_cuda_attention_diagnosis_on_the_gpu(capsys):
    from benchmarks import diagnose_cuda_attention
    code = diagnose_cuda_attention.main(["--small"])
    out = capsys.readouterr().out
    assert code == 0, out
