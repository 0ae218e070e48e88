"""Triton kernels: pure functions on tensors, no model knowledge.

Installed as ``llm2vec_fast.kernels`` (never as a top-level ``kernels``: Hugging Face's ``kernels``
package owns that import name). Each kernel module lists the configs it ships in ``AOT_CONFIGS`` so
that ``llm2vec_fast.tools.aot_check`` can compile every one of them for sm_90 without a GPU.
"""
