"""Tests of ``llm2vec_fast.contrastive_loss`` against a naive float64 oracle (full B x N scores).

Covers hard negatives (none, 0 rows, many), symmetric, scale, dtypes, gradients, exact chunking, the
O((B+N)·D) memory bound, distributed gathering with uneven row counts (2 gloo processes), bad input,
opcheck and torch.compile; GPU parity at real sizes is marked ``gpu``.
"""
from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import llm2vec_fast as lf
from llm2vec_fast import dispatch
from llm2vec_fast.reference import contrastive as ref_contrastive

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DIM = 32


def _randn(*shape, seed, dtype=torch.float32):
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def oracle_loss(q, d_pos, d_neg, scale, symmetric):
    """The naive definition in float64: the full score matrix and F.cross_entropy."""
    q, d_pos = q.double(), d_pos.double()
    d = d_pos if d_neg is None else torch.cat([d_pos, d_neg.double()])
    labels = torch.arange(q.shape[0])
    qn, dn = F.normalize(q, dim=-1), F.normalize(d, dim=-1)
    loss = F.cross_entropy(scale * qn @ dn.t(), labels)
    if symmetric:
        back = F.cross_entropy(scale * F.normalize(d_pos, dim=-1) @ qn.t(), labels)
        loss = 0.5 * (loss + back)
    return loss


def _leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def _f64(*tensors):
    return [None if t is None else t.double() for t in tensors]


def loss_and_grads(fn, q, d_pos, d_neg, **kwargs):
    q, d_pos, d_neg = _leaves(q, d_pos, d_neg)
    loss = fn(q, d_pos, d_neg, **kwargs)
    loss.backward()
    return loss.detach(), q.grad, d_pos.grad, None if d_neg is None else d_neg.grad


def _make(batch, negatives, seed, dtype=torch.float32):
    q = _randn(batch, DIM, seed=seed, dtype=dtype)
    # Positives correlated with their queries, so the loss is not trivially log N.
    d_pos = (q.float() + 0.8 * _randn(batch, DIM, seed=seed + 1)).to(dtype)
    d_neg = None if negatives is None else _randn(negatives, DIM, seed=seed + 2, dtype=dtype)
    return q, d_pos, d_neg


_GRAD_TOLS = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float16: dict(rtol=2e-3, atol=1e-5),
              torch.bfloat16: dict(rtol=1.6e-2, atol=1e-4)}


# ---------------------------------------------------------------------------------------------------
# 1. Parity with the naive float64 oracle: loss and gradients.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("scale", (20.0, 50.0))
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("negatives", (None, 0, 13))
def test_matches_oracle(negatives, symmetric, scale, dtype):
    q, d_pos, d_neg = _make(11, negatives, seed=1, dtype=dtype)
    loss, gq, gp, gn = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, scale=scale, symmetric=symmetric)
    want, wq, wp, wn = loss_and_grads(oracle_loss, *_f64(q, d_pos, d_neg), scale=scale, symmetric=symmetric)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-5)
    for got, expected, name in ((gq, wq, "q"), (gp, wp, "d_pos"), (gn, wn, "d_neg")):
        if expected is None:
            assert got is None
            continue
        if expected.numel() == 0 and got is None:
            continue  # a (0, D) d_neg takes no part in the graph: no gradient is as good as an empty one
        assert got.dtype == dtype and got.shape == expected.shape, name
        torch.testing.assert_close(got.double(), expected, **_GRAD_TOLS[dtype], msg=lambda m: f"grad {name}: {m}")


def test_integer_scale_and_default_scale():
    q, d_pos, d_neg = _make(6, 4, seed=2)
    torch.testing.assert_close(lf.contrastive_loss(q, d_pos, d_neg, scale=20).double(),
                               oracle_loss(q, d_pos, d_neg, 20.0, False), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lf.contrastive_loss(q, d_pos, d_neg).double(),
                               oracle_loss(q, d_pos, d_neg, 20.0, False), rtol=1e-5, atol=1e-5)


