"""Ahead-of-time compile of the shipped Triton kernel configs for Hopper (sm_90a), without a GPU.

Convention: a Triton kernel module under ``kernels/`` (shipped as ``llm2vec_fast.kernels``) lists the
configs it ships in a module-level ``AOT_CONFIGS``: a list (or a callable returning a list) of
:class:`KernelConfig`::

    from llm2vec_fast.tools.aot_check import KernelConfig

    AOT_CONFIGS = [
        KernelConfig(_attn_fwd, signature={"Q": "*bf16", "K": "*bf16", ..., "stride_qm": "i32"},
                     constexprs={"BLOCK_M": 128, "BLOCK_N": 64, "HEAD_DIM": 128},
                     num_warps=8, num_stages=3, matrix=True, name="attn_fwd_d128_bf16"),
    ]

Each config is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))``;
the PTX is then run through the ``ptxas`` that ships in triton's wheel (``-v --gpu-name=sm_90a``) to
read registers and spill bytes. A config fails on:

- ``compile``: any error while compiling (Python/Triton type errors, MLIR/LLVM/ptxas failures);
- ``spill``: any spill store or spill load reported by ptxas;
- ``shared``: shared memory (triton's ``metadata.shared``) above 227 KB (232448 bytes, the sm_90
  per-block opt-in limit);
- ``wgmma``: a config marked ``matrix=True`` whose PTX has no ``wgmma.mma_async`` instruction;
- ``ptxas``: ptxas could not be run on the PTX, so spills are unknown;
- ``import`` / ``config``: the module could not be imported or ``AOT_CONFIGS`` holds something that is
  not a config.

Argument alignment: the Triton runtime specialises pointers aligned to 16 bytes and integers
divisible by 16 (``tt.divisibility``), which decides vectorisation and software pipelining. By default
every pointer and integer argument is assumed divisible by 16 (what LLM shapes give in production);
``KernelConfig.divisible_by_16`` lists the argument names explicitly when that is wrong.

CLI::

    python -m llm2vec_fast.tools.aot_check [--paths FILE_OR_DIR ...] [--json OUT] [--jobs N] [--verbose]

exits 0 when every config passes (or none is found), 1 on any failure.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

TARGET_ARCH = 90
GPU_NAME = "sm_90a"
SHARED_LIMIT_BYTES = 232448  # 227 KB: max dynamic shared memory per block on sm_90 (opt-in)
NO_CONFIGS_LINE = "aot_check: no shipped Triton kernel configs found"

_INT_TYPES = ("i1", "i8", "i16", "i32", "i64", "u1", "u8", "u16", "u32", "u64")


@dataclass
class KernelConfig:
    """One shipped launch configuration of a Triton kernel.

    fn: the ``@triton.jit`` function (an autotuned/heuristics wrapper or an interpreter-mode function
        is unwrapped to its Python source and recompiled).
    signature: argument name -> Triton type string (``"*fp16"``, ``"*bf16"``, ``"i32"``, ``"fp32"``...).
        Constexpr arguments may be left out; they are filled in from ``constexprs``.
    constexprs: constexpr argument name -> value (block sizes, head dim, flags, ``tl.float16``...).
    num_warps, num_stages: as in ``triton.Config``.
    matrix: True for a kernel whose hot loop is a ``tl.dot``; it must then compile to wgmma.
    name: label in the report (default: derived from the function and the constexprs).
    divisible_by_16: argument names to mark ``tt.divisibility=16``; None means every pointer and
        integer argument.
    options: extra compile options (``maxnreg``, ``num_ctas``, ...).
    """

    fn: Any
    signature: Dict[str, str]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 3
    matrix: bool = False
    name: Optional[str] = None
    divisible_by_16: Optional[Sequence[str]] = None
    options: Dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.name:
            return self.name
        fn_name = getattr(self.fn, "__name__", None) or getattr(getattr(self.fn, "fn", None), "__name__", "kernel")
        consts = ",".join(f"{k}={v}" for k, v in self.constexprs.items())
        return f"{fn_name}[{consts}|w{self.num_warps}s{self.num_stages}]"


@dataclass
class ConfigResult:
    """The outcome of one config. ``failed_checks`` holds the names of the checks that failed."""

    module: str
    name: str
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    matrix: bool = False
    registers: Optional[int] = None
    spill_stores: Optional[int] = None
    spill_loads: Optional[int] = None
    shared: Optional[int] = None
    wgmma: Optional[bool] = None
    compile_s: Optional[float] = None
    failed_checks: List[str] = field(default_factory=list)
    messages: List[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        return not self.failed_checks

    @property
    def spill_bytes(self) -> Optional[int]:
        if self.spill_stores is None or self.spill_loads is None:
            return None
        return self.spill_stores + self.spill_loads

    def fail(self, check: str, message: str) -> None:
        if check not in self.failed_checks:
            self.failed_checks.append(check)
        self.messages.append(f"{check}: {message}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ok"] = self.ok
        d["spill_bytes"] = self.spill_bytes
        return d


@dataclass
class AotReport:
    results: List[ConfigResult] = field(default_factory=list)

    @property
    def failures(self) -> List[str]:
        """One line per failed check: ``"<module>:<config>: <check>: <detail>"``."""
        return [f"{r.module}:{r.name}: {m}" for r in self.results for m in r.messages]

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results)

    def to_dict(self) -> dict:
        return {
            "target": GPU_NAME,
            "triton": _triton_version(),
            "shared_limit_bytes": SHARED_LIMIT_BYTES,
            "ok": self.ok,
            "failures": self.failures,
            "results": [r.to_dict() for r in self.results],
        }


# ----------------------------------------------------------------------------------------------------
# locating and importing kernel modules
# ----------------------------------------------------------------------------------------------------

def _triton_version() -> Optional[str]:
    try:
        import triton
        return triton.__version__
    except Exception:  # pragma: no cover - triton missing
        return None


@contextlib.contextmanager
def _triton_interpret_off():
    """``@triton.jit`` under TRITON_INTERPRET=1 builds interpreter functions that cannot be compiled."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = old


