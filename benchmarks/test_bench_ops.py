"""pytest-benchmark entry points over the quick cases: ``pytest benchmarks/ --benchmark-only``.

One test per (case, impl) of the quick sizes, on CUDA when visible, else on the CPU. An impl that
cannot run here is skipped with its reason. Nothing asserts speed: the numbers are for reading
(``--benchmark-json``/``--benchmark-compare``); ``benchmarks/run.py`` writes the results files.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks import bench_attention, bench_loss, bench_pool, harness

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _params():
    params = []
    for module in (bench_attention, bench_pool, bench_loss):
        for case in module.cases(quick=True, device=DEVICE):
            for name, setup in case.impls:
                params.append(pytest.param(case, name, setup, id=f"{case.op}-{name}-{case.shape}"))
    return params


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case,impl,setup", _params())
def test_bench(benchmark, case, impl, setup):
    try:
        timed = setup()
        fn = timed.total if isinstance(timed, harness.Differential) else timed
        harness.warm_up(fn, DEVICE)
    except Exception as error:  # an impl that cannot run here (no GPU, no flash-attn, ...)
        pytest.skip(f"{impl}: {type(error).__name__}: {str(error).strip()[:200]}")
    benchmark.group = f"{case.op} {case.shape}"
    benchmark.extra_info.update(op=case.op, impl=impl, shape=case.shape, dtype=harness.dtype_name(case.dtype),
                                flops=case.flops, nbytes=case.nbytes)

    def call():
        out = fn()
        harness.synchronize(DEVICE)
        return out

    benchmark(call)
