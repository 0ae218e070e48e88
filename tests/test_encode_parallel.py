"""Encoding with several processes: a pool of one process per device, torchrun ranks (gloo on the CPU),
and the file CLI under torchrun. Every path must give the single-process embeddings, in input order."""
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from test_encoder import INPUTS, REPO, SAME_ATOL, checkpoints, write_jsonl  # noqa: F401  (checkpoints: a fixture)

from llm2vec_fast.encoder.parallel import balanced_shards


def _items():
    texts = [f"sentence {i}: " + "more words here " * (i % 9) for i in range(29)]
    return texts + [["Retrieve the passage", "what is packing?"], "", "x"]


@pytest.fixture(scope="module")
def checkpoint(checkpoints):  # noqa: F811  (checkpoints: test_encoder's session fixture)
    return checkpoints("llama")


@pytest.fixture(scope="module")
def encoder(checkpoint):
    from llm2vec_fast import LLM2Vec
    return LLM2Vec.from_pretrained(checkpoint, max_length=64, doc_max_length=48)


# ---------------------------------------------------------------------------------------- the split

@pytest.mark.parametrize("parts", [1, 2, 3, 7, 40])
def test_balanced_shards_cover_every_input_once(parts):
    generator = np.random.default_rng(parts)
    items = [("", "w" * int(n)) for n in generator.lognormal(3, 1, size=33)]
    shards = balanced_shards(items, parts)
    assert len(shards) == parts
    assert sorted(i for shard in shards for i in shard) == list(range(len(items)))
    load = [sum(len(items[i][1]) + 1 for i in shard) for shard in shards]
    longest = max(len(t) for _, t in items) + 1
    assert max(load) - min(load) <= longest  # greedy longest-first: within one item of each other
    for shard in shards:
        assert [len(items[i][1]) for i in shard] == sorted((len(items[i][1]) for i in shard), reverse=True)
    assert balanced_shards(items, parts) == shards


def test_balanced_shards_bad_parts():
    with pytest.raises(ValueError, match="parts must be a positive int, got 0"):
        balanced_shards([("", "a")], 0)


# ---------------------------------------------------------------------------------------- the pool

def test_devices_equal_one_process(encoder):
    items = _items()
    expected = encoder.encode(items, show_progress_bar=False)
    out = encoder.encode(items, devices=["cpu", "cpu"], show_progress_bar=False)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    assert torch.allclose(out, expected, atol=SAME_ATOL, rtol=0)
    assert encoder.encode([], devices=["cpu"], show_progress_bar=False).shape == (0, expected.shape[1])


@pytest.mark.parametrize("load_in_workers", [False, True])
def test_pool_loads_once_per_worker_and_is_reused(encoder, load_in_workers):
    """Two workers, two jobs with different settings: each worker started (loaded the model) once, and
    both jobs equal the single-process result with the parent's current settings."""
    items = _items()
    with encoder.start_multi_process_pool(["cpu", "cpu"], load_in_workers=load_in_workers) as pool:
        assert pool.loads_in_workers is load_in_workers
        pids = list(pool.worker_pids)
        assert len(set(pids)) == 2 and os.getpid() not in pids
        first = encoder.encode(items, pool=pool, show_progress_bar=False, convert_to_numpy=True)
        encoder.pooling_mode = "last_token"
        try:
            second = encoder.encode(items, pool=pool, show_progress_bar=False, normalize_embeddings=True)
            expected_second = encoder.encode(items, show_progress_bar=False, normalize_embeddings=True)
        finally:
            encoder.pooling_mode = "mean"
        assert pool.worker_pids == pids and all(p.is_alive() for p in pool._processes)
    assert pool._processes is None
    assert isinstance(first, np.ndarray)
    assert np.allclose(first, encoder.encode(items, show_progress_bar=False).numpy(), atol=SAME_ATOL, rtol=0)
    assert torch.allclose(second, expected_second, atol=SAME_ATOL, rtol=0)
    assert torch.allclose(second.norm(dim=1), torch.ones(len(items)), atol=1e-5)