def _installed_kernels_dir() -> Optional[Path]:
    try:
        with _triton_interpret_off():
            mod = importlib.import_module("llm2vec_fast.kernels")
    except ImportError:
        return None
    paths = list(getattr(mod, "__path__", []))
    return Path(paths[0]).resolve() if paths else None


def _repo_kernels_dir() -> Path:
    # llm2vec_fast/tools/aot_check.py -> repo root is two folders above the package
    return Path(__file__).resolve().parents[2] / "kernels"


def default_kernels_dir() -> Optional[Path]:
    """The shipped kernels folder: the installed ``llm2vec_fast.kernels`` or the repo's ``kernels/``."""
    d = _installed_kernels_dir()
    if d is not None and d.is_dir():
        return d
    d = _repo_kernels_dir()
    return d if d.is_dir() else None


def _exec_module(spec):
    """Runs a module from its spec under its name in sys.modules, leaving no half-made module behind."""
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(spec.name, None)
        raise
    return mod


def _register_package(pkg_name: str, directory: Path):
    if pkg_name in sys.modules:
        return sys.modules[pkg_name]
    init = directory / "__init__.py"
    return _exec_module(importlib.util.spec_from_file_location(pkg_name, init,
                                                               submodule_search_locations=[str(directory)]))


def _import_file(path: Path):
    """Imports a kernel module given by path, as part of its package when it has one."""
    path = path.resolve()
    directory = path.parent
    stem = path.stem
    installed = _installed_kernels_dir()
    if installed is not None and directory == installed:
        pkg = "llm2vec_fast.kernels"
    elif installed is None and directory == _repo_kernels_dir().resolve():
        pkg = "llm2vec_fast.kernels"  # repo checkout without `pip install -e .`
        _register_package(pkg, directory)
    elif (directory / "__init__.py").exists():
        pkg = "_aot_check_pkg_" + hashlib.sha1(str(directory).encode()).hexdigest()[:12]
        _register_package(pkg, directory)
    else:
        name = "_aot_check_mod_" + hashlib.sha1(str(path).encode()).hexdigest()[:12] + "_" + stem
        if name in sys.modules:
            return sys.modules[name]
        return _exec_module(importlib.util.spec_from_file_location(name, path))
    return importlib.import_module(pkg if stem == "__init__" else f"{pkg}.{stem}")


