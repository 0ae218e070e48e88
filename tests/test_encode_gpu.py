"""``LLM2Vec.encode`` on a CUDA GPU (every test is marked ``gpu``): the host-prepared, asynchronous pipeline.

- encode on the GPU equals encode on the CPU, the same float32 model moved (atol 1e-4: float32 rounding in
  other kernels and other batch compositions), with and without the one-batch lookahead and across plan
  chunks, in every pooling mode, with and without normalisation;
- one batch (host preparation in pinned memory, the asynchronous copies, the forward, the pooling and the
  ``index_copy_`` into the chunk's buffer) never syncs with the host: ``torch.cuda.set_sync_debug_mode("error")``
  raises on any synchronizing CUDA call, for each attention backend that can run here;
- a whole encode makes no synchronizing call: each plan chunk's embeddings come to the CPU through pinned
  memory, awaited by an event once the next chunk's first batch is queued. The lookahead's waits on CUDA
  events (at most ``GPU_LOOKAHEAD + 1`` batches in flight) wait for one old batch
  while later ones stay queued; sync-debug mode does not report event waits, so they are not counted.
The first run of each shape compiles and autotunes the Triton kernels (which synchronizes): each sync check runs
the same work once before.
"""
import warnings

import pytest
import torch

from test_encoder import ENCODE_ITEMS, INPUTS, as_items, checkpoints, configure, reference, run_id  # noqa: F401
# (checkpoints: test_encoder's session fixture of tiny checkpoints)

pytestmark = pytest.mark.gpu

ATOL = 1e-4
RUNS = reference("llama")["runs"]
MODES = RUNS[:10:2] + [RUNS[1]]  # every pooling mode with skip_instruction, and mean without
SMALL_BUDGET = 40  # tokens per batch: many batches, so that several are in flight
SYNC_WARNING = "synchronizing CUDA operation"  # what set_sync_debug_mode("warn") reports


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints("llama")


def _encoder(checkpoint, dtype=torch.float32, backend=None):
    from llm2vec_fast import LLM2Vec
    from llm2vec_fast.models import set_attention_backend
    encoder = LLM2Vec.from_pretrained(checkpoint, dtype=dtype)
    if backend is not None:
        set_attention_backend(encoder.model, backend)
    return encoder


@pytest.mark.parametrize("case", ["llama", "qwen2"])  # qwen2: no BOS, so an empty text has no token
@pytest.mark.parametrize("chunk", [None, 5], ids=["one-chunk", "chunks-of-5"])
@pytest.mark.parametrize("lookahead", [0, 1], ids=["no-lookahead", "lookahead"])
def test_encode_on_cuda_equals_cpu_in_float32(checkpoints, monkeypatch, lookahead, chunk, case):
    from llm2vec_fast.encoder import llm2vec as module
    monkeypatch.setattr(module, "GPU_LOOKAHEAD", lookahead)
    if chunk is not None:
        monkeypatch.setattr(module, "PLAN_CHUNK", chunk)
    encoder = _encoder(checkpoints(case))
    runs = reference(case)["runs"]
    empty_seen = False
    for run in runs[:10:2] + [runs[1]]:
        configure(encoder, run)
        empty = [i for i, ids in enumerate(encoder.plan(as_items(ENCODE_ITEMS)).input_ids) if not ids]
        empty_seen = empty_seen or bool(empty)
        for normalize in (False, True):
            expected = encoder.encode(ENCODE_ITEMS, device="cpu", show_progress_bar=False,
                                      normalize_embeddings=normalize)
            for budget in (None, SMALL_BUDGET):
                got = encoder.encode(ENCODE_ITEMS, device="cuda", show_progress_bar=False,
                                     normalize_embeddings=normalize, max_tokens_per_batch=budget)
                where = f"{case} {run_id(run)} normalize={normalize} budget={budget}"
                assert got.device.type == "cpu" and got.dtype == torch.float32 and got.shape == expected.shape, where
                error = float((got - expected).abs().max())
                assert error <= ATOL, f"{where}: max abs error {error:.3g}"
                assert torch.equal(got[empty], torch.zeros_like(got[empty])), where  # inputs without tokens
    assert next(encoder.model.parameters()).device.type == "cuda"
    assert empty_seen or case == "llama"


