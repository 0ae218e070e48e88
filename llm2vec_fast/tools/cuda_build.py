"""Build the CUDA extension from ``csrc/`` with nvcc on a CPU-only machine, then import it.

No GPU and no CUDA driver are needed: only a CUDA build of torch, a CUDA toolkit (nvcc) and ninja.

The recipe (see DESIGN.md, "Proving GPU code without a GPU"):

- ``CUDA_HOME`` is the toolkit root, by default ``/usr/local/cuda``. torch's own guess follows the
  ``nvcc`` on PATH, which on our machines is a wrapper script in ``/usr/local/bin``, so it lands on
  ``/usr/local`` and the link fails on ``-lcudart``. torch reads ``CUDA_HOME`` once, when
  ``torch.utils.cpp_extension`` is imported, so :func:`configure_torch_cuda_home` also corrects the value
  that module has already cached.
- ``site-packages/nvidia/cu13/include`` (from the ``nvidia-*-cu13`` wheels torch depends on) is added to
  the include path, for ``cusparse.h`` and friends that the toolkit install lacks.
- ``TORCH_CUDA_ARCH_LIST`` defaults to ``9.0a`` (wgmma needs the ``a`` variant); ``MAX_JOBS`` sets the
  ninja parallelism.

``setup.py`` uses :func:`find_cuda_home` and :func:`extension_kwargs`; CI uses::

    python -m llm2vec_fast.tools.cuda_build [--sources DIR] [--name NAME] [--build-dir DIR] [--verbose]

which exits 0 when ``csrc/`` has no sources, 1 when the build or the import fails, and prints the
imported module's path on success.
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import os
import shutil
import site
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

DEFAULT_ARCH_LIST = "9.0a"
DEFAULT_CUDA_HOME = "/usr/local/cuda"
NOTHING_TO_BUILD = "cuda_build: {label} has no sources; nothing to build"

NVCC_FLAGS_BASE = [
    "-O3",
    "--use_fast_math",
    "-lineinfo",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    # torch defines these to keep its own half types unambiguous; our kernels use cuda_fp16/bf16 math
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
]


def cxx_std() -> str:
    """The C++ standard the installed torch's headers need: ``c++20`` (torch 2.14 refuses anything
    older in ATen.h) or ``c++17`` (older torch, e.g. 2.11 on the GPU machine).

    torch's extension builder already passes its own ``-std``; ours comes later on the command line
    and wins, so it must never be older than torch's. Read from the headers, not the version number.
    """
    spec = importlib.util.find_spec("torch")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        aten = os.path.join(loc, "include", "ATen", "ATen.h")
        try:
            with open(aten) as f:
                head = f.read(4096)
        except OSError:
            continue
        return "c++20" if ("202002L" in head or "C++20" in head) else "c++17"
    return "c++17"


def compile_flags() -> Dict[str, List[str]]:
    """``{"cxx": [...], "nvcc": [...]}``: -O3, the C++ standard of :func:`cxx_std`, fast math, line info;
    the bindings also get the torch and CUDA versions they are built against (``_C.build_info``)."""
    import torch
    std = f"-std={cxx_std()}"
    versions = [f"-DL2VF_TORCH_VERSION={torch.__version__}", f"-DL2VF_CUDA_VERSION={torch.version.cuda}"]
    return {"cxx": ["-O3", std, *versions], "nvcc": [NVCC_FLAGS_BASE[0], std, *NVCC_FLAGS_BASE[1:]]}


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit root: ``$CUDA_HOME`` if set, else ``/usr/local/cuda`` if it has ``bin/nvcc``, else None.

    Deliberately not torch's guess (the parent of the ``nvcc`` found on PATH): that ``nvcc`` may be a
    wrapper script outside the toolkit.
    """
    env = os.environ.get("CUDA_HOME")
    if env:
        return env
    if os.path.isfile(os.path.join(DEFAULT_CUDA_HOME, "bin", "nvcc")):
        return DEFAULT_CUDA_HOME
    return None