def test_zero_row_negatives_equal_no_negatives():
    q, d_pos, _ = _make(9, None, seed=3)
    empty = torch.empty(0, DIM)
    a = loss_and_grads(lf.contrastive_loss, q, d_pos, None, symmetric=True)
    b = loss_and_grads(lf.contrastive_loss, q, d_pos, empty, symmetric=True)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=0)
    torch.testing.assert_close(a[1], b[1], rtol=0, atol=0)
    torch.testing.assert_close(a[2], b[2], rtol=0, atol=0)
    assert b[3] is None or b[3].shape == (0, DIM)


def test_single_row_batch_loss_is_zero_without_negatives():
    q, d_pos, _ = _make(1, None, seed=4)
    loss = lf.contrastive_loss(q, d_pos, symmetric=True)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


def test_cosine_is_scale_invariant_in_inputs():
    q, d_pos, d_neg = _make(7, 5, seed=5)
    a = lf.contrastive_loss(q, d_pos, d_neg, symmetric=True)
    b = lf.contrastive_loss(3.0 * q, 0.25 * d_pos, 7.0 * d_neg, symmetric=True)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_large_scores_are_stable():
    """Scale 1000 (scores up to 1000): logsumexp must not overflow."""
    q, d_pos, d_neg = _make(8, 8, seed=6)
    loss, gq, gp, gn = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, scale=1000.0, symmetric=True)
    want, wq, wp, wn = loss_and_grads(oracle_loss, *_f64(q, d_pos, d_neg), scale=1000.0, symmetric=True)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in (gq, gp, gn))
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(gq.double(), wq, rtol=1e-3, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# 2. Chunking really happens, and is exact.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("chunk_elements", ("uneven", 1))
def test_chunking_is_exact(monkeypatch, symmetric, chunk_elements):
    batch, negatives = 37, 23
    cols = batch + negatives
    q, d_pos, d_neg = _make(batch, negatives, seed=7)
    monkeypatch.setattr(ref_contrastive, "CHUNK_ELEMENTS", 1 << 40)
    whole = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, symmetric=symmetric, scale=50.0)

    # 8 rows of 60 scores per chunk (+5 spare elements): chunks of 8, 8, 8, 8, 5 rows; or 1 row each.
    limit = 8 * cols + 5 if chunk_elements == "uneven" else chunk_elements
    monkeypatch.setattr(ref_contrastive, "CHUNK_ELEMENTS", limit)
    original = ref_contrastive._chunks
    seen = []

    def spy(rows, cols_):
        chunks = original(rows, cols_)
        seen.append((rows, cols_, chunks))
        return chunks

    monkeypatch.setattr(ref_contrastive, "_chunks", spy)
    chunked = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, symmetric=symmetric, scale=50.0)

    # Forward and backward of each direction were chunked.
    assert len(seen) == (4 if symmetric else 2)
    for rows, cols_, chunks in seen:
        assert chunks[0][0] == 0 and chunks[-1][1] == rows
        assert all(a[1] == b[0] for a, b in zip(chunks, chunks[1:])), "chunks must tile the rows"
        sizes = [stop - start for start, stop in chunks]
        if chunk_elements == 1:
            assert sizes == [1] * rows
        else:
            assert all(size * cols_ <= limit for size in sizes)
            assert len(chunks) > 1
    if chunk_elements == "uneven":
        sizes = [stop - start for start, stop in seen[0][2]]
        assert sizes == [8, 8, 8, 8, 5], sizes
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked[0].double(), oracle_loss(q, d_pos, d_neg, 50.0, symmetric),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# 3. Memory: O((B + N)·D), not O(B·N).
# ---------------------------------------------------------------------------------------------------
_MEMORY_SCRIPT = textwrap.dedent("""
    import json, resource, time, torch
    import llm2vec_fast as lf

    def peak():  # ru_maxrss is in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    B, D, NEG = {batch}, {dim}, {negatives}
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, D, generator=g).requires_grad_(True)
    d_pos = torch.randn(B, D, generator=g).requires_grad_(True)
    d_neg = torch.randn(NEG, D, generator=g).requires_grad_(True)
    tiny = [torch.randn(8, D, generator=g).requires_grad_(True) for _ in range(3)]
    lf.contrastive_loss(*tiny).backward()  # warm-up: imports, dispatch, allocator
    before = peak()
    start = time.perf_counter()
    loss = lf.contrastive_loss(q, d_pos, d_neg)
    loss.backward()
    seconds = time.perf_counter() - start
    ok = bool(torch.isfinite(loss)) and all(bool(torch.isfinite(t.grad).all()) for t in (q, d_pos, d_neg))
    print(json.dumps(dict(before=before, after=peak(), seconds=seconds, loss=loss.item(), finite=ok)))
""")