def test_pool_of_an_encoder_built_by_hand(encoder):
    """No from_pretrained arguments to reload from: the CPU model is shared; loading in workers is refused."""
    from llm2vec_fast import LLM2Vec
    by_hand = LLM2Vec(encoder.model, encoder.tokenizer, max_length=64, doc_max_length=48)
    items = _items()[:9]
    out = by_hand.encode(items, devices=["cpu"], show_progress_bar=False)
    assert torch.allclose(out, encoder.encode(items, show_progress_bar=False), atol=SAME_ATOL, rtol=0)
    with pytest.raises(ValueError, match="LLM2Vec.from_pretrained"):
        by_hand.start_multi_process_pool(["cpu"], load_in_workers=True)


def test_bad_devices(encoder):
    with pytest.raises(ValueError, match=r"devices must be a non-empty list"):
        encoder.encode(["a"], devices="cpu", show_progress_bar=False)
    with pytest.raises(ValueError, match=r"devices must be a non-empty list"):
        encoder.encode(["a"], devices=[], show_progress_bar=False)
    with pytest.raises(ValueError, match=r"devices\[1\] must name a device"):
        encoder.encode(["a"], devices=["cpu", "gpu7"], show_progress_bar=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"devices\[0\] is 'cuda:0' but CUDA is not available"):
            encoder.encode(["a"], devices=["cuda:0"], show_progress_bar=False)
    with pytest.raises(ValueError, match="at most one of devices=, pool= and distributed=True"):
        encoder.encode(["a"], devices=["cpu"], distributed=True, show_progress_bar=False)
    with pytest.raises(ValueError, match="distributed=True needs an initialised torch.distributed process group"):
        encoder.encode(["a"], distributed=True, show_progress_bar=False)


def test_worker_failure_is_raised_with_its_traceback(encoder):
    with encoder.start_multi_process_pool(["cpu"]) as pool:
        with pytest.raises(RuntimeError, match=r"encoding worker 0 \(cpu\) failed:(.|\n)*unexpected keyword"):
            pool.encode([("", "a")], 128, settings={}, no_such_option=1)
        assert pool._processes is None  # a failed job closes the pool


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _in_thread(call, timeout: float):
    """call()'s result or exception, or "still waiting" when it has not returned within ``timeout`` seconds (a
    hang: the thread is left behind, a daemon)."""
    outcome = []

    def target():
        try:
            outcome.append(call())
        except BaseException as error:
            outcome.append(error)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else "still waiting"


def _writing_a_full_pipe(pid: int) -> bool:
    """Whether a thread of ``pid`` is blocked writing into a pipe (Linux's /proc/<pid>/task/<tid>/wchan)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if "pipe_write" in f.read():
                    return True
        except OSError:
            pass
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/wchan"), reason="needs Linux's /proc/<pid>/wchan")
def test_a_worker_killed_while_sending_its_result_raises(encoder):
    """A worker killed halfway through sending a result larger than a pipe holds (the OOM killer, while the parent
    was busy) must raise like any dead worker, not leave the parent waiting for the rest of the message."""
    items = [("", f"t{i}") for i in range(800)]  # 4 chunks of 200 rows: 100 KB each, more than a pipe's 64 KB
    with encoder.start_multi_process_pool(["cpu"]) as pool:
        victim = pool.worker_pids[0]

        def kill_while_it_sends(rows):  # the parent is held here, so the next result fills the pipe
            if _alive(victim):
                deadline = time.monotonic() + 60
                while not _writing_a_full_pipe(victim):
                    assert time.monotonic() < deadline, "the worker never blocked sending its next result"
                    time.sleep(0.05)
                os.kill(victim, signal.SIGKILL)
        outcome = _in_thread(lambda: pool.encode(items, encoder._hidden_size(), progress=kill_while_it_sends,
                                                 settings=encoder._settings(), batch_size=1024), timeout=60)
        assert isinstance(outcome, RuntimeError), outcome
        assert "an encoding worker exited unexpectedly" in str(outcome) and "-9" in str(outcome)
        assert pool._processes is None


_ORPHAN = """
import sys, time
from llm2vec_fast import LLM2Vec
encoder = LLM2Vec.from_pretrained(sys.argv[1], max_length=64, doc_max_length=48)
pool = encoder.start_multi_process_pool(["cpu"])
print(pool.worker_pids[0], flush=True)
while sys.argv[2] == "busy":
    encoder.encode([f"text {i} " + "w " * (i % 50) for i in range(2000)], pool=pool, show_progress_bar=False)
