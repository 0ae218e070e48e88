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
