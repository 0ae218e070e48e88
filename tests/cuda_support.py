"""Shared by the tests of the CUDA backend (test_cuda_kernels.py, and the op files test_rms_norm.py and
test_gated.py): where csrc/ is, whether it can be built (nvcc and a CUDA build of torch) and emulated (g++
and the CUDA headers), the extension built once per session, the CPU emulator library of csrc/emulator/,
and the extension's sm_90a cubin report."""
from __future__ import annotations

import collections
import ctypes
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from llm2vec_fast import cuda_backend
from llm2vec_fast.tools import cuda_build

REPO = Path(__file__).resolve().parents[1]
CSRC = REPO / "csrc"
EMULATOR = CSRC / "emulator"

CUDA_HOME = cuda_build.find_cuda_home()
HAS_NVCC = CUDA_HOME is not None and os.path.isfile(os.path.join(CUDA_HOME, "bin", "nvcc"))
CAN_BUILD = torch.version.cuda is not None and HAS_NVCC
needs_build = pytest.mark.skipif(
    not CAN_BUILD, reason=f"building csrc/ needs a CUDA build of torch (torch.version.cuda={torch.version.cuda}) "
                          f"and nvcc (CUDA_HOME={CUDA_HOME})")
CUDA_INCLUDE = os.path.join(CUDA_HOME, "include") if CUDA_HOME else None
CAN_EMULATE = shutil.which("g++") is not None and CUDA_INCLUDE is not None and \
    os.path.isfile(os.path.join(CUDA_INCLUDE, "cuda_runtime.h"))
needs_emulator = pytest.mark.skipif(
    not CAN_EMULATE, reason="the CPU emulator needs g++ and the CUDA toolkit's headers (CUDA_HOME/include)")
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # l2vf::DType (csrc/common.h)


def sources():
    return sorted(p for p in CSRC.rglob("*") if p.suffix in (".cu", ".cpp", ".h", ".cuh"))


def sources_digest() -> str:
    h = hashlib.sha256()
    for p in sources():
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _fresh_inplace_extension():
    """llm2vec_fast._C if it is importable and newer than every csrc/ source, else None."""
    spec = importlib.util.find_spec(cuda_backend.EXTENSION)
    if spec is None or spec.origin is None:
        return None
    newest_source = max(p.stat().st_mtime for p in sources())
    if os.path.getmtime(spec.origin) < newest_source:
        return None
    return importlib.import_module(cuda_backend.EXTENSION)


@functools.lru_cache(maxsize=None)
def _built_extension():
    build_dir = Path(tempfile.gettempdir()) / f"llm2vec_fast_C_test-{os.getuid()}-torch{torch.__version__}"
    return cuda_build.build(CSRC, name="llm2vec_fast_C_test", build_dir=str(build_dir))


def extension():
    """The extension: the in-place llm2vec_fast._C when it is up to date (the device check builds it first),
    else csrc/ built with cuda_build into a per-user temporary folder that is kept between sessions, so that
    ninja only recompiles what changed (once per process). Skips the test where it cannot be built."""
    module = _fresh_inplace_extension()
    if module is not None:
        return module
    if not CAN_BUILD:
        pytest.skip(f"building csrc/ needs a CUDA build of torch and nvcc (torch.version.cuda={torch.version.cuda}, "
                    f"CUDA_HOME={CUDA_HOME})")
    return _built_extension()


