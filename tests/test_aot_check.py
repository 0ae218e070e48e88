"""llm2vec_fast.tools.aot_check: ahead-of-time sm_90a compile of Triton configs, without a GPU.

Every check is shown to pass on a good config and to fail on a config built to break it. The configs
live in tests/fixtures/aot_kernels.py and are compiled once per session (about 15 s on 2 cores with a
cold triton cache, most of it the spilling kernel).
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("triton")

from llm2vec_fast.tools import aot_check  # noqa: E402
from llm2vec_fast.tools.aot_check import KernelConfig  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "aot_kernels.py"
FAILING = {
    "broken_compile": "compile",
    "copy_marked_matrix_no_wgmma": "wgmma",
    "matmul_128x128x64_s8_smem": "shared",
    "huge_tile_w1_spill": "spill",
}

BROKEN_MODULE = '''
import triton
import triton.language as tl
from llm2vec_fast.tools.aot_check import KernelConfig


@triton.jit
def bad_kernel(x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs) + undefined_in_kernel)  # noqa: F821


AOT_CONFIGS = [KernelConfig(bad_kernel, {"x_ptr": "*fp32", "n": "i32"}, {"BLOCK": 64}, name="bad")]
'''


@pytest.fixture(scope="module")
def report():
    return aot_check.check([FIXTURE])


@pytest.fixture(scope="module")
def by_name(report):
    return {r.name: r for r in report.results}


def _cli(*args, cwd=REPO):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "llm2vec_fast.tools.aot_check", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_fixture_configs_all_found(by_name):
    assert set(by_name) == {"matmul_64x64x32_pass", *FAILING}


def test_matmul_passes_with_wgmma(by_name):
    r = by_name["matmul_64x64x32_pass"]
    assert r.ok, r.messages
    assert r.failed_checks == []
    assert r.wgmma is True
    assert r.matrix is True
    assert r.registers is not None and 0 < r.registers <= 255
    assert r.spill_stores == 0 and r.spill_loads == 0
    assert 0 < r.shared <= aot_check.SHARED_LIMIT_BYTES


def test_compile_error_is_reported(by_name):
    r = by_name["broken_compile"]
    assert r.failed_checks == ["compile"]
    assert "no_such_name_in_scope" in r.error
    assert r.registers is None and r.shared is None


def test_matrix_config_without_dot_fails_wgmma(by_name):
    r = by_name["copy_marked_matrix_no_wgmma"]
    assert r.failed_checks == ["wgmma"]
    assert r.wgmma is False
    assert r.spill_bytes == 0  # it compiled fine; only the wgmma check failed


def test_shared_memory_over_limit_fails(by_name):
    r = by_name["matmul_128x128x64_s8_smem"]
    assert r.failed_checks == ["shared"]
    assert r.shared > aot_check.SHARED_LIMIT_BYTES
    assert r.wgmma is True and r.spill_bytes == 0


def test_register_spill_fails(by_name):
    r = by_name["huge_tile_w1_spill"]
    assert r.failed_checks == ["spill"]
    assert r.spill_stores > 0 and r.spill_loads > 0
    assert r.shared <= aot_check.SHARED_LIMIT_BYTES


def test_report_failures_list(report):
    assert not report.ok
    assert len(report.failures) == len(FAILING)
    for name, check in FAILING.items():
        assert any(line.startswith(f"aot_kernels:{name}: {check}:") for line in report.failures), report.failures
    assert not any("matmul_64x64x32_pass" in line for line in report.failures)
    d = report.to_dict()
    assert d["ok"] is False and d["target"] == "sm_90a" and len(d["results"]) == len(FAILING) + 1
    json.dumps(d, default=str)


def test_check_configs_direct_api():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_aot_fixture_direct", FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    good = KernelConfig(mod.tiled_matmul, mod.MATMUL_SIG, {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32},
                        num_warps=4, num_stages=3, matrix=True)
    typo = KernelConfig(mod.row_copy, {"x_ptr": "*fp32", "y_pointer": "*fp32", "n": "i32"}, {"BLOCK": 64})
    rep = aot_check.check_configs([good, typo], module="direct")
    assert rep.results[0].ok and rep.results[0].wgmma
    assert rep.results[1].failed_checks == ["compile"] and "y_pointer" in rep.results[1].error
    assert rep.failures == [f"direct:{typo.label}: {rep.results[1].messages[0]}"]


TWO_CONFIG_MODULE = '''
import triton
import triton.language as tl
from llm2vec_fast.tools.aot_check import KernelConfig


@triton.jit
def add_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)


SIG = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32"}
AOT_CONFIGS = [KernelConfig(add_kernel, SIG, {"BLOCK": 256}, num_warps=2, name="add_256"),
               KernelConfig(add_kernel, SIG, {"BLOCK": 2048}, num_warps=8, name="add_2048")]
'''


@pytest.mark.slow  # worker processes each import torch and triton: ~10 s on 2 cores
def test_parallel_jobs_match_serial(tmp_path):
    (tmp_path / "two.py").write_text(TWO_CONFIG_MODULE)
    serial = aot_check.check([tmp_path], jobs=1)
    parallel = aot_check.check([tmp_path], jobs=2)
    assert serial.ok and parallel.ok, serial.failures + parallel.failures
    key = lambda r: (r.module, r.name, r.registers, r.spill_bytes, r.shared, r.wgmma)  # noqa: E731
    assert [key(r) for r in parallel.results] == [key(r) for r in serial.results]
    assert [r.name for r in parallel.results] == ["add_256", "add_2048"]


def test_parse_ptxas_log():
    log = textwrap.dedent("""\
        ptxas info    : Compiling entry function 'k' for 'sm_90a'
        ptxas info    : Function properties for k
            16 bytes stack frame, 12 bytes spill stores, 20 bytes spill loads
        ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size
        """)
    assert aot_check.parse_ptxas_log(log) == (255, 12, 20)
    assert aot_check.parse_ptxas_log("garbage") == (None, None, None)


def test_python_level_import_error_is_a_failure(tmp_path, capsys):
    (tmp_path / "syntax_broken.py").write_text("AOT_CONFIGS = [\n")
    rc = aot_check.main(["--paths", str(tmp_path), "--json", str(tmp_path / "out" / "r.json")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "import" in out and "SyntaxError" in out
    data = json.loads((tmp_path / "out" / "r.json").read_text())
    assert data["ok"] is False and data["results"][0]["failed_checks"] == ["import"]


def test_default_kernels_dir_is_the_shipped_folder():
    d = aot_check.default_kernels_dir()
    assert d is not None and (d / "__init__.py").is_file()
    assert d.name == "kernels"


def test_cli_empty_dir_passes_with_message(tmp_path):
    proc = _cli("--paths", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert aot_check.NO_CONFIGS_LINE in proc.stdout


def test_cli_broken_kernel_module_fails(tmp_path):
    (tmp_path / "bad_kernels.py").write_text(BROKEN_MODULE)
    proc = _cli("--paths", str(tmp_path))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "bad_kernels:bad: compile:" in proc.stdout
    assert "undefined_in_kernel" in proc.stdout


def test_cli_expect_triton_guards_the_version(tmp_path):
    import triton
    proc = _cli("--paths", str(tmp_path), "--expect-triton", "0.0.1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"--expect-triton 0.0.1, but the imported triton is {triton.__version__}" in proc.stderr
    proc = _cli("--paths", str(tmp_path), "--expect-triton", triton.__version__)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("interpret", ["1", "0"])
def test_compiles_with_a_cold_cache_after_triton_was_loaded_for_the_interpreter(tmp_path, interpret):
    """make test imports triton under TRITON_INTERPRET=1, which makes tl.cdiv & co. interpreter functions that
    the code generator cannot compile: every compile that missed triton's cache failed ("'ir.value' object has
    no attribute 'data'"). The compiles then go to a fresh process; without the interpreter they stay here."""
    code = textwrap.dedent(f"""
        import triton.language
        from llm2vec_fast.tools import aot_check
        print(aot_check.triton_loaded_for_the_interpreter())
        report = aot_check.check([{str(FIXTURE)!r}])
        print(report.to_dict()["results"][0]["name"], report.results[0].ok, report.results[0].wgmma)
    """)
    env = dict(os.environ, TRITON_INTERPRET=interpret, TRITON_CACHE_DIR=str(tmp_path / "cold"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded, outcome = result.stdout.strip().splitlines()[-2:]
    assert loaded == str(interpret == "1")
    assert outcome == "matmul_64x64x32_pass True True"
