"""Encoding with several processes: one per device (``devices=``), or one per ``torchrun`` rank.

Both paths split the inputs the same way (:func:`balanced_shards`): sorted by length, dealt out so that
every part holds about the same number of characters, then each part is encoded with the ordinary
single-process ``LLM2Vec.encode`` and the rows are put back in input order.

- :class:`EncodePool` (``LLM2Vec.start_multi_process_pool(devices)``, or ``encode(..., devices=[...])``
  for a one-off) starts one worker process per device. Each worker gets the model once: it loads the
  checkpoint itself when the encoder came from ``LLM2Vec.from_pretrained`` (its arguments are recorded),
  otherwise it receives the encoder once at start (CPU weights travel through shared memory). After
  that only texts go to the workers and embeddings come back; the model is never pickled per batch.
  A worker that dies (even halfway through sending its rows) fails the job with a RuntimeError, never a
  hang; workers exit when their parent dies, however it dies; an error or Ctrl-C stops the pool within
  seconds; threads sharing a pool take turns; a pool refuses an encoder whose model its workers do not hold.
- :func:`encode_over_ranks` (``encode(..., distributed=True)``) runs under an initialised
  ``torch.distributed`` process group (``torchrun``, any number of nodes): every rank passes the same
  inputs (checked: otherwise every rank raises the same ValueError), encodes its share, and receives all
  rows. Ranks must all call it, as with any collective.
"""
from __future__ import annotations

import multiprocessing.connection as mp_connection
import os
import signal
import threading
import time
import traceback
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .cpu_heap import retain_freed_memory
from .text import InputItem, items_digest

# Work units per worker: the pool hands out this many chunks per process so that a slow one (a busy
# GPU, longer texts) does not hold up the others.
CHUNKS_PER_WORKER = 4
_POLL_SECONDS = 1.0  # how often a worker checks that its parent is alive
_STOP_SECONDS = 3.0  # how long close() waits for the workers before it kills them


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
    """Work units the pool hands to its idle workers: consecutive runs of the length-sorted inputs (similar
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


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this worker once its parent is gone, even mid-chunk: a parent killed by SIGKILL
    cannot close the pool, and a worker left behind would hold a model copy (and its GPU) forever. It polls
    ``getppid`` rather than using ``PR_SET_PDEATHSIG``, which fires when the *thread* that started the worker
    ends: it would kill the workers of a pool started from a short-lived thread."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_POLL_SECONDS)
        os._exit(1)
    threading.Thread(target=watch, name="llm2vec-fast-parent-watch", daemon=True).start()


def _worker(rank: int, device: str, cpu_threads: int, source: Dict[str, Any], tasks, results,
            parent_pid: int) -> None:
    """One pool process: load the encoder once, then encode each chunk the parent sends on ``tasks`` (one at a
    time) and send its rows back on ``results``. Ends on ``None``, or when the parent closed its pipe or died."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent decides
    _exit_with_parent(parent_pid)
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
    except BaseException:  # report instead of dying silently: the parent raises it
        try:
            results.send(("error", rank, traceback.format_exc()))
        except OSError:
            pass
        return
    message: Tuple = ("ready", rank, os.getpid())
    while True:
        try:
            results.send(message)
            task = tasks.recv()
        except (EOFError, OSError):  # the pool was closed, or the parent died
            return
        if task is None:
            return
        chunk, items, settings, kwargs = task
        try:
            for name, value in settings.items():  # the parent's current pooling and length settings
                setattr(encoder, name, value)
            embeddings = encoder.encode(items, show_progress_bar=False, convert_to_numpy=True, device=device,
                                        **kwargs)
            message = ("done", rank, chunk, embeddings)
        except BaseException:
            message = ("error", rank, traceback.format_exc())


def _comparable_spec(spec: Optional[Dict[str, Any]]):
    """What makes two ``from_pretrained`` loads the same model: the arguments, less the placement (each worker
    places its own copy) and the encoder settings (every job sends the caller's)."""
    if spec is None:
        return None
    from .llm2vec import ENCODER_ARGS
    kwargs = {k: v for k, v in spec["kwargs"].items() if k != "device_map" and k not in ENCODER_ARGS}
    return tuple(spec["args"]), kwargs


def _describe(encoder) -> str:
    spec = getattr(encoder, "_load_spec", None)
    where = f"{type(encoder).__name__} at {id(encoder):#x}"
    return where if spec is None else f"{where} (from_pretrained{tuple(spec['args'])!r}, {spec['kwargs']!r})"


