"""Encoding with several processes: one per device (``devices=``), or one per ``torchrun`` rank.

Both paths split the inputs the same way (:func:`balanced_shards`): sorted by length, dealt out so that
every part holds about the same number of characters, then each part is encoded with the ordinary
single-process ``LLM2Vec.encode`` and the rows are put back in input order.

- :class:`EncodePool` (``LLM2Vec.start_multi_process_pool(devices)``, or ``encode(..., devices=[...])``
  for a one-off) starts one worker process per device. Each worker gets the model once: it loads the
  checkpoint itself when the encoder came from ``LLM2Vec.from_pretrained`` (its arguments are recorded),
  otherwise it receives the encoder once at start (CPU weights travel through shared memory). After
  that only texts go to the workers and embeddings come back; the model is never pickled per batch.
- :func:`encode_over_ranks` (``encode(..., distributed=True)``) runs under an initialised
  ``torch.distributed`` process group (``torchrun``, any number of nodes): every rank passes the same
  inputs, encodes its share, and receives all rows. Ranks must all call it, as with any collective.
"""
from __future__ import annotations

import os
import queue as queue_module
import traceback
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from .cpu_heap import retain_freed_memory
from .text import InputItem

# Work units per worker: the pool hands out this many chunks per process so that a slow one (a busy
# GPU, longer texts) does not hold up the others.
CHUNKS_PER_WORKER = 4
_POLL_SECONDS = 1.0


def _longest_first(items: Sequence[InputItem]):
    """(characters per input, input indices by decreasing characters, ties in input order)."""
    sizes = [len(instruction) + len(text) for instruction, text in items]
    return sizes, sorted(range(len(items)), key=lambda i: (-sizes[i], i))