def _module_files(paths: Iterable[os.PathLike]) -> List[Path]:
    files: List[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*.py") if "__pycache__" not in f.parts))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"aot_check: no such file or directory: {p}")
    seen, out = set(), []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            out.append(f)
    return out


def _as_config(obj) -> KernelConfig:
    if isinstance(obj, KernelConfig):
        return obj
    if isinstance(obj, dict):
        return KernelConfig(**obj)
    # duck typing: the same dataclass imported under another module name (e.g. ``__main__``)
    if hasattr(obj, "fn") and hasattr(obj, "signature"):
        kw = {f.name: getattr(obj, f.name) for f in dataclasses.fields(KernelConfig) if hasattr(obj, f.name)}
        return KernelConfig(**kw)
    raise TypeError(f"AOT_CONFIGS entry of type {type(obj).__name__} is not a KernelConfig")


def _load_entries(paths: Optional[Sequence[os.PathLike]]
                  ) -> Tuple[List[Tuple[str, str, int, KernelConfig]], List[ConfigResult]]:
    """([(file, module_label, index_in_file, config)], [failed results of modules that did not load])."""
    if paths is None:
        d = default_kernels_dir()
        paths = [d] if d is not None else []
    entries: List[Tuple[str, str, int, KernelConfig]] = []
    broken: List[ConfigResult] = []
    for f in _module_files(paths):
        label = f.stem if f.stem != "__init__" else f.parent.name
        try:
            with _triton_interpret_off():
                mod = _import_file(f)
        except BaseException as e:  # SyntaxError, ImportError, triton errors at decoration time...
            if isinstance(e, KeyboardInterrupt):
                raise
            r = ConfigResult(module=label, name="<import>", error=_format_exc(e))
            r.fail("import", _one_line(e))
            broken.append(r)
            continue
        items = getattr(mod, "AOT_CONFIGS", None)
        if items is None:
            continue
        try:
            if callable(items):
                with _triton_interpret_off():
                    items = items()
            for i, item in enumerate(items):
                entries.append((str(f), label, i, _as_config(item)))
        except Exception as e:
            r = ConfigResult(module=label, name="<AOT_CONFIGS>", error=_format_exc(e))
            r.fail("config", _one_line(e))
            broken.append(r)
    return entries, broken


def load_configs(paths: Optional[Sequence[os.PathLike]] = None
                 ) -> Tuple[List[Tuple[str, KernelConfig]], List[ConfigResult]]:
    """Imports the kernel modules under ``paths`` (default: the shipped kernels folder).

    Returns ``([(module_label, config), ...], [failed ConfigResult for modules that did not load])``.
    """
    entries, broken = _load_entries(paths)
    return [(label, cfg) for _, label, _, cfg in entries], broken


# ----------------------------------------------------------------------------------------------------
# compiling and measuring
# ----------------------------------------------------------------------------------------------------

def _format_exc(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _one_line(e, limit: int = 300) -> str:
    text = e if isinstance(e, str) else f"{type(e).__name__}: {e}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("Repro command")]
    if not lines:
        return type(e).__name__ if not isinstance(e, str) else ""
    head = lines[0]
    msg = head if len(lines) == 1 else f"{head} ... {lines[-1]}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _jit_function(fn):
    """Returns a compilable JITFunction for ``fn`` (unwrapping autotuners and interpreter functions)."""
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None or seen > 8:
            raise TypeError(f"{fn!r} is not a @triton.jit function")
        if inspect.isfunction(inner):  # InterpretedFunction (TRITON_INTERPRET=1 at decoration time)
            return JITFunction(inner)
        fn = inner
        seen += 1
    return fn


def _arg_params(jit_fn) -> "Dict[str, inspect.Parameter]":
    return dict(inspect.signature(jit_fn.fn).parameters)


def _build_source(cfg: KernelConfig, jit_fn):
    from triton.compiler import ASTSource

    params = _arg_params(jit_fn)
    names = list(params)
    constexprs = dict(cfg.constexprs)
    unknown = [k for k in list(cfg.signature) + list(constexprs) if k not in params]
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown} for {jit_fn.__name__}({', '.join(names)})")
    signature: Dict[str, str] = {}
    for n in names:
        if n in cfg.signature:
            signature[n] = cfg.signature[n]
        elif n in constexprs:
            signature[n] = "constexpr"
        elif params[n].default is not inspect.Parameter.empty:
            constexprs[n] = params[n].default
            signature[n] = "constexpr"
        else:
            raise ValueError(f"argument {n!r} of {jit_fn.__name__} has no type in signature and no constexpr value")
    for n in constexprs:
        signature[n] = "constexpr"

    if cfg.divisible_by_16 is None:
        aligned = [n for n, t in signature.items()
                   if isinstance(t, str) and (t.startswith("*") or t in _INT_TYPES)]
    else:
        aligned = list(cfg.divisible_by_16)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}

    # ASTSource's third parameter is called `constexprs` in recent triton and `constants` in older
    # releases; passing it by position works for both.
    try:
        return ASTSource(jit_fn, signature, constexprs, attrs)
    except TypeError:
        return ASTSource(jit_fn, signature, constexprs)