time.sleep(600)
"""


@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_workers_exit_when_their_parent_is_killed(checkpoint, mode):
    """SIGKILL leaves the parent no chance to close its pool: the workers (each holding a model copy, maybe a GPU)
    must notice and exit by themselves, idle or in the middle of a chunk."""
    path = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    parent = subprocess.Popen([sys.executable, "-c", _ORPHAN, checkpoint, mode], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, env=env)
    worker = None
    try:
        assert select.select([parent.stdout], [], [], 120)[0], "the pool did not start"
        worker = int(parent.stdout.readline())
        time.sleep(1.0)  # busy: the worker is in a chunk by now
        parent.kill()
        parent.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), f"worker {worker} outlived its killed parent ({mode})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_threads_sharing_a_pool_take_turns(encoder):
    """Two threads encoding through one pool at once (a server sharing it) each get their own rows; neither
    waits forever for results the other thread took."""
    jobs = {name: [f"thread {name} text {i} " + "w " * (i % 30) for i in range(48)] for name in "AB"}
    start = threading.Barrier(2)
    with encoder.start_multi_process_pool(["cpu"]) as pool:
        def run(name):
            start.wait()
            return encoder.encode(jobs[name], pool=pool, show_progress_bar=False)
        results = {}
        threads = [threading.Thread(target=lambda n=n: results.setdefault(n, run(n)), daemon=True) for n in jobs]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert sorted(results) == ["A", "B"], f"still waiting: {sorted(set(jobs) - set(results))}"
    for name, texts in jobs.items():
        assert torch.allclose(results[name], encoder.encode(texts, show_progress_bar=False), atol=SAME_ATOL, rtol=0)


def test_a_pool_serves_only_the_encoder_it_holds(encoder, checkpoint):
    """Another encoder's rows must not come from this pool's model: a pool that shares its encoder's weights
    serves that encoder only; one whose workers loaded the checkpoint serves any encoder loaded the same way."""
    from llm2vec_fast import LLM2Vec
    by_hand = LLM2Vec(encoder.model, encoder.tokenizer, max_length=64, doc_max_length=48)
    same_load = LLM2Vec.from_pretrained(checkpoint, max_length=32, doc_max_length=48)  # settings travel per job
    other_load = LLM2Vec.from_pretrained(checkpoint, max_length=64, doc_max_length=48, dtype=torch.bfloat16)
    items = [("", "a"), ("", "b")]
    with encoder.start_multi_process_pool(["cpu"], load_in_workers=False) as shared:
        assert shared.serves(encoder) and not shared.serves(by_hand) and not shared.serves(same_load)
        with pytest.raises(ValueError, match=r"pool was started from encoder LLM2Vec at 0x[0-9a-f]+ \(from_pretrained"
                                             r"(.|\n)*cannot encode for encoder LLM2Vec at 0x[0-9a-f]+:"):
            shared.encode(items, encoder._hidden_size(), settings=by_hand._settings(), encoder=by_hand)
        assert shared._processes is not None  # refused before any work: the pool is still usable
        with pytest.raises(ValueError, match="cannot encode for encoder"):  # through LLM2Vec.encode(pool=)
            by_hand.encode(["a"], pool=shared, show_progress_bar=False)
        out = shared.encode(items, encoder._hidden_size(), settings=encoder._settings(), encoder=encoder)
        assert np.allclose(out, encoder.encode(items, show_progress_bar=False).numpy(), atol=SAME_ATOL)
    with encoder.start_multi_process_pool(["cpu"], load_in_workers=True) as loaded:
        assert loaded.serves(encoder) and loaded.serves(same_load)
        assert not loaded.serves(other_load) and not loaded.serves(by_hand)
        with pytest.raises(ValueError, match=r"cannot encode for encoder LLM2Vec at 0x[0-9a-f]+ \(from_pretrained"):
            loaded.encode(items, encoder._hidden_size(), settings=other_load._settings(), encoder=other_load)


def test_an_interrupted_job_stops_the_pool_promptly(encoder):
    """Ctrl-C (or any error) during a job closes the pool within moments: the chunks still queued or running
    are dropped, not encoded to the end before close() returns."""
    texts = [f"text {i} " + "many more words here " * 20 for i in range(400)]  # 4 chunks of ~1 s or more each
    with encoder.start_multi_process_pool(["cpu"]) as pool:
        pids = list(pool.worker_pids)
        started = time.monotonic()
        timing = {}

        def interrupt(rows):
            timing["chunk"] = time.monotonic() - started
            timing["raised"] = time.monotonic()
            raise KeyboardInterrupt
        with pytest.raises(KeyboardInterrupt):
            pool.encode([("", t) for t in texts], encoder._hidden_size(), progress=interrupt,
                        settings=encoder._settings())
        stopped = time.monotonic() - timing["raised"]
        assert pool._processes is None and not any(_alive(pid) for pid in pids)
        assert stopped < max(1.0, timing["chunk"]), timing  # a queued chunk takes about timing["chunk"]


# ------------------------------------------------------------------------------------- torchrun ranks

def _rank_main(rank: int, world: int, rendezvous: str, checkpoint: str, items, out_dir: str) -> None:
    import torch.distributed as dist

    from llm2vec_fast import LLM2Vec
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        encoder = LLM2Vec.from_pretrained(checkpoint, max_length=64, doc_max_length=48)
        seen = []
        original = encoder._encode_items

        def counting(part, *args, **kwargs):
            seen.extend(part)
            return original(part, *args, **kwargs)
        encoder._encode_items = counting
        out = encoder.encode(items, distributed=True, show_progress_bar=False)
        torch.save({"out": out, "seen": seen}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_share_the_work_and_all_get_every_row(checkpoint, encoder, tmp_path):
    from llm2vec_fast.encoder.text import normalize_inputs
    items = _items()
    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "rendezvous"), checkpoint, items, str(tmp_path)),
             nprocs=world, join=True)
    expected = encoder.encode(items, show_progress_bar=False)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for result in results:
        assert torch.allclose(result["out"], expected, atol=SAME_ATOL, rtol=0)
    seen = [[tuple(x) for x in result["seen"]] for result in results]
    assert all(0 < len(s) < len(items) for s in seen)  # each rank encoded only its share
    assert sorted(seen[0] + seen[1]) == sorted(normalize_inputs(items))


_MISMATCHES = ("diff_content", "diff_order", "diff_count", "empty_vs_one")


def _inputs_of_rank(case: str, rank: int, items):
    return {"diff_content": [f"rank {rank} text {i}" for i in range(6)], "diff_order": items[::-1] if rank else items,
            "diff_count": items[:10 + rank], "empty_vs_one": ["a"] if rank else [], "same": items}[case]


def _mismatch_rank_main(rank: int, world: int, rendezvous: str, checkpoint: str, items, out_dir: str) -> None:
    import torch.distributed as dist

    from llm2vec_fast import LLM2Vec
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        encoder = LLM2Vec.from_pretrained(checkpoint, max_length=64, doc_max_length=48)
        errors, out = {}, None
        for case in _MISMATCHES:
            try:
                encoder.encode(_inputs_of_rank(case, rank, items), distributed=True, show_progress_bar=False)
                errors[case] = None
                break  # not refused: the ranks may be out of step now, stop here
            except ValueError as error:
                errors[case] = str(error)
        else:  # every rank raised every time: the group is still in step
            out = encoder.encode(items, distributed=True, show_progress_bar=False)
        torch.save({"errors": errors, "out": out}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_distributed_ranks_with_different_inputs_all_raise(checkpoint, encoder, tmp_path):
    """Ranks given different inputs (other texts, another order, another count, none on one rank) all raise the
    same ValueError, instead of returning rows of another rank's texts or aborting in the gather; the group is
    still usable afterwards."""
    items = _items()
    world = 2
    context = mp.start_processes(_mismatch_rank_main, nprocs=world, join=False, start_method="spawn",
                                 args=(world, str(tmp_path / "rendezvous"), checkpoint, items, str(tmp_path)))
    deadline = time.monotonic() + 180
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, "the ranks hang"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for case in _MISMATCHES:
        messages = [result["errors"].get(case) for result in results]
        assert messages[0] and messages[0] == messages[1], (case, messages)
        assert "distributed=True needs the same inputs, in the same order, on every rank" in messages[0]
    assert "rank 0: 10 inputs, rank 1: 11 inputs" in results[0]["errors"]["diff_count"]
    expected = encoder.encode(items, show_progress_bar=False)
    for result in results:
        assert torch.allclose(result["out"], expected, atol=SAME_ATOL, rtol=0)


# ------------------------------------------------------------------------------- CLI under torchrun

def test_cli_under_torchrun_splits_the_shards(checkpoint, encoder, tmp_path):
    from llm2vec_fast.encoder import files
    items = (INPUTS * 3)[:23]
    source = str(tmp_path / "input.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    args = ["--model", checkpoint, "--input", source, "--output", out, "--shard-size", "4", "--dtype", "float32",
            "--max-length", "64", "--doc-max-length", "48"]
    path = os.pathsep.join([REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    env = dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(_free_port()), "-m", "llm2vec_fast.cli", "encode"] + args,
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "(rank 0)" in result.stdout and "(rank 1)" in result.stdout
    with open(os.path.join(out, files.INDEX)) as f:
        index = json.load(f)
    assert index["complete"] and index["rows"] == len(items)
    assert [s["start"] for s in index["shards"]] == list(range(0, len(items), 4))
    assert not [n for n in os.listdir(out) if n.startswith(files.PROGRESS_PREFIX) or n.endswith(".tmp")]
    expected = encoder.encode(items, show_progress_bar=False).numpy()
    assert np.allclose(files.load_embeddings(out), expected, atol=SAME_ATOL, rtol=0)
    messages = []  # a single process resumes the finished multi-rank run: nothing to encode
    files.encode_file(encoder, source, out, settings={"model": checkpoint, "peft": None, "merge_peft": False,
                                                      "dtype": "float32"},
                      shard_size=4, log=messages.append)
    assert messages == ["done: 23 rows in 6 shards (0 encoded now, 6 from before)"]


def _killed_two_rank_run(encoder, tmp_path, shard_size: int, recorded, written: int):
    """A finished run of 10 texts rewound to a 2-rank run killed before its final merge: index.json without
    shards, rank r's progress file recording the shards numbered recorded[r], only the first ``written`` shards
    on disk. Returns (items, input file, output folder, the shards)."""
    from llm2vec_fast.encoder import files
    items = [t for t in INPUTS if isinstance(t, str)][:10]
    source = str(tmp_path / "input.jsonl")
    write_jsonl(source, items)
    out = str(tmp_path / "out")
    files.encode_file(encoder, source, out, shard_size=shard_size, log=lambda message: None)
    with open(os.path.join(out, files.INDEX)) as f:
        index = json.load(f)
    shards = index["shards"]
    for shard in shards[written:]:
        os.remove(os.path.join(out, shard["file"]))
    for rank in range(2):
        with open(os.path.join(out, files.PROGRESS_NAME.format(rank)), "w") as f:
            json.dump({"format": files.FORMAT, "shards": [shards[i] for i in recorded[rank]]}, f)
    index.update(shards=[], complete=False, rows=None)
    with open(os.path.join(out, files.INDEX), "w") as f:
        json.dump(index, f)
    return items, source, out, shards


def test_resume_reads_the_progress_files_of_an_interrupted_multi_rank_run(encoder, tmp_path):
    """A multi-rank run killed before its final merge left shards recorded only in progress files; a
    resumed run (any world size) keeps them."""
    from llm2vec_fast.encoder import files
    items, source, out, shards = _killed_two_rank_run(encoder, tmp_path, 3, recorded=([0, 2], [1]), written=3)
    stamps = {s["file"]: os.stat(os.path.join(out, s["file"])).st_mtime_ns for s in shards[:3]}
    messages = []
    files.encode_file(encoder, source, out, shard_size=3, log=messages.append)
    assert messages[-1] == "done: 10 rows in 4 shards (1 encoded now, 3 from before)"
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in stamps} == stamps
    assert not [n for n in os.listdir(out) if n.startswith(files.PROGRESS_PREFIX)]
    expected = encoder.encode(items, show_progress_bar=False).numpy()
    assert np.allclose(files.load_embeddings(out), expected, atol=SAME_ATOL, rtol=0)


def test_a_rank_stopped_again_keeps_the_earlier_runs_shards_recorded(encoder, tmp_path, monkeypatch):
    """A multi-rank run resumed after a kill, and killed again before rank 0's final merge: each rank's progress
    file must still record the shards of the runs before (a rank rewrote its file with only its own new shards,
    so the next resume encoded finished shards again). Rank 0 of 2 runs in this process (the barriers stubbed)."""
    import torch.distributed as dist

    import llm2vec_fast.distributed as distributed
    from llm2vec_fast.encoder import files
    # five shards: the first run's ranks finished shards 0 and 1, then were killed
    items, source, out, _ = _killed_two_rank_run(encoder, tmp_path, 2, recorded=([0], [1]), written=2)

    class Killed(Exception):
        pass

    def killed_after_one_shard(message):
        raise Killed(message)

    with monkeypatch.context() as patch:
        patch.setattr(distributed, "rank_and_world", lambda: (0, 2))
        patch.setattr(dist, "barrier", lambda *args, **kwargs: None)
        with pytest.raises(Killed, match="shard 2: rows 4..5 written"):
            files.encode_file(encoder, source, out, shard_size=2, log=killed_after_one_shard)
    with open(os.path.join(out, files.PROGRESS_NAME.format(0))) as f:
        assert [s["start"] for s in json.load(f)["shards"]] == [0, 2, 4]
    messages = []
    files.encode_file(encoder, source, out, shard_size=2, log=messages.append)
    assert messages[-1] == "done: 10 rows in 5 shards (2 encoded now, 3 from before)"
    expected = encoder.encode(items, show_progress_bar=False).numpy()
    assert np.allclose(files.load_embeddings(out), expected, atol=SAME_ATOL, rtol=0)

def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------ sentence-transformers adapter

def test_sentence_transformers_adapter_uses_the_pool(encoder):
    """start_multi_process_pool / encode(pool=) / encode(device=[...]) run LLM2Vec's pool, same embeddings."""
    pytest.importorskip("sentence_transformers")
    from llm2vec_fast.encoder.st_adapter import to_sentence_transformer
    model = to_sentence_transformer(encoder, prompts={"query": "Retrieve the passage"})
    texts = [t for t in _items() if isinstance(t, str)][:12]
    expected = model.encode(texts)
    pool = model.start_multi_process_pool(["cpu", "cpu"])
    try:
        assert len(pool.worker_pids) == 2
        assert np.allclose(model.encode(texts, pool=pool), expected, atol=SAME_ATOL)
        query = model.encode_query(texts[:3], pool=pool, convert_to_tensor=True)
        assert torch.allclose(query, encoder.encode([["Retrieve the passage", t] for t in texts[:3]],
                                                    show_progress_bar=False), atol=SAME_ATOL)
    finally:
        model.stop_multi_process_pool(pool)
    assert np.allclose(model.encode(texts, device=["cpu", "cpu"]), expected, atol=SAME_ATOL)
    with pytest.raises(TypeError, match="start_multi_process_pool"):
        model.encode(texts, pool={"processes": []})
