"""Triton kernels: pure functions on tensors, no model knowledge.

Installed as ``llm2vec_fast.kernels`` (never as a top-level ``kernels``: Hugging Face's ``kernels``
package owns that import name). Each kernel module lists the configs it ships in ``AOT_CONFIGS`` so
that ``llm2vec_fast.tools.aot_check`` can compile every one of them for sm_90 without a GPU.

``AOT_CONFIGS`` is a list (or a zero-argument callable returning one) of
``llm2vec_fast.tools.aot_check.KernelConfig(fn, signature, constexprs, num_warps, num_stages, matrix,
name)``; ``python -m llm2vec_fast.tools.aot_check`` fails on compile errors, register spills, shared
memory over 227 KB and ``matrix=True`` configs without wgmma. Pointer and integer arguments are
assumed divisible by 16 unless ``divisible_by_16`` names the ones that are.
"""

if __name__ == "kernels":
    # This folder was imported as a top-level ``kernels``: a source checkout's root is on sys.path (``python -m``
    # from the repo root). That name is Hugging Face's package, which transformers imports when it is installed;
    # hand the name over to it (the import system returns what ``sys.modules["kernels"]`` holds after this runs).
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    _checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _elsewhere = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _checkout]
    _spec = _machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        del _sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (llm2vec-fast's kernels/ folder is "
                                  "llm2vec_fast.kernels, not a top-level package)", name="kernels")
    _module = _util.module_from_spec(_spec)
    _sys.modules["kernels"] = _module
    _spec.loader.exec_module(_module)