def _site_dirs() -> List[str]:
    dirs: List[str] = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(str(Path(p).parent) for p in spec.submodule_search_locations)
    try:
        dirs.extend(site.getsitepackages())
    except AttributeError:  # pragma: no cover - virtualenv's old site module
        pass
    user = site.getusersitepackages() if hasattr(site, "getusersitepackages") else None
    if user:
        dirs.append(user)
    dirs.extend(p for p in sys.path if p.endswith("site-packages"))
    seen, out = set(), []
    for d in dirs:
        if d and d not in seen:
            seen.add(d)
            out.append(d)
    return out


def nvidia_include_dirs() -> List[str]:
    """``<site-packages>/nvidia/cu13/include`` where it exists (cusparse.h and other CUDA headers)."""
    for d in _site_dirs():
        inc = os.path.join(d, "nvidia", "cu13", "include")
        if os.path.isdir(inc):
            return [inc]
    return []


def configure_torch_cuda_home(cuda_home: Optional[str] = None) -> Optional[str]:
    """Sets ``CUDA_HOME`` for torch's extension builder, including the copy it cached on import."""
    cuda_home = cuda_home or find_cuda_home()
    if cuda_home is None:
        return None
    os.environ["CUDA_HOME"] = cuda_home
    ext = sys.modules.get("torch.utils.cpp_extension")
    if ext is not None and getattr(ext, "CUDA_HOME", None) != cuda_home:
        ext.CUDA_HOME = cuda_home
    return cuda_home


def extension_kwargs() -> Dict[str, object]:
    """Keyword arguments for ``torch.utils.cpp_extension.CUDAExtension(name, sources, **kwargs)``.

    Also points torch's extension builder at :func:`find_cuda_home` (see :func:`configure_torch_cuda_home`).
    """
    cuda_home = configure_torch_cuda_home()
    kwargs: Dict[str, object] = {
        "include_dirs": nvidia_include_dirs(),
        "extra_compile_args": compile_flags(),
    }
    if cuda_home is not None:
        lib64 = os.path.join(cuda_home, "lib64")
        if os.path.isdir(lib64):
            kwargs["library_dirs"] = [lib64]
    return kwargs


def _repo_csrc() -> Path:
    return Path(__file__).resolve().parents[2] / "csrc"


def _resolve_sources_dir(sources_dir) -> Path:
    p = Path(sources_dir)
    if p.is_dir() or p.is_absolute():
        return p
    repo = _repo_csrc()
    if str(sources_dir).rstrip("/") == "csrc" and repo.is_dir():
        return repo
    return p


def list_sources(sources_dir="csrc") -> List[str]:
    """The ``*.cu`` and ``*.cpp`` files of ``sources_dir`` (not recursive), as ``setup.py`` collects them."""
    d = _resolve_sources_dir(sources_dir)
    return sorted(glob.glob(os.path.join(str(d), "*.cu")) + glob.glob(os.path.join(str(d), "*.cpp")))


def _ensure_ninja_on_path() -> Optional[str]:
    """torch runs ``ninja`` from PATH; the pip ``ninja`` package puts it next to the interpreter,
    which is not on PATH when a venv's python is run without activating the venv."""
    found = shutil.which("ninja")
    if found:
        return found
    candidates = [os.path.dirname(sys.executable)]
    try:
        import ninja  # the PyPI package

        candidates.insert(0, getattr(ninja, "BIN_DIR", ""))
    except ImportError:
        pass
    for d in candidates:
        if d and os.path.isfile(os.path.join(d, "ninja")):
            os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")
            return os.path.join(d, "ninja")
    return None