@pytest.mark.slow  # 12 s alone on 2 idle cores, 45 s under load (fwd+bwd is ~1.1 TFLOP on the CPU)
def test_memory_is_linear_not_quadratic():
    batch, dim, negatives = 16384, 256, 16384
    script = _MEMORY_SCRIPT.format(batch=batch, dim=dim, negatives=negatives)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    delta = result["after"] - result["before"]
    gib = float(1 << 30)
    naive_scores = batch * (batch + negatives) * 4  # the fp32 B x N score matrix alone
    inputs_and_grads = 2 * (2 * batch + negatives) * dim * 4
    print(f"\nfwd+bwd B={batch} N={batch + negatives} D={dim}: {result['seconds']:.1f} s, peak rise "
          f"{delta / 2**20:.0f} MiB; naive score matrix {naive_scores / 2**20:.0f} MiB")
    assert result["finite"]
    assert naive_scores > gib, "the naive B x N version must exceed the budget for this test to mean anything"
    assert delta < gib, (f"peak memory rose by {delta / gib:.2f} GiB (limit 1 GiB; inputs + grads are "
                         f"{inputs_and_grads / gib:.2f} GiB); the naive B x N fp32 score matrix alone would be "
                         f"{naive_scores / gib:.2f} GiB")


# ---------------------------------------------------------------------------------------------------
# 4. Distributed: gather=True with uneven row counts equals one process holding the whole batch.
# ---------------------------------------------------------------------------------------------------
WORLD = 2
MISMATCH_TIMEOUT_S = 15  # a collective mismatch (hang) in the "None on one rank" case fails after this


def _run_case(rank, case):
    q, d_pos, d_neg = _leaves(case["q"][rank], case["d_pos"][rank], case["d_neg"][rank])
    loss = lf.contrastive_loss(q, d_pos, d_neg, scale=case["scale"], symmetric=case["symmetric"],
                               gather=case["gather"])
    loss.backward()
    return dict(loss=loss.detach(), q=q.grad, d_pos=d_pos.grad, d_neg=None if d_neg is None else d_neg.grad)


