"""CI tools that prove GPU code without a GPU.

- ``python -m llm2vec_fast.tools.aot_check``: compiles every shipped Triton kernel config for sm_90a
  ahead of time and fails on compile errors, register spills, shared memory over the Hopper limit and
  matrix kernels without wgmma.
- ``python -m llm2vec_fast.tools.cuda_build``: builds the CUDA extension from ``csrc/`` with nvcc on a
  CPU-only machine and imports it.

Neither module imports torch or triton at import time (they do so inside the functions that need them).
"""