def _gpu_target():
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # pragma: no cover - older layout
        from triton.compiler import GPUTarget
    return GPUTarget("cuda", TARGET_ARCH, 32)


def _bundled_tool(name: str) -> Optional[str]:
    import triton

    p = Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin" / name
    return str(p) if p.is_file() and os.access(p, os.X_OK) else None


def ptxas_path() -> Optional[str]:
    """The ptxas that triton itself uses for sm_90 (its wheel's, unless TRITON_PTXAS_PATH says otherwise)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        try:
            tool = get_ptxas(TARGET_ARCH)
        except TypeError:
            tool = get_ptxas()
        if getattr(tool, "path", None):
            return tool.path
    except Exception:
        pass
    return _bundled_tool("ptxas") or shutil.which("ptxas")


def _triton_ptxas_flags() -> List[str]:
    """Flags triton passes to ptxas that change register allocation (mirrored for exact numbers)."""
    flags = ["-lineinfo"]
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        if "--regAllocOptLevel=2" in inspect.getsource(CUDABackend.make_cubin):
            flags.append("--regAllocOptLevel=2")
    except Exception:
        pass
    return flags


_SPILL_RE = re.compile(r"(\d+)\s+bytes spill stores,\s*(\d+)\s+bytes spill loads")
_REGS_RE = re.compile(r"Used\s+(\d+)\s+registers")


def parse_ptxas_log(log: str) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(registers, spill store bytes, spill load bytes) from ``ptxas -v`` output (max/sum over functions)."""
    regs = [int(m) for m in _REGS_RE.findall(log)]
    spills = _SPILL_RE.findall(log)
    return (max(regs) if regs else None,
            sum(int(s) for s, _ in spills) if spills else None,
            sum(int(l) for _, l in spills) if spills else None)


def ptxas_resource_usage(ptx: str, extra_options: Sequence[str] = ()) -> Tuple[int, int, int, str]:
    """Runs ptxas -v on ``ptx`` for sm_90a. Returns (registers, spill_stores, spill_loads, log)."""
    exe = ptxas_path()
    if exe is None:
        raise RuntimeError("no ptxas found (triton's wheel ships one in triton/backends/nvidia/bin)")
    with tempfile.TemporaryDirectory(prefix="aot_check_") as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        base = [exe, "-v", f"--gpu-name={GPU_NAME}"]
        out = os.path.join(tmp, "kernel.cubin")
        flags = _triton_ptxas_flags() + list(extra_options)
        proc = subprocess.run(base + flags + [src, "-o", out], capture_output=True, text=True)
        if proc.returncode != 0 and "--regAllocOptLevel=2" in flags:  # an older ptxas without the flag
            flags = [f for f in flags if f != "--regAllocOptLevel=2"]
            proc = subprocess.run(base + flags + [src, "-o", out], capture_output=True, text=True)
    log = (proc.stdout or "") + (proc.stderr or "")
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed with exit code {proc.returncode}:\n{log[-4000:]}")
    regs, stores, loads = parse_ptxas_log(log)
    if regs is None or stores is None:
        raise RuntimeError(f"could not parse ptxas -v output:\n{log[-2000:]}")
    return regs, stores, loads, log


_WGMMA_RE = re.compile(r"\bwgmma\.mma_async\b")


def has_wgmma(ptx: str) -> bool:
    return bool(_WGMMA_RE.search(ptx))


def triton_loaded_for_the_interpreter() -> bool:
    """Whether this process imported ``triton.language`` under TRITON_INTERPRET=1 (make test does, for the
    kernels' parity tests). Its library functions (``tl.cdiv``...) are then interpreter functions, which the
    code generator cannot compile: a compile that misses triton's cache fails, so it runs in a fresh process."""
    standard = sys.modules.get("triton.language.standard")
    if standard is None:
        return False
    from triton.runtime.jit import JITFunction

    return not isinstance(getattr(standard, "cdiv", None), JITFunction)