def _tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def build(sources_dir="csrc", name: str = "llm2vec_fast_C_check", build_dir: Optional[str] = None,
          verbose: bool = False):
    """Builds the ``*.cu``/``*.cpp`` files of ``sources_dir`` into extension ``name`` and imports it.

    Returns the imported module, or None (after saying so) when there are no sources. Raises
    RuntimeError on a CPU-only torch, a missing toolkit, or a failed build/import; the message ends
    with the tail of the compiler output. ``build_dir`` defaults to a fresh temporary folder.
    """
    sources = list_sources(sources_dir)
    if not sources:
        print(NOTHING_TO_BUILD.format(label=_label(sources_dir)))
        return None

    import torch

    if torch.version.cuda is None:
        raise RuntimeError(
            f"cuda_build: torch {torch.__version__} is a CPU-only build and cannot build CUDA code "
            "(its c10/cuda headers are missing); install a CUDA build, e.g. torch==2.14.1 (cu130)")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("cuda_build: no CUDA toolkit found; set CUDA_HOME to the toolkit root "
                           f"(the folder holding bin/nvcc; default {DEFAULT_CUDA_HOME})")
    if not os.path.isfile(os.path.join(cuda_home, "bin", "nvcc")):
        raise RuntimeError(f"cuda_build: CUDA_HOME={cuda_home} has no bin/nvcc")
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    configure_torch_cuda_home(cuda_home)  # before the import below, so torch never guesses
    if _ensure_ninja_on_path() is None:
        raise RuntimeError("cuda_build: ninja not found (pip install ninja)")

    from torch.utils import cpp_extension

    kwargs = extension_kwargs()  # also sets CUDA_HOME for cpp_extension
    if build_dir is None:
        build_dir = tempfile.mkdtemp(prefix=f"{name}_build_")
    os.makedirs(build_dir, exist_ok=True)
    extra_ldflags = [f"-L{d}" for d in kwargs.get("library_dirs", [])]
    try:
        module = cpp_extension.load(
            name=name,
            sources=sources,
            extra_cflags=kwargs["extra_compile_args"]["cxx"],
            extra_cuda_cflags=kwargs["extra_compile_args"]["nvcc"],
            extra_ldflags=extra_ldflags,
            extra_include_paths=kwargs["include_dirs"],
            build_directory=build_dir,
            verbose=verbose,
            with_cuda=True,
        )
    except Exception as e:  # RuntimeError from ninja, ImportError from the import, OSError...
        raise RuntimeError(
            f"cuda_build: building/importing extension {name!r} from {len(sources)} source(s) in "
            f"{build_dir} failed ({type(e).__name__}). CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}, torch {torch.__version__}.\n"
            f"compiler output (tail):\n{_tail(str(e))}") from e
    return module


def _label(sources_dir) -> str:
    s = str(sources_dir)
    return s if s.endswith("/") else s + "/"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llm2vec_fast.tools.cuda_build",
                                 description="Build the CUDA extension from csrc/ (no GPU needed) and import it.")
    ap.add_argument("--sources", default="csrc", metavar="DIR", help="folder of *.cu/*.cpp (default: csrc/)")
    ap.add_argument("--name", default="llm2vec_fast_C_check", help="extension module name")
    ap.add_argument("--build-dir", default=None, help="build folder (default: a new temporary folder)")
    ap.add_argument("--verbose", "-v", action="store_true", help="show the ninja/compiler output")
    args = ap.parse_args(argv)

    if args.sources != "csrc" and not Path(args.sources).is_dir():
        print(f"cuda_build: no such directory: {args.sources}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    try:
        module = build(args.sources, name=args.name, build_dir=args.build_dir, verbose=args.verbose)
    except RuntimeError as e:
        print(str(e), file=sys.stderr)
        print(f"cuda_build: FAILED after {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return 1
    if module is None:
        return 0
    print(f"cuda_build: built and imported {module.__name__} from {module.__file__} "
          f"in {time.perf_counter() - t0:.0f} s ({module.build_info})")
    import torch
    expected = f"torch {torch.__version__}, CUDA {torch.version.cuda}"
    if module.build_info != expected:
        print(f"cuda_build: FAILED: the extension says it was built with {module.build_info!r}, expected "
              f"{expected!r}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
