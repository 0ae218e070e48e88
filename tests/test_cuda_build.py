"""llm2vec_fast.tools.cuda_build: building the CUDA extension with nvcc on a CPU-only machine.

The build tests need a CUDA build of torch and a CUDA toolkit (CI has both); the tiny-extension build
takes about 35 s on 2 cores (the torch-including bindings.cpp dominates) and is marked slow.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llm2vec_fast.tools import cuda_build

REPO = Path(__file__).resolve().parents[1]

CAN_BUILD = torch.version.cuda is not None and cuda_build.find_cuda_home() is not None
needs_toolkit = pytest.mark.skipif(
    not CAN_BUILD,
    reason=f"needs a CUDA build of torch (torch.version.cuda={torch.version.cuda}) and a CUDA toolkit "
           f"(find_cuda_home()={cuda_build.find_cuda_home()})")

BROKEN_CU = """\
__global__ void broken_kernel(float* x) {
    x[threadIdx.x] = this_identifier_is_undefined;
}
"""

# The kernel file never includes torch headers: a launcher on raw pointers, bound in one .cpp.
KERNEL_CU = """\
#include <cuda_runtime.h>

__global__ void scale_kernel(float* x, float alpha, long n) {
    long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
    if (i < n) x[i] *= alpha;
}

void launch_scale(float* x, float alpha, long n, cudaStream_t stream) {
    const int threads = 256;
    const long blocks = (n + threads - 1) / threads;
    if (blocks > 0) scale_kernel<<<(unsigned)blocks, threads, 0, stream>>>(x, alpha, n);
}
"""

BINDINGS_CPP = """\
#include <torch/extension.h>
#include <cuda_runtime.h>

void launch_scale(float* x, float alpha, long n, cudaStream_t stream);

torch::Tensor scale_(torch::Tensor x, double alpha) {
    TORCH_CHECK(x.is_cuda(), "scale_: expected a CUDA tensor");
    TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
                "scale_: expected a contiguous float32 tensor");
    launch_scale(x.data_ptr<float>(), static_cast<float>(alpha), x.numel(), nullptr);
    return x;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("scale_", &scale_, "x *= alpha in place (CUDA)");
}
"""


def _cli(*args):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "llm2vec_fast.tools.cuda_build", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


# ---------------------------------------------------------------------------------------------------
# configuration (fast, no compiler)
# ---------------------------------------------------------------------------------------------------

def test_find_cuda_home_prefers_env(monkeypatch):
    monkeypatch.setenv("CUDA_HOME", "/opt/some/cuda")
    assert cuda_build.find_cuda_home() == "/opt/some/cuda"


def test_find_cuda_home_default_needs_nvcc(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(cuda_build, "DEFAULT_CUDA_HOME", str(tmp_path))
    assert cuda_build.find_cuda_home() is None  # exists, but no bin/nvcc
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("#!/bin/sh\n")
    assert cuda_build.find_cuda_home() == str(tmp_path)


def test_extension_kwargs(monkeypatch):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "CUDA_HOME", getattr(cpp_extension, "CUDA_HOME", None))
    if "CUDA_HOME" in os.environ:  # extension_kwargs() sets it; monkeypatch restores it afterwards
        monkeypatch.setenv("CUDA_HOME", os.environ["CUDA_HOME"])
    else:
        monkeypatch.delenv("CUDA_HOME", raising=False)
    kw = cuda_build.extension_kwargs()
    cxx, nvcc = kw["extra_compile_args"]["cxx"], kw["extra_compile_args"]["nvcc"]
    std = f"-std={cuda_build.cxx_std()}"
    assert cxx == ["-O3", std, f"-DL2VF_TORCH_VERSION={torch.__version__}", f"-DL2VF_CUDA_VERSION={torch.version.cuda}"]
    for flag in ("-O3", std, "--use_fast_math", "-lineinfo"):
        assert flag in nvcc
    assert sum(f.startswith("-std=") for f in nvcc) == 1
    cu13 = [d for d in kw["include_dirs"] if d.endswith(os.path.join("nvidia", "cu13", "include"))]
    assert cu13 == kw["include_dirs"]
    for d in cu13:
        assert os.path.isdir(d)
    home = cuda_build.find_cuda_home()
    if home is not None:  # torch's cached guess is corrected as well (setup.py imports cpp_extension first)
        assert cpp_extension.CUDA_HOME == home
        assert os.environ["CUDA_HOME"] == home


def test_cxx_std_matches_torch_headers():
    aten = Path(torch.__file__).parent / "include" / "ATen" / "ATen.h"
    expected = "c++20" if aten.is_file() and "202002L" in aten.read_text()[:4096] else "c++17"
    assert cuda_build.cxx_std() == expected


def test_empty_dir_build_returns_none(tmp_path, capsys):
    (tmp_path / "README.md").write_text("no sources here")
    assert cuda_build.build(tmp_path, name="l2vf_never_built", build_dir=str(tmp_path / "b")) is None
    assert "has no sources; nothing to build" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()


def test_cli_empty_dir_exits_zero(tmp_path):
    proc = _cli("--sources", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"cuda_build: {tmp_path}/ has no sources; nothing to build" in proc.stdout


def test_cpu_only_torch_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "k.cu").write_text(BROKEN_CU)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(RuntimeError, match="CPU-only build"):
        cuda_build.build(tmp_path, name="l2vf_cpu_torch", build_dir=str(tmp_path / "b"))


def test_missing_toolkit_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "k.cu").write_text(BROKEN_CU)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_build, "find_cuda_home", lambda: None)
    with pytest.raises(RuntimeError, match="no CUDA toolkit found"):
        cuda_build.build(tmp_path, name="l2vf_no_toolkit", build_dir=str(tmp_path / "b"))


# ---------------------------------------------------------------------------------------------------
# real builds with nvcc
# ---------------------------------------------------------------------------------------------------

@needs_toolkit
def test_broken_cu_raises_with_compiler_output(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "broken.cu").write_text(BROKEN_CU)
    with pytest.raises(RuntimeError) as info:
        cuda_build.build(src, name="l2vf_broken_cu", build_dir=str(tmp_path / "build"))
    msg = str(info.value)
    assert "l2vf_broken_cu" in msg
    assert "this_identifier_is_undefined" in msg and "error" in msg


@needs_toolkit
def test_cli_broken_cu_exits_nonzero(tmp_path):
    (tmp_path / "broken.cu").write_text(BROKEN_CU)
    proc = _cli("--sources", str(tmp_path), "--name", "l2vf_broken_cli", "--build-dir", str(tmp_path / "b"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "this_identifier_is_undefined" in proc.stderr
    assert "cuda_build: FAILED" in proc.stderr


@needs_toolkit
@pytest.mark.slow
def test_tiny_extension_builds_and_imports(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "scale.cu").write_text(KERNEL_CU)
    (src / "bindings.cpp").write_text(BINDINGS_CPP)
    build_dir = tmp_path / "build"
    mod = cuda_build.build(src, name="l2vf_tiny_ext", build_dir=str(build_dir))
    assert mod is not None and mod.__name__ == "l2vf_tiny_ext"
    assert Path(mod.__file__).resolve().parent == build_dir.resolve()
    assert callable(mod.scale_)
    # the host side of the binding runs without a GPU: its argument check rejects a CPU tensor
    with pytest.raises(RuntimeError, match="expected a CUDA tensor"):
        mod.scale_(torch.ones(4), 2.0)