def _dist_worker(rank, out_dir, cases, none_cases):
    """Runs ``cases`` in one gloo group, then ``none_cases`` (one at a time, each in a fresh group with a
    short timeout, since a collective mismatch hangs until it); saves results or error strings."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    results = dict(cases=[], none_cases=[])
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(out_dir, "store"), WORLD), rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    for case in cases:
        results["cases"].append(_run_case(rank, case))
    dist.barrier()
    dist.destroy_process_group()
    for index, case in enumerate(none_cases):
        store = dist.FileStore(os.path.join(out_dir, f"store_none{index}"), WORLD)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=MISMATCH_TIMEOUT_S))
        try:
            results["none_cases"].append(_run_case(rank, case))
        except Exception as error:  # noqa: BLE001  the test reports it
            results["none_cases"].append(f"{type(error).__name__}: {str(error)[:300]}")
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _dist_case(q_rows, neg_rows, symmetric, gather, seed, scale=20.0):
    total = sum(q_rows)
    q, d_pos, _ = _make(total, None, seed=seed)
    qs, ps = list(q.split(list(q_rows))), list(d_pos.split(list(q_rows)))
    negs = [None if n is None else _randn(n, DIM, seed=seed + 10 + r) for r, n in enumerate(neg_rows)]
    return dict(q=qs, d_pos=ps, d_neg=negs, symmetric=symmetric, gather=gather, scale=scale)


DIST_CASES = [
    _dist_case((3, 5), (4, 0), symmetric=False, gather=True, seed=20),
    _dist_case((3, 5), (4, 0), symmetric=True, gather=True, seed=21, scale=50.0),
    _dist_case((5, 3), (0, 6), symmetric=True, gather=True, seed=22),
    _dist_case((3, 5), (None, None), symmetric=True, gather=True, seed=23),
    _dist_case((0, 4), (2, 3), symmetric=False, gather=True, seed=24),  # a rank without queries
    _dist_case((0, 4), (2, 3), symmetric=True, gather=True, seed=25),
    _dist_case((3, 5), (4, 0), symmetric=True, gather=False, seed=26),
    _dist_case((3, 5), (4, 0), symmetric=False, gather=False, seed=27),
]
# d_neg=None on one rank and hard negatives on the other: "None" must mean "no rows" there too.
DIST_NONE_CASES = [_dist_case((3, 5), (4, None), symmetric=True, gather=True, seed=28)]


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    """One spawn of 2 gloo processes for every distributed test (process start-up dominates)."""
    import torch.multiprocessing as mp

    out_dir = tmp_path_factory.mktemp("dist")
    context = mp.start_processes(_dist_worker, args=(str(out_dir), DIST_CASES, DIST_NONE_CASES),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    try:
        while not context.join(timeout=2):
            if time.monotonic() > deadline:
                pytest.fail("distributed workers did not finish within 300 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def _check_against_single_process(case, got_per_rank, label):
    kwargs = dict(scale=case["scale"], symmetric=case["symmetric"])
    if case["gather"]:
        # One process holding the concatenated batch.
        q, d_pos = torch.cat(case["q"]), torch.cat(case["d_pos"])
        negs = [n for n in case["d_neg"] if n is not None]
        d_neg = torch.cat(negs) if negs else None
        loss, gq, gp, gn = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, **kwargs)
        torch.testing.assert_close(loss.double(), oracle_loss(*_f64(q, d_pos, d_neg), **kwargs), rtol=1e-5,
                                   atol=1e-5)
        q_start, n_start = 0, 0
        for rank in range(WORLD):
            got = got_per_rank[rank]
            assert isinstance(got, dict), f"{label} rank {rank} failed: {got}"
            rows = case["q"][rank].shape[0]
            where = f"{label} rank {rank}"
            torch.testing.assert_close(got["loss"], loss, rtol=1e-6, atol=1e-6, msg=lambda m: f"{where} loss: {m}")
            torch.testing.assert_close(got["q"], gq[q_start:q_start + rows], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{where} grad q: {m}")
            torch.testing.assert_close(got["d_pos"], gp[q_start:q_start + rows], rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"{where} grad d_pos: {m}")
            if case["d_neg"][rank] is not None:
                negatives = case["d_neg"][rank].shape[0]
                torch.testing.assert_close(got["d_neg"], gn[n_start:n_start + negatives], rtol=1e-5, atol=1e-7,
                                           msg=lambda m: f"{where} grad d_neg: {m}")
                n_start += negatives
            q_start += rows
    else:
        # gather=False: every rank's loss and gradients are those of its local batch only.
        for rank in range(WORLD):
            got = got_per_rank[rank]
            inputs = (case["q"][rank], case["d_pos"][rank], case["d_neg"][rank])
            local = loss_and_grads(lf.contrastive_loss, *inputs, gather=False, **kwargs)
            torch.testing.assert_close(got["loss"], local[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got["loss"].double(), oracle_loss(*_f64(*inputs), **kwargs), rtol=1e-5,
                                       atol=1e-5)
            for key, want in zip(("q", "d_pos", "d_neg"), local[1:]):
                torch.testing.assert_close(got[key], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("index", range(len(DIST_CASES)))
def test_distributed_matches_single_process(distributed_results, index):
    case = DIST_CASES[index]
    _check_against_single_process(case, [r["cases"][index] for r in distributed_results],
                                  f"case {index} (gather={case['gather']}, symmetric={case['symmetric']})")


def test_distributed_d_neg_none_on_one_rank(distributed_results):
    """Rank 0 passes 4 hard negatives, rank 1 passes d_neg=None (no hard negatives in its batch)."""
    case = DIST_NONE_CASES[0]
    _check_against_single_process(case, [r["none_cases"][0] for r in distributed_results], "d_neg None on rank 1")


# ---------------------------------------------------------------------------------------------------
# 5. Bad input: the message names the argument and what was received.
# ---------------------------------------------------------------------------------------------------
def _ok():
    return _randn(4, 8, seed=30), _randn(4, 8, seed=31), _randn(3, 8, seed=32)


@pytest.mark.parametrize("change, exc, match", [
    (dict(d_pos=_randn(5, 8, seed=33)), ValueError, r"d_pos.*\(4, 8\).*\(5, 8\)"),
    (dict(d_pos=_randn(4, 7, seed=33)), ValueError, r"d_pos.*\(4, 7\)"),
    (dict(d_neg=_randn(3, 7, seed=33)), ValueError, r"d_neg.*8.*\(3, 7\)"),
    (dict(q=_randn(8, seed=33)), ValueError, r"q.*\(8,\)"),
    (dict(q=_randn(2, 4, 8, seed=33)), ValueError, r"q.*\(2, 4, 8\)"),
    (dict(d_pos=_randn(8, seed=33)), ValueError, r"d_pos.*\(8,\)"),
    (dict(d_neg=_randn(1, 3, 8, seed=33)), ValueError, r"d_neg.*\(1, 3, 8\)"),
    (dict(q=torch.ones(4, 8, dtype=torch.int64)), TypeError, r"q.*int64"),
    (dict(d_neg=torch.ones(3, 8, dtype=torch.int32)), TypeError, r"d_neg.*int32"),
    (dict(q=_randn(4, 8, seed=33, dtype=torch.float64)), TypeError, r"q.*float64"),
    (dict(d_pos=_randn(4, 8, seed=33, dtype=torch.float16)), TypeError, r"d_pos.*float16"),
    (dict(d_neg=_randn(3, 8, seed=33, dtype=torch.bfloat16)), TypeError, r"d_neg.*bfloat16"),
    (dict(q=[[1.0] * 8] * 4), TypeError, r"q.*list"),
    (dict(d_neg=torch.ones(3, 8, device="meta")), ValueError, r"d_neg.*meta"),
    (dict(scale=0.0), ValueError, r"scale.*got 0"),
    (dict(scale=-1), ValueError, r"scale.*got -1"),
    (dict(scale=float("inf")), ValueError, r"scale.*got inf"),
    (dict(scale=1e39), ValueError, r"scale must be <= 3\.4\d*e\+38, got 1e\+39"),  # inf in float32
    (dict(scale=np.float32(-1.0)), ValueError, r"scale must be > 0, got -1\.0"),  # numpy numbers are numbers
    (dict(q=_randn(4, 8, seed=33).to_sparse()), TypeError, r"q must be a dense \(strided\) tensor"),
    (dict(scale=float("nan")), ValueError, r"scale.*nan"),
    (dict(scale=True), TypeError, r"scale.*bool"),
    (dict(scale="20"), TypeError, r"scale.*str"),
    (dict(scale=None), TypeError, r"scale.*NoneType"),
    (dict(symmetric=1), TypeError, r"symmetric.*int"),
    (dict(symmetric="yes"), TypeError, r"symmetric.*str"),
    (dict(gather=None), TypeError, r"gather.*NoneType"),
    (dict(gather=0), TypeError, r"gather.*int"),
    (dict(q=torch.empty(0, 8), d_pos=torch.empty(0, 8)), ValueError, r"q.*0"),
    (dict(backend="nope"), ValueError, r"backend='nope'.*torch"),
    (dict(backend=None), TypeError, r"backend.*NoneType"),
], ids=lambda v: repr(v)[:40] if not isinstance(v, dict) else "-".join(f"{k}" for k in v))
def test_bad_input(change, exc, match):
    q, d_pos, d_neg = _ok()
    kwargs = dict(q=q, d_pos=d_pos, d_neg=d_neg)
    kwargs.update(change)
    with pytest.raises(exc, match=match):
        lf.contrastive_loss(**kwargs)


def test_unavailable_backends_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q, d_pos, d_neg = _ok()
    for backend in ("cuda", "triton", "flash_attn"):
        with pytest.raises(ValueError, match=rf"backend='{backend}'.*available.*'torch'"):
            lf.contrastive_loss(q, d_pos, d_neg, backend=backend)


# ---------------------------------------------------------------------------------------------------
# 6. opcheck and torch.compile.
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("label_offset", (0, 3))
def test_opcheck(label_offset, dtype):
    anchors = _randn(5, 16, seed=40, dtype=dtype).requires_grad_(True)
    candidates = _randn(12, 16, seed=41, dtype=dtype).requires_grad_(True)
    torch.library.opcheck(torch.ops.llm2vec_fast.infonce_forward.default,
                          (anchors, candidates, label_offset, 20.0, "torch"))
    _, lse = torch.ops.llm2vec_fast.infonce_forward.default(anchors.detach(), candidates.detach(), label_offset,
                                                            20.0, "torch")
    torch.library.opcheck(torch.ops.llm2vec_fast.infonce_backward.default,
                          (_randn(5, seed=42), anchors.detach(), candidates.detach(), lse, label_offset, 20.0,
                           "torch"))


def test_opcheck_non_contiguous():
    anchors = _randn(16, 5, seed=43).t().requires_grad_(True)
    candidates = _randn(16, 9, seed=44).t().requires_grad_(True)
    assert not anchors.is_contiguous()
    torch.library.opcheck(torch.ops.llm2vec_fast.infonce_forward.default, (anchors, candidates, 2, 20.0, "torch"))


@pytest.mark.parametrize("symmetric", (False, True))
def test_torch_compile_fullgraph(symmetric):
    q, d_pos, d_neg = _make(9, 6, seed=45)

    def fn(q, d_pos, d_neg):
        return lf.contrastive_loss(q, d_pos, d_neg, scale=50.0, symmetric=symmetric)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager = loss_and_grads(fn, q, d_pos, d_neg)
    traced = loss_and_grads(compiled, q, d_pos, d_neg)
    for got, want in zip(traced, eager):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------
# Every backend that runs on the CPU (torch; triton too under TRITON_INTERPRET=1, as `make test` runs).
# ---------------------------------------------------------------------------------------------------
def cpu_backends(op):
    names = ["torch"]
    if dispatch.triton_interpreting():
        dispatch._load_backends()
        names += [b for b in dispatch.available_backends(op, torch.device("cpu")) if b != "torch"]
    return names


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("dim", (32, 40))
@pytest.mark.parametrize("backend", cpu_backends("contrastive_loss"))
def test_cpu_backends_match_oracle(backend, dim, dtype):
    for negatives in (None, 0, 13):
        for symmetric in (False, True):
            q = _randn(11, dim, seed=60, dtype=dtype)
            d_pos = (q.float() + 0.8 * _randn(11, dim, seed=61)).to(dtype)
            d_neg = None if negatives is None else _randn(negatives, dim, seed=62, dtype=dtype)
            got = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, scale=50.0, symmetric=symmetric,
                                 backend=backend)
            want = loss_and_grads(oracle_loss, *_f64(q, d_pos, d_neg), scale=50.0, symmetric=symmetric)
            where = f"{backend} negatives={negatives} symmetric={symmetric}"
            torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-5, msg=lambda m: f"{where}: {m}")
            for g, w, name in zip(got[1:], want[1:], ("q", "d_pos", "d_neg")):
                if w is None or (g is None and w.numel() == 0):
                    continue
                assert g.dtype == dtype, f"{where} grad {name}"
                torch.testing.assert_close(g.double(), w, **_GRAD_TOLS[dtype], msg=lambda m: f"{where} {name}: {m}")


def llm2vec_hard_negative_nll_loss(q, d_pos, d_neg, scale):
    """llm2vec 0.2.3's HardNegativeNLLLoss as written there: cos_sim(q, [d_pos; d_neg]) * scale, then
    cross-entropy with arange labels (re-implemented here from its definition, in float64)."""
    d = d_pos if d_neg is None else torch.cat([d_pos, d_neg])
    cos_sim = F.normalize(q.double(), p=2, dim=1) @ F.normalize(d.double(), p=2, dim=1).t()
    return torch.nn.CrossEntropyLoss()(cos_sim * scale, torch.arange(len(q)))


@pytest.mark.parametrize("backend", cpu_backends("contrastive_loss"))
@pytest.mark.parametrize("negatives", (None, 9))
def test_matches_llm2vec_hard_negative_nll_loss(backend, negatives):
    q, d_pos, d_neg = _make(12, negatives, seed=70)
    for scale in (20.0, 50.0):
        got = lf.contrastive_loss(q, d_pos, d_neg, scale=scale, backend=backend)
        want = llm2vec_hard_negative_nll_loss(q, d_pos, d_neg, scale)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends("contrastive_loss"))
def test_identical_rows_zero_vectors_and_large_scale_stay_finite(backend):
    """Identical rows tie every score; a zero vector is defined to have cosine 0 with everything (it is
    divided by max(|x|, 1e-12), as F.normalize does), so it scores 0 and its gradient is finite; a
    scale of 1e4 saturates the softmax without overflow."""
    row = _randn(1, DIM, seed=71)
    cases = {
        "identical rows": (row.repeat(6, 1), row.repeat(6, 1), row.repeat(3, 1), 20.0),
        "zero vectors": (torch.cat([torch.zeros(2, DIM), _randn(4, DIM, seed=72)]),
                         torch.cat([_randn(5, DIM, seed=73), torch.zeros(1, DIM)]), torch.zeros(2, DIM), 20.0),
        "large scale": (*_make(6, 4, seed=74), 1e4),
    }
    for name, (q, d_pos, d_neg, scale) in cases.items():
        for symmetric in (False, True):
            loss, *grads = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, scale=scale, symmetric=symmetric,
                                          backend=backend)
            assert torch.isfinite(loss), f"{name}: loss {loss}"
            assert all(torch.isfinite(g).all() for g in grads), f"{name}: non-finite gradient"
            want = oracle_loss(*_f64(q, d_pos, d_neg), scale=scale, symmetric=symmetric)
            torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    # Ties: with every score equal, the loss is log(N) exactly.
    q, d_pos, d_neg, _ = cases["identical rows"]
    loss = lf.contrastive_loss(q, d_pos, d_neg, backend=backend)
    assert abs(loss.item() - torch.log(torch.tensor(9.0)).item()) < 1e-5


@pytest.mark.parametrize("symmetric", (False, True))
@pytest.mark.parametrize("backend", cpu_backends("contrastive_loss"))
def test_fp16_zero_rows_leave_the_other_rows_gradients_finite(backend, symmetric):
    """A zero row's gradient is 1/eps = 1e12 times the others' (F.normalize's), beyond fp16; the triton backward
    scaled its recomputed scores by the inverse norms in fp16, where that overflowed to inf and, times the zero
    row, gave NaN in the gradient of every row that scored it."""
    q, d_pos, d_neg = _make(6, 3, seed=95, dtype=torch.float16)
    zero_rows = {"q": 1, "d_pos": 4, "d_neg": 0}
    q[1], d_pos[4], d_neg[0] = 0, 0, 0
    got = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, symmetric=symmetric, backend=backend)
    want = loss_and_grads(oracle_loss, *_f64(q, d_pos, d_neg), scale=20.0, symmetric=symmetric)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-4, atol=1e-4)
    for name, grad, grad64 in zip(("q", "d_pos", "d_neg"), got[1:], want[1:]):
        keep = torch.arange(grad.shape[0]) != zero_rows[name]
        torch.testing.assert_close(grad[keep].double(), grad64[keep], **_GRAD_TOLS[torch.float16],
                                   msg=lambda m: f"{name} symmetric={symmetric}: {m}")


@pytest.mark.parametrize("backend", cpu_backends("contrastive_loss"))
def test_near_identical_pairs_never_give_a_negative_loss(backend):
    """Cross-entropy is >= 0. With each positive the row's largest score by far, the lse equals it to rounding,
    and the triton kernel's base-2 round trip of the lse left the loss a rounding below 0 (-1.9e-6)."""
    worst = 0.0
    for seed in range(8):
        q = _randn(64, 48, seed=90 + seed)
        d_pos = q + 1e-3 * _randn(64, 48, seed=190 + seed)
        for scale in (20.0, 1e3, 1e4):
            worst = min(worst, lf.contrastive_loss(q, d_pos, scale=scale, backend=backend).item())
    assert worst >= 0.0, worst

# ---------------------------------------------------------------------------------------------------
# 7. GPU: every backend that runs on CUDA against the reference, at real sizes.
# ---------------------------------------------------------------------------------------------------
def backends_vs_oracle(device, symmetric, batch, candidates, dim, seed=50):
    """Every backend available on ``device`` (and "auto") against the float64 oracle, bf16 inputs."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    q = torch.randn(batch, dim, device=device, generator=gen).bfloat16()
    d_pos = (q.float() + 5.0 * torch.randn(batch, dim, device=device, generator=gen)).bfloat16()  # cos ~ 0.2: not saturated
    d_neg = torch.randn(candidates - batch, dim, device=device, generator=gen).bfloat16()
    want, wq, wp, wn = loss_and_grads(oracle_loss, *_f64(q, d_pos, d_neg), scale=50.0, symmetric=symmetric)
    backends = dispatch.available_backends("contrastive_loss", device)
    assert "torch" in backends
    for backend in backends + ["auto"]:
        loss, gq, gp, gn = loss_and_grads(lf.contrastive_loss, q, d_pos, d_neg, scale=50.0, symmetric=symmetric,
                                          backend=backend)
        assert loss.dtype == torch.float32 and loss.device.type == device.type
        torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{backend}: {m}")
        for got, expected, name in ((gq, wq, "q"), (gp, wp, "d_pos"), (gn, wn, "d_neg")):
            assert got.dtype == torch.bfloat16
            # bf16 kernels may keep bf16 intermediates: allow 2% of the largest gradient entry (the torch
            # reference, fp32 inside, is at ~0.5%; the Triton kernel measured ~1.3% in the interpreter).
            torch.testing.assert_close(got.double(), expected, rtol=1.6e-2, atol=2e-2 * expected.abs().max().item(),
                                       msg=lambda m: f"{backend} grad {name}: {m}")


@pytest.mark.parametrize("symmetric", (False, True))
def test_backends_vs_oracle_cpu_dry_run(symmetric):
    """The GPU test's code path at tiny sizes on the CPU."""
    backends_vs_oracle(torch.device("cpu"), symmetric, batch=24, candidates=56, dim=48)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("symmetric", (False, True))
def test_gpu_backends_match_reference(symmetric):
    """Real sizes: B=4096 queries, N=8192 candidates (4096 hard negatives), D=4096, bf16."""
    backends_vs_oracle(torch.device("cuda"), symmetric, batch=4096, candidates=8192, dim=4096)