class EncodePool:
    """One encoding process per device; see the module docstring. Use as a context manager or call
    :meth:`close`. ``worker_pids`` lists the processes (one model load each).

    Each worker has its own pair of pipes, and the parent hands a chunk only to an idle worker, one at a time:
    the parent waits on the result pipes and the processes' sentinels together, and a worker that dies, even
    halfway through sending, closes its pipe, so the parent never waits on a dead worker. Jobs from several
    threads run one after another (a lock). A pool serves only the encoder it was started from (see
    :meth:`serves`)."""

    def __init__(self, encoder, devices: Sequence[str], load_in_workers: Optional[bool] = None):
        import torch.multiprocessing as mp

        self._processes: Optional[List[Any]] = None
        self._lock = threading.RLock()  # reentrant: a failing job closes the pool while holding it
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
        self._owner = weakref.ref(encoder)
        self._owner_name = _describe(encoder)
        self._spec = _comparable_spec(spec) if load_in_workers else None
        context = mp.get_context("spawn")
        cpu_workers = sum(d == "cpu" for d in self.devices)
        threads = max(1, (os.cpu_count() or 1) // max(1, cpu_workers))
        self._tasks: List[Any] = []  # the parent's ends: tasks[rank] to send, results[rank] to receive
        self._results: List[Any] = []
        self._busy: Dict[int, int] = {}  # rank -> the chunk it is encoding
        self._processes = []
        self.worker_pids: List[int] = []
        try:
            for rank, device in enumerate(self.devices):
                task_reader, task_writer = context.Pipe(duplex=False)
                result_reader, result_writer = context.Pipe(duplex=False)
                process = context.Process(target=_worker, daemon=True,
                                          args=(rank, device, threads, source, task_reader, result_writer,
                                                os.getpid()))
                self._processes.append(process)
                self._tasks.append(task_writer)
                self._results.append(result_reader)
                process.start()
                # Only the worker may hold these ends: its death then ends our reads (EOF) and sends (EPIPE).
                task_reader.close()
                result_writer.close()
            pids: Dict[int, int] = {}
            while len(pids) < len(self._processes):
                message = self._receive()
                if message[0] == "ready":
                    pids[message[1]] = message[2]
            self.worker_pids = [pids[rank] for rank in range(len(self._processes))]
        except BaseException:
            self.close()
            raise

    def serves(self, encoder) -> bool:
        """Whether this pool's workers hold ``encoder``'s model: the very encoder the pool was started from when
        its model was shared with the workers, or, when the workers loaded it themselves, any encoder loaded by
        ``LLM2Vec.from_pretrained`` with the same arguments (the pooling and length settings aside: every job
        sends the caller's). Weights changed after loading are not compared."""
        if self._owner() is encoder:
            return True
        return self._spec is not None and _comparable_spec(getattr(encoder, "_load_spec", None)) == self._spec

    def _died(self, rank: int) -> RuntimeError:
        process = self._processes[rank]
        process.join(timeout=1)  # its pipe closed a moment before the process is reaped
        return RuntimeError(f"an encoding worker exited unexpectedly (worker {rank} ({self.devices[rank]}), "
                            f"exit code {process.exitcode})")

    def _receive(self):
        """The next worker message; raises when a worker failed or died. Cannot hang on a dead worker: a
        message is read only once its pipe is readable, and a worker's death closes its end of the pipe, so
        even a half-sent message ends in EOF."""
        readers = {reader: rank for rank, reader in enumerate(self._results)}
        sentinels = {process.sentinel: rank for rank, process in enumerate(self._processes)}
        while True:
            ready = mp_connection.wait(list(readers) + list(sentinels))
            for reader in [r for r in ready if r in readers]:  # messages first: a failing worker's traceback
                rank = readers[reader]
                try:
                    message = reader.recv()
                except (EOFError, OSError):
                    raise self._died(rank) from None
                if message[0] == "error":
                    raise RuntimeError(f"encoding worker {message[1]} ({self.devices[message[1]]}) failed:\n"
                                       f"{message[2]}")
                return message
            for sentinel in ready:
                if sentinel in sentinels:
                    raise self._died(sentinels[sentinel])

    def _send(self, rank: int, task) -> None:
        try:
            self._tasks[rank].send(task)
        except OSError:  # EPIPE: the worker is gone
            raise self._died(rank) from None

    def encode(self, items: Sequence[InputItem], hidden_size: int, progress=None,
               settings: Optional[Dict[str, Any]] = None, encoder=None, **encode_kwargs) -> np.ndarray:
        """(N, hidden) float32 embeddings of normalised (instruction, text) items, in input order;
        ``settings`` are encoder attributes the workers set first, ``encode_kwargs`` go to their encode.
        ``encoder``, the caller, must be one this pool :meth:`serves` (else the rows would be another model's).
        Threads that share the pool take turns."""
        with self._lock:
            if self._processes is None:
                raise RuntimeError("this EncodePool is closed")
            if encoder is not None and not self.serves(encoder):
                raise ValueError(f"pool was started from encoder {self._owner_name} and its workers hold that "
                                 f"model; it cannot encode for encoder {_describe(encoder)}: start a pool from "
                                 f"this encoder (encoder.start_multi_process_pool)")
            out = np.zeros((len(items), hidden_size), dtype=np.float32)
            chunks = _chunks_for_pool(items, len(self._processes)) if items else []
            waiting = list(range(len(chunks)))[::-1]  # popped from the end: the longest chunks first
            idle = list(range(len(self._processes)))[::-1]

            def hand_out() -> None:  # only to idle workers: they are reading their pipe, so a send finishes
                while waiting and idle:
                    rank, number = idle.pop(), waiting.pop()
                    self._busy[rank] = number
                    self._send(rank, (number, [list(items[i]) for i in chunks[number]], settings or {},
                                      encode_kwargs))
            try:
                hand_out()
                for _ in chunks:
                    _, rank, number, rows = self._receive()  # ("done", ...): the workers are ready by now
                    del self._busy[rank]
                    idle.append(rank)
                    hand_out()  # before the copy and the progress bar: the worker goes on meanwhile
                    out[np.asarray(chunks[number], dtype=np.int64)] = rows
                    if progress is not None:
                        progress(len(chunks[number]))
            except BaseException:
                self.close()  # stops the other workers' chunks: the pool cannot be reused
                raise
            return out

    def close(self) -> None:
        """Stops the workers within about :data:`_STOP_SECONDS`: idle ones are told to stop, those still
        encoding a chunk of a failed or interrupted job are terminated (their rows would be thrown away)."""
        with self._lock:
            if self._processes is None:
                return
            processes, self._processes = self._processes, None
            for rank, connection in enumerate(self._tasks):
                if rank not in self._busy:
                    try:
                        connection.send(None)
                    except OSError:
                        pass
            for rank in self._busy:
                if processes[rank].is_alive():
                    processes[rank].terminate()
            deadline = time.monotonic() + _STOP_SECONDS
            for process in processes:
                if process.pid is not None:
                    process.join(timeout=max(0.0, deadline - time.monotonic()))
            for process in processes:
                if process.pid is not None and process.is_alive():
                    process.kill()
                    process.join(timeout=_STOP_SECONDS)
            for connection in self._tasks + self._results:
                connection.close()
            self._busy.clear()

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

def _fingerprint(items: Sequence[InputItem]) -> List[int]:
    """[count, :func:`items_digest` as two int64]: equal on two ranks only for the same items in the same order."""
    raw = items_digest(items)
    return [len(items), int.from_bytes(raw[:8], "little", signed=True), int.from_bytes(raw[8:], "little", signed=True)]


def _check_same_inputs(items: Sequence[InputItem], world: int, rank: int, device: torch.device) -> None:
    """Raises the same ValueError on every rank when the ranks were given different inputs: the split assumes the
    same list everywhere (else rows come back from another rank's texts, or the gather of unequal shapes aborts).
    Every rank sees every fingerprint, so all of them raise, or none: no rank is left waiting in a collective."""
    import torch.distributed as dist

    mine = torch.tensor(_fingerprint(items), dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)
    prints = [tuple(int(x) for x in t.cpu()) for t in gathered]
    differ = [r for r in range(world) if prints[r] != prints[0]]
    if differ:
        counts = ", ".join(f"rank {r}: {prints[r][0]} inputs" for r in range(world))
        raise ValueError(f"distributed=True needs the same inputs, in the same order, on every rank; got different "
                         f"inputs on rank 0 and rank {differ[0]} ({counts}; the ranks differing from rank 0: "
                         f"{differ})")


def encode_over_ranks(encode_local, items: Sequence[InputItem], hidden_size: int) -> torch.Tensor:
    """Every rank's share of ``items`` encoded by ``encode_local(list_of_items) -> (n, hidden) tensor``,
    all rows gathered to every rank in input order. Needs an initialised process group, and the same ``items``
    on every rank (else ValueError, on every rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("distributed=True needs an initialised torch.distributed process group (launch with "
                         "torchrun and call torch.distributed.init_process_group first)")
    world, rank = dist.get_world_size(), dist.get_rank()
    # Collectives need the backend's device: CUDA tensors for NCCL, CPU tensors for gloo.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else \
        torch.device("cpu")
    _check_same_inputs(items, world, rank, device)
    shards = balanced_shards(items, world)
    mine = shards[rank]
    local = encode_local([items[i] for i in mine]).float().cpu()
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
