"""Registers the accelerated backends (triton, cuda, flash_attn) of each op where they exist.

Each kernel module registers itself through ``dispatch.register(op, backend, forward, backward)``
with the same forward/backward contract as the reference in ``llm2vec_fast.reference``. No
accelerated kernel has landed yet: every op runs on the torch reference.
"""