def _one_batch(encoder, ids, counts, normalize, chunk, rows):
    """What _encode_items does for one batch on the GPU: prepare (pinned, non_blocking), run, index_copy_."""
    prepared = encoder._prepare_batch(ids, counts)
    emb = encoder._run_batch(prepared, normalize)
    chunk.index_copy_(0, rows.pin_memory().to(emb.device, non_blocking=True), emb)
    return prepared, emb


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "flash_attn", "torch"])
def test_one_batch_never_syncs(checkpoint, backend, dtype):
    """No host sync inside a batch: set_sync_debug_mode("error") raises on any synchronizing call (a
    ``.item()``/``.tolist()`` of a device tensor, a pageable copy, a device-to-host copy, ...)."""
    from llm2vec_fast import dispatch
    if backend != "auto" and backend not in dispatch.available_backends("flash_attention", torch.device("cuda")):
        pytest.skip(f"{backend} cannot run here")
    if backend == "flash_attn" and dtype == torch.float32:
        pytest.skip("flash-attn takes fp16/bf16 only")
    encoder = _encoder(checkpoint, dtype, None if backend == "auto" else backend).to("cuda").eval()
    for run in MODES:
        configure(encoder, run)
        plan = encoder.plan(as_items(INPUTS))
        rows = [i for i, ids in enumerate(plan.input_ids) if ids]
        ids, counts = [plan.input_ids[i] for i in rows], [plan.embed_counts[i] for i in rows]
        index = torch.arange(len(rows))
        for normalize in (False, True):
            chunk = torch.zeros((len(rows), encoder._hidden_size()), dtype=torch.float32, device="cuda")
            with torch.no_grad():
                _, expected = _one_batch(encoder, ids, counts, normalize, chunk, index)  # compiles, autotunes
                torch.cuda.synchronize()
                torch.cuda.set_sync_debug_mode("error")
                try:
                    prepared, emb = _one_batch(encoder, ids, counts, normalize, chunk, index)
                finally:
                    torch.cuda.set_sync_debug_mode(0)
            torch.cuda.synchronize()
            assert prepared.packed is not None, "the packed path"
            assert prepared.packed.input_ids.device.type == "cuda" and prepared.keep[0].input_ids.is_pinned()
            assert torch.allclose(emb, expected, atol=1e-6, rtol=0), (backend, run_id(run), normalize)
            assert torch.equal(chunk[index.cuda()], emb)


@pytest.mark.parametrize("first_chunk", [2, 64], ids=["ramp", "chunks-of-8"])
@pytest.mark.parametrize("lookahead", [0, 1], ids=["no-lookahead", "lookahead"])
def test_a_whole_encode_never_syncs_the_stream(checkpoint, monkeypatch, lookahead, first_chunk):
    """Across several plan chunks (each chunk's rows landing in the output through pinned memory), a whole
    encode makes no synchronizing call: the host waits on events only."""
    from llm2vec_fast.encoder import llm2vec as module
    monkeypatch.setattr(module, "GPU_LOOKAHEAD", lookahead)
    monkeypatch.setattr(module, "PLAN_CHUNK", 8)
    monkeypatch.setattr(module, "FIRST_PLAN_CHUNK", first_chunk)
    encoder = _encoder(checkpoint)
    configure(encoder, RUNS[0])
    landings = []
    land = module._Landing.land
    monkeypatch.setattr(module._Landing, "land", lambda self: landings.append(1) or land(self))
    options = dict(device="cuda", show_progress_bar=False, max_tokens_per_batch=SMALL_BUDGET)
    with torch.no_grad():
        expected = encoder.encode(ENCODE_ITEMS, **options)  # moves the model, compiles, autotunes
    torch.cuda.synchronize()
    chunks = len(module.plan_chunks(len(dict.fromkeys(as_items(ENCODE_ITEMS))), ramp=True))
    assert chunks >= 3 and len(landings) == chunks
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            got = encoder.encode(ENCODE_ITEMS, **options)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
    assert syncs == []
    assert torch.equal(got, expected)


def test_progress_bar_counts_completed_batches(checkpoint, monkeypatch):
    """With several batches in flight, the bar still counts every text once (at the batches' completion)."""
    from llm2vec_fast.encoder import llm2vec as module
    from test_encoder import RecordingBar
    monkeypatch.setattr(module, "GPU_LOOKAHEAD", 1)
    encoder = _encoder(checkpoint).to("cuda")
    configure(encoder, RUNS[0])
    bar = RecordingBar()
    items = as_items(ENCODE_ITEMS)
    encoder._encode_items(items, "cuda", bar, batch_size=2, normalize_embeddings=False,
                          max_tokens_per_batch=SMALL_BUDGET)
    assert sum(bar.updates) == len(items) and bar.postfix.endswith("tok/s")


def test_a_real_out_of_memory_splits_the_batch(checkpoint):
    """With the caching allocator capped a little above what the model holds, one huge batch runs out of
    memory: encode warns, halves its budget and still returns every row (equal to the uncapped run). The
    cap is lowered step by step until a batch does run out (the activations of the tiny model are small)."""
    encoder = _encoder(checkpoint)
    configure(encoder, RUNS[0])
    texts = [" ".join(["tide moon ocean sailor"] * 120) + f" {i}" for i in range(192)]  # ~500 tokens each
    expected = encoder.encode(texts, device="cuda", show_progress_bar=False, max_tokens_per_batch=2048)
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        for headroom_mb in (256, 128, 64, 32):
            torch.cuda.empty_cache()
            cap = torch.cuda.memory_reserved() + headroom_mb * 2 ** 20
            torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = encoder.encode(texts, device="cuda", show_progress_bar=False, max_tokens_per_batch=10 ** 7)
            if any("out of device memory" in str(w.message) for w in caught):
                assert float((got - expected).abs().max()) <= ATOL
                return
        pytest.fail("no batch ran out of memory even with 32 MiB of headroom")
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