def balanced_shards(items: Sequence[InputItem], parts: int) -> List[List[int]]:
    """``parts`` lists of input indices, each sorted by decreasing length, with near-equal characters.

    Longest first, each input goes to the part with the fewest characters so far (ties to the lowest
    part), so every part gets a similar mix of lengths. Deterministic: every rank computes the same split.
    """
    if not isinstance(parts, int) or isinstance(parts, bool) or parts < 1:
        raise ValueError(f"parts must be a positive int, got {parts!r}")
    sizes, order = _longest_first(items)
    shards: List[List[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    for i in order:
        target = min(range(parts), key=lambda p: (load[p], p))
        shards[target].append(i)
        load[target] += sizes[i] + 1  # + 1: empty texts still cost a row
    return shards


def _chunks_for_pool(items: Sequence[InputItem], workers: int) -> List[List[int]]:
    """Work units for the pool's shared queue: consecutive runs of the length-sorted inputs (similar
    lengths batch well), longest first so that the big units start early."""
    _, order = _longest_first(items)
    count = max(1, min(len(order), workers * CHUNKS_PER_WORKER))
    step = -(-len(order) // count)
    return [order[start:start + step] for start in range(0, len(order), step)]


# ------------------------------------------------------------------------------------------ the pool

def _check_devices(devices) -> List[str]:
    if isinstance(devices, (str, torch.device)) or not isinstance(devices, (list, tuple)) or not devices:
        raise ValueError(f"devices must be a non-empty list of devices such as ['cuda:0', 'cuda:1'], got {devices!r}")
    checked = []
    for position, device in enumerate(devices):
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"devices[{position}] must name a device such as 'cuda:0' or 'cpu', got {device!r}") \
                from None
        if parsed.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"devices[{position}] is {device!r} but CUDA is not available")
            index = 0 if parsed.index is None else parsed.index
            if index >= torch.cuda.device_count():
                raise ValueError(f"devices[{position}] is {device!r} but only {torch.cuda.device_count()} CUDA "
                                 f"devices are visible")
            parsed = torch.device("cuda", index)
        checked.append(str(parsed))
    return checked


def _worker(rank: int, device: str, cpu_threads: int, source: Dict[str, Any], tasks, results) -> None:
    """One pool process: load the encoder once, then encode the chunks it takes from ``tasks``."""
    try:
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        else:
            torch.set_num_threads(cpu_threads)
            retain_freed_memory()  # the worker process is ours (see cpu_heap.py)
        if "encoder" in source:
            encoder = source["encoder"]
        else:
            from .llm2vec import LLM2Vec
            encoder = LLM2Vec.from_pretrained(*source["args"], **source["kwargs"])
        results.put(("ready", rank, os.getpid()))
    except BaseException:  # report instead of dying silently: the parent raises it
        results.put(("error", rank, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            return
        job, chunk, items, settings, kwargs = task
        try:
            for name, value in settings.items():  # the parent's current pooling and length settings
                setattr(encoder, name, value)
            embeddings = encoder.encode(items, show_progress_bar=False, convert_to_numpy=True, device=device,
                                        **kwargs)
            results.put(("done", job, chunk, embeddings))
        except BaseException:
            results.put(("error", rank, traceback.format_exc()))


class EncodePool:
    """One encoding process per device; see the module docstring. Use as a context manager or call
    :meth:`close`. ``worker_pids`` lists the processes (one model load each)."""

    def __init__(self, encoder, devices: Sequence[str], load_in_workers: Optional[bool] = None):
        import torch.multiprocessing as mp

        self.devices = _check_devices(devices)
        spec = getattr(encoder, "_load_spec", None)
        if load_in_workers is None:  # share a CPU model as it is now; load others from their checkpoint
            load_in_workers = any(p.device.type != "cpu" for p in encoder.parameters())
        if not load_in_workers:
            if any(p.device.type != "cpu" for p in encoder.parameters()):
                raise ValueError("load_in_workers=False shares the model with the workers, which needs it on the "
                                 "CPU; call encoder.to('cpu') first")
            source: Dict[str, Any] = {"encoder": encoder}  # its CPU weights go through shared memory, once
        elif spec is not None:
            source = {"args": spec["args"], "kwargs": dict(spec["kwargs"])}
            source["kwargs"].pop("device_map", None)  # each worker places its own copy on its device
        else:
            raise ValueError("the workers can only load an encoder that came from LLM2Vec.from_pretrained; for "
                             "this one call encoder.to('cpu') first (the workers then share its weights)")
        self.loads_in_workers = load_in_workers
        context = mp.get_context("spawn")
        self._tasks = context.Queue()
        self._results = context.Queue()
        cpu_workers = sum(d == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        self._processes = [context.Process(target=_worker, daemon=True,
                                           args=(rank, device, threads, source, self._tasks, self._results))
                           for rank, device in enumerate(self.devices)]
        self._next_job = 0
        self.worker_pids: List[int] = []
        for process in self._processes:
            process.start()
        try:
            ready = 0
            while ready < len(self._processes):
                message = self._receive()
                if message[0] == "ready":
                    ready += 1
                    self.worker_pids.append(message[2])
        except BaseException:
            self.close()
            raise

    def _receive(self):
        """The next worker message; raises when a worker failed or died."""
        while True:
            try:
                message = self._results.get(timeout=_POLL_SECONDS)
            except queue_module.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"an encoding worker exited unexpectedly (exit code {dead[0].exitcode})")
                continue
            if message[0] == "error":
                raise RuntimeError(f"encoding worker {message[1]} ({self.devices[message[1]]}) failed:\n{message[2]}")
            return message

    def encode(self, items: Sequence[InputItem], hidden_size: int, progress=None,
               settings: Optional[Dict[str, Any]] = None, **encode_kwargs) -> np.ndarray:
        """(N, hidden) float32 embeddings of normalised (instruction, text) items, in input order;
        ``settings`` are encoder attributes the workers set first, ``encode_kwargs`` go to their encode."""
        if self._processes is None:
            raise RuntimeError("this EncodePool is closed")
        out = np.zeros((len(items), hidden_size), dtype=np.float32)
        job = self._next_job
        self._next_job += 1
        chunks = _chunks_for_pool(items, len(self._processes)) if items else []
        for number, chunk in enumerate(chunks):
            self._tasks.put((job, number, [list(items[i]) for i in chunk], settings or {}, encode_kwargs))
        pending = len(chunks)
        try:
            while pending:
                message = self._receive()
                if message[0] != "done" or message[1] != job:
                    continue  # a late message of an earlier, failed job
                chunk = chunks[message[2]]
                out[np.asarray(chunk, dtype=np.int64)] = message[3]
                pending -= 1
                if progress is not None:
                    progress(len(chunk))
        except BaseException:
            self.close()  # a failed job leaves work queued: the pool cannot be reused
            raise
        return out

    def close(self) -> None:
        if self._processes is None:
            return
        for _ in self._processes:
            try:
                self._tasks.put(None)
            except (OSError, ValueError):
                pass
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
        self._processes = None

    def __enter__(self) -> "EncodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# ------------------------------------------------------------------------------------- torchrun ranks

def encode_over_ranks(encode_local, items: Sequence[InputItem], hidden_size: int) -> torch.Tensor:
    """Every rank's share of ``items`` encoded by ``encode_local(list_of_items) -> (n, hidden) tensor``,
    all rows gathered to every rank in input order. Needs an initialised process group."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group (launch with "
                         "torchrun and call torch.distributed.init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    shards = balanced_shards(items, world)
    mine = shards[rank]
    local = encode_local([items[i] for i in mine]).float().cpu()
    # Collectives need the backend's device: CUDA tensors for NCCL, CPU tensors for gloo.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    widest = max(len(s) for s in shards)
    padded = torch.zeros((widest, hidden_size), dtype=torch.float32, device=device)
    padded[: len(mine)] = local.to(device)
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.zeros((len(items), hidden_size), dtype=torch.float32)
    for shard, rows in zip(shards, gathered):
        if shard:
            out[torch.tensor(shard, dtype=torch.long)] = rows[: len(shard)].cpu()
    return out
