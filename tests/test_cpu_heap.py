"""Tests of ``llm2vec_fast.encoder.cpu_heap``: freed layer buffers stay in a CPU encode process's heap.

Each check runs in a fresh interpreter (mallopt changes the whole process) that allocates and frees
three 8 MiB buffers 100 times, as a layer's MLP does, and counts its minor page faults.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from llm2vec_fast.encoder import cpu_heap

CHURN = textwrap.dedent("""
    import ctypes, ctypes.util, json, resource, sys
    import torch
    from llm2vec_fast.encoder import cpu_heap
    if sys.argv[1] == "retain":
        applied = cpu_heap.retain_freed_memory()
    else:  # glibc's initial thresholds, fixed (its dynamic ones depend on what the process freed before)
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
        applied = bool(mallopt(cpu_heap._M_MMAP_THRESHOLD, 128 * 1024)) and bool(
            mallopt(cpu_heap._M_TRIM_THRESHOLD, 128 * 1024))
    torch.empty(2 << 20).fill_(1.0)  # warm up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(100):  # a layer's MLP: three 8 MiB float32 buffers, written in full, then freed
        buffers = [torch.empty(2 << 20).fill_(1.0) for _ in range(3)]
        del buffers
    print(json.dumps({"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
""")


def _churn(mode: str, **env) -> dict:
    result = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, timeout=120,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc (Linux)")
def test_freed_buffers_are_reused_instead_of_page_faulted_in_again():
    plain = _churn("glibc-defaults")
    retained = _churn("retain")
    assert plain["applied"] is True and retained["applied"] is True
    # 100 x 24 MiB = 614,400 pages when every buffer is faulted in anew; retained, only the first ones
    assert plain["faults"] > 500_000, plain
    assert retained["faults"] < 20_000, (plain, retained)


def test_the_environment_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpu_heap.ENV, "0")
    assert cpu_heap.retain_freed_memory() is False


def test_the_encode_command_retains_on_the_cpu(monkeypatch, tmp_path):
    from llm2vec_fast.encoder import files
    calls = []
    monkeypatch.setattr(cpu_heap, "retain_freed_memory", lambda: calls.append(1) or True)

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop
    import llm2vec_fast.encoder.llm2vec as llm2vec_module
    monkeypatch.setattr(llm2vec_module.LLM2Vec, "from_pretrained", staticmethod(stop))
    (tmp_path / "in.txt").write_text("a text\n", encoding="utf-8")  # the options are checked before the model loads
    parser = __import__("argparse").ArgumentParser()
    files.add_arguments(parser)
    args = parser.parse_args(["--model", str(tmp_path), "--input", str(tmp_path / "in.txt"), "--output",
                              str(tmp_path / "out"), "--device", "cpu"])
    with pytest.raises(Stop):
        files.run(args)
    assert calls == [1]