def check_config(cfg: KernelConfig, module: str = "") -> ConfigResult:
    """Compiles one config for sm_90a and applies every check (in a fresh process when
    :func:`triton_loaded_for_the_interpreter`)."""
    if triton_loaded_for_the_interpreter():
        return check_configs([cfg], module).results[0]
    r = ConfigResult(module=module, name=cfg.label, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                     matrix=bool(cfg.matrix))
    t0 = time.perf_counter()
    captured = io.StringIO()
    try:
        import triton

        jit_fn = _jit_function(cfg.fn)
        src = _build_source(cfg, jit_fn)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages, **dict(cfg.options)}
        # triton prints the whole PTX to stdout when ptxas fails; keep the report readable. The code generator
        # reads TRITON_INTERPRET too (constexpr functions return plain values under the interpreter), so a
        # process that runs kernels in the interpreter (make test) must turn it off for the compile.
        with contextlib.redirect_stdout(captured), _triton_interpret_off():
            compiled = triton.compile(src, target=_gpu_target(), options=options)
    except Exception as e:
        r.compile_s = time.perf_counter() - t0
        r.error = _format_exc(e)
        r.fail("compile", _one_line(e))
        return r
    r.compile_s = time.perf_counter() - t0

    ptx = compiled.asm.get("ptx", "") if hasattr(compiled.asm, "get") else compiled.asm["ptx"]
    r.shared = int(getattr(compiled.metadata, "shared", 0) or 0)
    r.wgmma = has_wgmma(ptx)

    ptx_options = getattr(compiled.metadata, "ptx_options", None)
    try:
        regs, stores, loads, _ = ptxas_resource_usage(ptx, ptx_options.split() if ptx_options else ())
        r.registers, r.spill_stores, r.spill_loads = regs, stores, loads
    except Exception as e:
        r.error = _format_exc(e)
        r.fail("ptxas", _one_line(e))

    if r.spill_bytes:
        r.fail("spill", f"{r.spill_stores} bytes spill stores + {r.spill_loads} bytes spill loads "
                        f"({r.registers} registers, num_warps={cfg.num_warps})")
    if r.shared > SHARED_LIMIT_BYTES:
        r.fail("shared", f"{r.shared} bytes of shared memory > {SHARED_LIMIT_BYTES} (227 KB) "
                         f"(num_stages={cfg.num_stages})")
    if cfg.matrix and not r.wgmma:
        r.fail("wgmma", "matrix=True but the PTX has no wgmma.mma_async instruction")
    return r


def check_configs(configs: Iterable, module: str = "") -> AotReport:
    """Checks KernelConfig objects (or ``(module, config)`` pairs). When :func:`triton_loaded_for_the_interpreter`,
    one fresh process compiles them all, each kernel re-imported there from its source file by name."""
    pairs = [(item if isinstance(item, tuple) and len(item) == 2 else (module, item)) for item in configs]
    pairs = [(mod, _as_config(cfg)) for mod, cfg in pairs]
    report = AotReport()
    if not triton_loaded_for_the_interpreter():
        report.results = [check_config(cfg, mod) for mod, cfg in pairs]
        return report
    jobs = []
    for mod, cfg in pairs:
        fn = _jit_function(cfg.fn).fn
        fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(KernelConfig) if f.name != "fn"}
        jobs.append(((inspect.getsourcefile(fn), fn.__name__, fields, mod), mod, cfg))
    report.results = _run_in_workers(_check_named_in_worker, jobs, workers=1)
    return report


def _check_named_in_worker(file: str, fn_name: str, fields: dict, module: str) -> ConfigResult:
    with _triton_interpret_off():
        fn = getattr(_import_file(Path(file)), fn_name)
    return check_config(KernelConfig(fn=fn, **fields), module)


def _check_in_worker(file: str, index: int) -> ConfigResult:
    entries, broken = _load_entries([file])
    if broken:
        return broken[0]
    _, label, _, cfg = entries[index]
    return check_config(cfg, label)


def _run_in_workers(worker, jobs, workers: int) -> List[ConfigResult]:
    """[worker(*args) for (args, module, cfg) in jobs] in ``workers`` spawned processes started with
    TRITON_INTERPRET off; a worker that dies gives a failed "compile" result for its config."""
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: the parent has imported torch/triton and may hold threads
    ctx = multiprocessing.get_context("spawn")
    results = []
    with _triton_interpret_off(), concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        futures = [pool.submit(worker, *args) for args, _, _ in jobs]
        for fut, (_, label, cfg) in zip(futures, jobs):
            try:
                results.append(fut.result())
            except Exception as e:  # a worker died (e.g. killed for memory)
                r = ConfigResult(module=label, name=cfg.label, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages, matrix=bool(cfg.matrix), error=_format_exc(e))
                r.fail("compile", f"worker failed: {_one_line(e)}")
                results.append(r)
    return results