def build_emulator(sanitize: bool = False) -> Path:
    """Every csrc/emulator/*_emulator.cpp (each compiles one csrc/*.cu unchanged) in one shared library, kept
    per sources digest in a per-user temporary folder."""
    out_dir = Path(tempfile.gettempdir()) / f"llm2vec_fast_emulator-{os.getuid()}"
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / f"kernels_emulator-{sources_digest()}{'-asan' if sanitize else ''}.so"
    if lib.exists():
        return lib
    flags = ["-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unused-function", "-Wno-unknown-pragmas",
             "-Wno-psabi"]  # -Wno-psabi: GCC's note on passing the 64-byte aligned CUtensorMap by value
    if sanitize:
        flags += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    emulated = sorted(str(p) for p in EMULATOR.glob("*_emulator.cpp"))
    proc = subprocess.run(["g++", *flags, f"-I{CUDA_INCLUDE}", *emulated, "-o", str(tmp)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the emulator failed:\n{proc.stderr[-6000:]}")
    tmp.replace(lib)
    return lib


def cuobjdump():
    candidates = [os.path.join(CUDA_HOME, "bin", "cuobjdump")] if CUDA_HOME else []
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        candidates.append(os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin", "cuobjdump"))
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


@functools.lru_cache(maxsize=None)
def _cubin_report(so: str):
    tool = cuobjdump()
    elves = subprocess.run([tool, "--list-elf", so], capture_output=True, text=True, check=True).stdout
    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", so], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([tool, "-res-usage", "-arch", "sm_90a", so], capture_output=True, text=True, check=True).stdout
    kernels = {}
    for chunk in sass.split("Function : ")[1:]:
        name = chunk.split()[0]
        kernels[name] = {"sass": chunk}
    for m in re.finditer(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+)", res):
        kernels.setdefault(m.group(1), {}).update(regs=int(m.group(2)), stack=int(m.group(3)),
                                                   shared=int(m.group(4)))
    return {"elves": elves, "kernels": kernels}


def cubin_report(ext):
    """{"elves": text, "kernels": {mangled name: {"sass": text, "regs": int, "stack": int, "shared": int}}} of the
    extension's sm_90a cubin (read once per process). Skips without cuobjdump or without 9.0a in the arch list."""
    if cuobjdump() is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's wheel)")
    arches = os.environ.get("TORCH_CUDA_ARCH_LIST", cuda_build.DEFAULT_ARCH_LIST)
    if "9.0a" not in arches:
        pytest.skip(f"TORCH_CUDA_ARCH_LIST={arches!r} does not include 9.0a")
    return _cubin_report(ext.__file__)


# ---------------------------------------------------------------------------------------------------
# The row kernels (csrc/rms_norm.cu, csrc/gated.cu, csrc/rotary.cu) on the CPU, behind the extension's interface
# ---------------------------------------------------------------------------------------------------
_I64, _I32, _F32, _PTR = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
RMS_NORM_PLAN_KEYS = ("supported", "vec", "warps_per_row", "vecs_per_thread", "blocks", "partial_rows")
GATED_PLAN_KEYS = ("vec", "col_blocks", "row_blocks")
ROTARY_PLAN_KEYS = ("vec", "pair_slots", "slots", "slot_threads", "head_lanes", "items", "blocks", "copy_tail")


def _ptr(t):
    return None if t is None or t.numel() == 0 else t.data_ptr()


def _unit_last(t):
    """As csrc/bindings.cpp's unit_last_dim (rows_of, heads_of, angles_of): a unit-stride last dim (a copy
    otherwise)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def _strides(t, dims):
    """As csrc/bindings.cpp's stride_of: each dim's stride, 0 for a dim of at most one entry."""
    return [t.stride(d) if t.shape[d] > 1 else 0 for d in dims]


class EmulatedExtension:
    """The extension's ``rms_norm_forward`` / ``rms_norm_backward`` / ``gated_forward`` / ``gated_backward`` /
    ``rotary_forward`` / ``rotary_backward`` / ``*_plan`` on CPU tensors: the kernels of csrc/ run in the emulator,
    the rows prepared as csrc/bindings.cpp prepares them (outputs pre-filled with NaN, so that an element the
    kernels never write shows). Counts the
    kernel runs (``launches``) and the rms_norm calls its plan declines (``declined``: None is returned, as the
    extension does). ``num_sms`` sizes the backward grid: a few, so that row groups walk several rows."""

    def __init__(self, path: Path, num_sms: int = 3):
        lib = self.lib = ctypes.CDLL(str(path))
        self.num_sms = num_sms
        lib.l2vf_emu_rms_norm_plan.argtypes = [_I32, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I32, _I32, _PTR]
        lib.l2vf_emu_rms_norm_forward.argtypes = [_I32, _I64, _I64, _PTR, _I64, _PTR, _F32, _F32, _I32, _PTR, _PTR]
        lib.l2vf_emu_rms_norm_backward.argtypes = [_I32, _I64, _I64, _PTR, _I64, _PTR, _F32, _I32, _PTR, _I64, _PTR,
                                                   _I32, _PTR, _PTR]
        lib.l2vf_emu_gated_forward.argtypes = [_I32, _I64, _I64, _PTR, _I64, _PTR, _I64, _I32, _PTR, _I64, _PTR]
        lib.l2vf_emu_gated_backward.argtypes = [_I32, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I32, _PTR, _PTR,
                                                _PTR]
        lib.l2vf_emu_rotary.argtypes = [_I32] + [_I64] * 5 + [_PTR, _I64, _I64] * 2 + [_PTR, _I64] * 2 + \
            [_PTR, _I64, _I64] * 2 + [_I32, _I32, _PTR]
        self.reset()

    def reset(self):
        self.launches = collections.Counter()
        self.declined = collections.Counter()
        self.last_plan = None

    # -- rms_norm --------------------------------------------------------------------------------------
    def rms_norm_plan(self, x, weight, backward=False, num_sms=132, grad_y=None):
        x = _unit_last(x)
        grad_y = x if backward and grad_y is None else grad_y
        plan = (_I64 * len(RMS_NORM_PLAN_KEYS))()
        self.lib.l2vf_emu_rms_norm_plan(DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], _ptr(x), x.stride(0),
                                        _ptr(weight), _ptr(grad_y), grad_y.stride(0) if backward else 0,
                                        int(backward), num_sms, plan)
        plan = dict(zip(RMS_NORM_PLAN_KEYS, plan))
        plan["supported"] = bool(plan["supported"]) and weight.dtype == x.dtype  # bindings.cpp's plan_norm
        return plan

    def rms_norm_forward(self, x, weight, eps, offset, gemma):
        x, weight = _unit_last(x), weight.contiguous()
        self.last_plan = plan = self.rms_norm_plan(x, weight)
        if not plan["supported"]:
            self.declined["rms_norm_forward"] += 1
            return None
        y = torch.full(x.shape, float("nan"), dtype=x.dtype)
        rstd = torch.full((x.shape[0],), float("nan"))
        err = self.lib.l2vf_emu_rms_norm_forward(DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], _ptr(x), x.stride(0),
                                                 _ptr(weight), eps, offset, int(gemma), _ptr(y), _ptr(rstd))
        assert err == 0, f"launcher returned cudaError {err}"
        self.launches["rms_norm_forward"] += 1
        return y, rstd

    def rms_norm_backward(self, grad_y, x, weight, rstd, eps, offset, gemma):
        x, grad_y, weight, rstd = _unit_last(x), _unit_last(grad_y), weight.contiguous(), rstd.contiguous()
        self.last_plan = plan = self.rms_norm_plan(x, weight, backward=True, num_sms=self.num_sms, grad_y=grad_y)
        if not plan["supported"]:
            self.declined["rms_norm_backward"] += 1
            return None
        grad_x = torch.full(x.shape, float("nan"), dtype=x.dtype)
        partial = torch.full((plan["partial_rows"], x.shape[1]), float("nan"))
        err = self.lib.l2vf_emu_rms_norm_backward(
            DTYPE_CODES[x.dtype], x.shape[0], x.shape[1], _ptr(x), x.stride(0), _ptr(weight), offset, int(gemma),
            _ptr(grad_y), grad_y.stride(0), _ptr(rstd), self.num_sms, _ptr(grad_x), _ptr(partial))
        assert err == 0, f"launcher returned cudaError {err}"
        self.launches["rms_norm_backward"] += 1
        return grad_x, partial.sum(0).to(weight.dtype)

    # -- gated_activation ------------------------------------------------------------------------------
    def _gated_run(self, entry, gate, up, *tensors_and_args):
        plan = (_I64 * len(GATED_PLAN_KEYS))()
        err = entry(DTYPE_CODES[gate.dtype], gate.shape[0], gate.shape[1], _ptr(gate), gate.stride(0), _ptr(up),
                    up.stride(0), *tensors_and_args, plan)
        assert err == 0, f"launcher returned cudaError {err}"
        self.last_plan = dict(zip(GATED_PLAN_KEYS, plan))

    def gated_forward(self, gate, up, gelu, out=None):
        gate, up = _unit_last(gate), _unit_last(up)
        if out is None:
            out = torch.full(gate.shape, float("nan"), dtype=gate.dtype)
        elif out.shape[1] > 1 and out.stride(1) != 1:
            raise ValueError(f"out must have a contiguous last dim, got strides {out.stride()}")
        self._gated_run(self.lib.l2vf_emu_gated_forward, gate, up, int(gelu), _ptr(out), out.stride(0))
        self.launches["gated_forward"] += 1
        return out

    def gated_backward(self, grad, gate, up, gelu):
        grad, gate, up = _unit_last(grad), _unit_last(gate), _unit_last(up)
        grad_gate = torch.full(gate.shape, float("nan"), dtype=gate.dtype)
        grad_up = torch.full(gate.shape, float("nan"), dtype=gate.dtype)
        self._gated_run(self.lib.l2vf_emu_gated_backward, gate, up, _ptr(grad), grad.stride(0), int(gelu),
                        _ptr(grad_gate), _ptr(grad_up))
        self.launches["gated_backward"] += 1
        return grad_gate, grad_up

    # -- rotary_embedding ------------------------------------------------------------------------------
    def _rotary(self, q, k, cos, sin, out_q, out_k, backward, launch):
        """Runs (launch) or plans csrc/rotary.cu on tensors prepared as csrc/bindings.cpp's prepare_rotary does;
        returns the plan."""
        plan = (_I64 * len(ROTARY_PLAN_KEYS))()
        err = self.lib.l2vf_emu_rotary(
            DTYPE_CODES[q.dtype], q.shape[0], q.shape[1], k.shape[1], q.shape[2], cos.shape[1],
            _ptr(q), *_strides(q, (0, 1)), _ptr(k), *_strides(k, (0, 1)), _ptr(cos), *_strides(cos, (0,)),
            _ptr(sin), *_strides(sin, (0,)), _ptr(out_q), *_strides(out_q, (0, 1)), _ptr(out_k),
            *_strides(out_k, (0, 1)), int(backward), int(launch), plan)
        assert err == 0, f"launcher returned cudaError {err}"
        plan = dict(zip(ROTARY_PLAN_KEYS, plan))
        plan["copy_tail"] = bool(plan["copy_tail"])
        return plan

    @staticmethod
    def _rotary_output(out, like, name):
        """The forward's output: ``out`` (checked as the bindings check it), else a NaN-filled contiguous tensor."""
        if out is None:
            return torch.full(like.shape, float("nan"), dtype=like.dtype)
        if out.shape != like.shape or out.dtype != like.dtype:
            raise ValueError(f"{name} must have shape {tuple(like.shape)} and dtype {like.dtype}, got "
                             f"{tuple(out.shape)} {out.dtype}")
        if out.shape[2] > 1 and out.stride(2) != 1:
            raise ValueError(f"{name} must have a unit-stride last dim, got strides {out.stride()}")
        return out

    def rotary_plan(self, q, k, cos, sin, out_q=None, out_k=None, backward=False):
        q, k, cos, sin = (_unit_last(t) for t in (q, k, cos, sin))
        if backward:
            out_q = out_k = None
        out_q, out_k = self._rotary_output(out_q, q, "out_q"), self._rotary_output(out_k, k, "out_k")
        return self._rotary(q, k, cos, sin, out_q, out_k, backward, launch=False)

    def rotary_forward(self, q, k, cos, sin, out_q=None, out_k=None):
        q, k, cos, sin = (_unit_last(t) for t in (q, k, cos, sin))
        out_q, out_k = self._rotary_output(out_q, q, "out_q"), self._rotary_output(out_k, k, "out_k")
        self.last_plan = self._rotary(q, k, cos, sin, out_q, out_k, backward=False, launch=True)
        self.launches["rotary_forward"] += 1
        return out_q, out_k

    def rotary_backward(self, grad_q, grad_k, cos, sin):
        grad_q, grad_k, cos, sin = (_unit_last(t) for t in (grad_q, grad_k, cos, sin))
        dq = torch.full(grad_q.shape, float("nan"), dtype=grad_q.dtype)
        dk = torch.full(grad_k.shape, float("nan"), dtype=grad_k.dtype)
        self.last_plan = self._rotary(grad_q, grad_k, cos, sin, dq, dk, backward=True, launch=True)
        self.launches["rotary_backward"] += 1
        return dq, dk


@functools.lru_cache(maxsize=None)
def emulated_extension() -> EmulatedExtension:
    return EmulatedExtension(build_emulator())


def run_cuda_backend_in_the_emulator(monkeypatch) -> EmulatedExtension:
    """From here to the end of the test, ``backend="cuda"`` runs on CPU tensors: ``dispatch`` offers the cuda
    backend on the CPU and ``cuda_backend`` calls :class:`EmulatedExtension` (reset) instead of the extension.
    For the ops whose kernels it emulates (rms_norm, gated_activation, rotary_embedding)."""
    from llm2vec_fast import dispatch

    emulated = emulated_extension()
    emulated.reset()
    runs_on = dispatch._backend_runs_on
    monkeypatch.setattr(dispatch, "_backend_runs_on",
                        lambda backend, device: backend == "cuda" or runs_on(backend, device))
    monkeypatch.setattr(cuda_backend, "_extension", emulated)
    return emulated
