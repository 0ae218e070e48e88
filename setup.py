"""Build for llm2vec-fast.

The pure-Python package (with the Triton kernels in ``kernels/`` shipped as ``llm2vec_fast.kernels``)
always installs. The optional CUDA extension ``llm2vec_fast._C`` is built from ``csrc/`` only when
``csrc/`` has sources, torch is importable in the build environment (``--no-build-isolation``), torch
is a CUDA build and a CUDA toolkit is found; otherwise it is skipped with one line on stderr.

Environment: ``TORCH_CUDA_ARCH_LIST`` (default ``9.0a``, needed for wgmma), ``MAX_JOBS`` (ninja
parallelism), ``CUDA_HOME`` (default ``/usr/local/cuda`` when it exists).
"""
import glob
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extension():
    """Returns (ext_modules, cmdclass) for the CUDA extension, or ([], {}) with a one-line reason."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cu")) + glob.glob(os.path.join("csrc", "*.cpp")))
    if not sources:
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("llm2vec-fast: torch not importable in the build (use --no-build-isolation); "
              "skipping the CUDA extension", file=sys.stderr)
        return [], {}
    from llm2vec_fast.tools.cuda_build import extension_kwargs, find_cuda_home

    cuda_home = find_cuda_home()
    if torch.version.cuda is None or cuda_home is None:
        print("llm2vec-fast: no CUDA toolkit or CPU-only torch; skipping the CUDA extension "
              "(backend='cuda' will be unavailable)", file=sys.stderr)
        return [], {}
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0a")
    ext = cpp_extension.CUDAExtension("llm2vec_fast._C", sources, **extension_kwargs())
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


sys.path.insert(0, HERE)  # so that llm2vec_fast.tools.cuda_build is importable before install
ext_modules, cmdclass = cuda_extension()

setup(
    name="llm2vec-fast",
    version="0.1.0",
    description="Fast LLM2Vec encoding and training: Triton/CUDA kernels for bidirectional attention, "
                "pooling and contrastive loss",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["llm2vec_fast", "llm2vec_fast.*"]) + ["llm2vec_fast.kernels"],
    package_dir={"llm2vec_fast": "llm2vec_fast", "llm2vec_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.6,<3",
        "triton>=3.2; platform_system == 'Linux'",
        "transformers>=5.0,<6",
        "peft>=0.13",
        "numpy>=1.24",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6", "ninja", "sentence-transformers>=5",
                 "mteb>=2,<3"],
        "bench": ["matplotlib>=3.7", "pytest-benchmark>=4"],
        "mteb": ["mteb>=2,<3", "sentence-transformers>=5"],
        "flash": ["flash-attn>=2.6"],
        "liger": ["liger-kernel>=0.5"],
    },
    entry_points={"console_scripts": ["llm2vec-fast=llm2vec_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