def check(paths: Optional[Sequence[os.PathLike]] = None, jobs: int = 1) -> AotReport:
    """Loads every ``AOT_CONFIGS`` under ``paths`` (default: the shipped kernels) and checks them all.

    ``jobs > 1`` compiles in that many worker processes (each re-imports the kernel modules), as does ``jobs=1``
    in one worker when :func:`triton_loaded_for_the_interpreter`.
    ``report.failures`` lists one line per failed check; ``report.ok`` is False when there is one.
    """
    entries, broken = _load_entries(paths)
    report = AotReport(results=list(broken))
    jobs = max(1, min(int(jobs), len(entries)))
    if jobs == 1 and not triton_loaded_for_the_interpreter():
        report.results += [check_config(cfg, label) for _, label, _, cfg in entries]
        return report
    report.results += _run_in_workers(_check_in_worker, [((f, i), label, cfg) for f, label, i, cfg in entries], jobs)
    return report


# ----------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------

def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


def format_table(results: Sequence[ConfigResult]) -> str:
    header = ["status", "module", "config", "warps", "stages", "regs", "spill_B", "smem_B", "wgmma",
              "matrix", "compile_s", "failed"]
    rows = [header]
    for r in results:
        rows.append(["ok" if r.ok else "FAIL", r.module, r.name, _fmt(r.num_warps), _fmt(r.num_stages),
                     _fmt(r.registers), _fmt(r.spill_bytes), _fmt(r.shared), _fmt(r.wgmma), _fmt(r.matrix),
                     _fmt(r.compile_s), ",".join(r.failed_checks) or "-"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m llm2vec_fast.tools.aot_check",
        description="Compile every shipped Triton kernel config for sm_90a without a GPU and fail on "
                    "compile errors, register spills, shared memory over 227 KB, or matrix kernels "
                    "without wgmma.")
    ap.add_argument("--paths", nargs="+", default=None, metavar="FILE_OR_DIR",
                    help="kernel modules or folders (default: the shipped kernels/ folder)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    ap.add_argument("--jobs", "-j", type=int, default=None,
                    help="parallel compile processes (default: the number of CPUs, at most 16)")
    ap.add_argument("--verbose", "-v", action="store_true", help="print the full error of each failure")
    ap.add_argument("--expect-triton", default=None, metavar="VERSION",
                    help="exit 2 unless the imported triton is this version (guards a side install that did "
                         "not take, e.g. PYTHONPATH=side-folder for the GPU machine's older triton)")
    args = ap.parse_args(argv)
    if args.expect_triton is not None and _triton_version() != args.expect_triton:
        print(f"aot_check: --expect-triton {args.expect_triton}, but the imported triton is "
              f"{_triton_version()}", file=sys.stderr)
        return 2
    jobs = args.jobs if args.jobs is not None else min(os.cpu_count() or 1, 16)

    try:
        report = check(args.paths, jobs=jobs)
    except FileNotFoundError as e:
        print(str(e), file=sys.stderr)
        return 2

    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2, default=str)

    if not report.results:
        print(NO_CONFIGS_LINE)
        return 0

    print(f"aot_check: {len(report.results)} config(s), target {GPU_NAME}, triton {_triton_version()}, "
          f"shared limit {SHARED_LIMIT_BYTES} B")
    print(format_table(report.results))
    if report.ok:
        print("aot_check: all configs passed")
        return 0
    print(f"aot_check: {len(report.failures)} failure(s):")
    for line in report.failures:
        print(f"  {line}")
    for r in report.results:
        if r.error and (args.verbose or "compile" in r.failed_checks or "import" in r.failed_checks):
            tail = "\n".join(r.error.splitlines()[-30:])
            print(f"--- {r.module}:{r.name} ---\n{tail}")
    return 1


if __name__ == "__main__":
    # Run the copy importable as llm2vec_fast.tools.aot_check, not this __main__ copy, so that kernel
    # modules importing KernelConfig and the worker processes all see one module.
    from llm2vec_fast.tools.aot_check import main as _main

    sys.exit(_main())
