"""Encoding files into resumable shards: what ``llm2vec-fast encode`` runs.

    python -m llm2vec_fast.encoder.files --model PATH [--peft PATH] --input FILE --output DIR [options]

The input is streamed: ``.txt`` (one text per line), ``.jsonl`` (a ``text`` field and an optional
``instruction`` field per line) or ``.parquet`` (the same columns; needs pyarrow). Rows are cut into
shards of ``--shard-size`` rows; each shard is encoded, written as ``shard-000000.npy`` (float32 or
float16, shape (rows, hidden)) through a temporary file and an atomic rename, and only then recorded in
``index.json`` (also replaced atomically). A run that is interrupted and started again with the same
arguments skips the recorded shards (never recomputing them) and encodes the rest, so no row is lost or
duplicated. ``index.json`` also records the input's identity, the settings and a digest of each shard's
rows; resuming with other settings, or with an input whose recorded rows changed, is refused.
:func:`load_embeddings` reads the result back in input order (:func:`iter_embeddings` shard by shard,
memory-mapped, for runs larger than memory).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from .text import check_unicode, items_digest

INDEX = "index.json"
FORMAT = "llm2vec_fast.shards/1"
SHARD_NAME = "shard-{:06d}.npy"
PROGRESS_PREFIX = "progress-rank"
PROGRESS_NAME = PROGRESS_PREFIX + "{}.json"


def _name_pattern(template: str) -> str:
    """The regular expression of the names a ``{}`` template makes (any number in place of the field)."""
    before, _, after = template.partition("{")
    return re.escape(before) + r"\d+" + re.escape(after.partition("}")[2])


PROGRESS_FILE = re.compile(_name_pattern(PROGRESS_NAME))
# What a run may delete when it ends: its merged progress files and the temporary files of interrupted writes,
# never another file that happens to be in the output folder.
LEFTOVER_FILE = re.compile(rf"{PROGRESS_FILE.pattern}(\.tmp)?|({_name_pattern(SHARD_NAME)}|{re.escape(INDEX)})\.tmp")
STORAGE_DTYPES = {"float32": np.float32, "float16": np.float16}


# ------------------------------------------------------------------------------------------ reading

def input_format(path: str) -> str:
    """"txt", "jsonl" or "parquet", from the file name (ValueError for anything else)."""
    lower = os.fspath(path).lower()
    for suffixes, kind in (((".jsonl", ".json"), "jsonl"), ((".parquet",), "parquet"), ((".txt",), "txt")):
        if lower.endswith(suffixes):
            return kind
    raise ValueError(f"{path}: unknown input format (expected .txt, .jsonl or .parquet)")


def _text_lines(path: str) -> Iterator[str]:
    """The lines of a UTF-8 text file, split at "\n" only (a stray "\r" inside a line stays in it, and "\r\n"
    ends a line as "\n" does), without their line end or a leading byte-order mark."""
    number = 0
    with open(path, encoding="utf-8-sig", newline="\n") as f:
        try:
            for number, line in enumerate(f, start=1):
                line = line[:-1] if line.endswith("\n") else line
                yield line[:-1] if line.endswith("\r") else line
        except UnicodeDecodeError as error:  # decoded a block at a time: the bad byte is past the last good line
            raise ValueError(f"{path}: not UTF-8 text after line {number} ({error.reason}: "
                             f"{error.object[error.start:error.end]!r})") from None


def read_records(path: str, text_field: str = "text", instruction_field: str = "instruction"
                 ) -> Iterator[Tuple[str, str]]:
    """(instruction, text) per row of a .txt, .jsonl or .parquet file, in order, streamed."""
    kind = input_format(path)
    if kind == "jsonl":
        yield from _read_jsonl(path, text_field, instruction_field)
    elif kind == "parquet":
        yield from _read_parquet(path, text_field, instruction_field)
    else:
        for number, line in enumerate(_text_lines(path), start=1):
            yield "", check_unicode(line, f"{path}:{number}")


def _record(row: Dict[str, Any], where: str, text_field: str, instruction_field: str) -> Tuple[str, str]:
    text = row.get(text_field)
    if text is None and text_field not in row:
        raise ValueError(f"{where}: no field {text_field!r} (fields: {sorted(row)})")
    if not isinstance(text, str):
        raise ValueError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    instruction = row.get(instruction_field)
    if instruction is None:
        instruction = ""
    if not isinstance(instruction, str):
        raise ValueError(f"{where}: field {instruction_field!r} must be a string, got {type(instruction).__name__}")
    return check_unicode(instruction, f"{where}: field {instruction_field!r}"), \
        check_unicode(text, f"{where}: field {text_field!r}")


def iter_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, object) per non-blank line of a .jsonl file; ValueError naming file:line otherwise."""
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        yield number, row


def _read_jsonl(path: str, text_field: str, instruction_field: str) -> Iterator[Tuple[str, str]]:
    for number, row in iter_jsonl(path):
        yield _record(row, f"{path}:{number}", text_field, instruction_field)


def _read_parquet(path: str, text_field: str, instruction_field: str) -> Iterator[Tuple[str, str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        source = pq.ParquetFile(path)
    except ValueError as error:  # pyarrow's ArrowInvalid: its message does not name the file
        raise ValueError(f"{path}: not a Parquet file ({error})") from None
    if text_field not in source.schema.names:
        raise ValueError(f"{path}: no column {text_field!r} (columns: {source.schema.names})")
    columns = [text_field] + ([instruction_field] if instruction_field in source.schema.names else [])
    number = 0
    for batch in source.iter_batches(columns=columns, batch_size=4096):
        for row in batch.to_pylist():
            number += 1
            yield _record(row, f"{path}: row {number}", text_field, instruction_field)


def _chunks(records: Iterator[Tuple[str, str]], size: int) -> Iterator[List[Tuple[str, str]]]:
    chunk: List[Tuple[str, str]] = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -------------------------------------------------------------------------------------------- index

def input_identity(path: str) -> Dict[str, Any]:
    """Size and SHA-256 of the first MiB: a different input is refused before the model runs (an edit past the
    first MiB is caught by the shards' digests as the rows are read again)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
    return {"path": os.path.abspath(path), "size": os.path.getsize(path), "sha256_first_mib": digest.hexdigest()}


def _write_json_atomic(path: str, data: Dict[str, Any]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_index(output: str) -> Optional[Dict[str, Any]]:
    path = os.path.join(output, INDEX)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        try:
            index = json.load(f)
        except ValueError as error:  # an unrelated index.json (our writes are atomic: never cut short)
            raise ValueError(f"{path} is not an llm2vec_fast shard index (not JSON: {error})") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        found = f"format {index.get('format')!r}" if isinstance(index, dict) else f"a JSON {type(index).__name__}"
        raise ValueError(f"{path} is not an llm2vec_fast shard index ({found})")
    return index


def _shard_ok(output: str, shard: Dict[str, Any], dim: int) -> bool:
    path = os.path.join(output, shard["file"])
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return array.shape == (shard["rows"], dim)


def _finished_shards(output: str) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    index = _load_index(output)
    if index is None:
        raise FileNotFoundError(f"{output} has no {INDEX}")
    if not index.get("complete"):
        raise ValueError(f"{output}: the run is not complete (resume it with the same arguments)")
    shards = sorted(index["shards"], key=lambda s: s["start"])
    missing = _missing_rows(shards, index["rows"])
    if missing:
        raise ValueError(f"{output}: rows {missing} have no shard in {INDEX} (resume the run with the same arguments)")
    return index, shards


def _load_shards(output: str, shards: List[Dict[str, Any]], mmap: bool) -> Iterator[Tuple[int, np.ndarray]]:
    for shard in shards:
        yield shard["start"], np.load(os.path.join(output, shard["file"]), mmap_mode="r" if mmap else None)


def iter_embeddings(output: str, mmap: bool = True) -> Iterator[Tuple[int, np.ndarray]]:
    """(first row, (rows, hidden) array) per shard of a finished run, in input order; memory-mapped by
    default, so a corpus larger than memory can be streamed (into an index, say) shard by shard."""
    _, shards = _finished_shards(output)
    return _load_shards(output, shards, mmap)


def load_embeddings(output: str, mmap: bool = False) -> np.ndarray:
    """The embeddings of a finished run, (rows, hidden), in input order, as one array in memory (with
    ``mmap=True`` the shards are read through memory maps; a run of one shard is returned as its map).
    For runs larger than memory, use :func:`iter_embeddings`."""
    index, shards = _finished_shards(output)
    arrays = [array for _, array in _load_shards(output, shards, mmap)]
    if not arrays:
        return np.zeros((0, index["dim"]), dtype=STORAGE_DTYPES[index["settings"]["output_dtype"]])
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


# ------------------------------------------------------------------------------------------ encoding

def encode_file(encoder, input_path: str, output: str, *, settings: Optional[Dict[str, Any]] = None,
                shard_size: int = 10_000, output_dtype: str = "float32", text_field: str = "text",
                instruction_field: str = "instruction", instruction: str = "", truncate_dim: Optional[int] = None,
                log=print, **encode_kwargs) -> Dict[str, Any]:
    """Encodes ``input_path`` into shards under ``output`` (resuming a previous run there); returns the index.

    ``instruction`` goes before every text whose row has no instruction of its own (e.g. the retrieval
    instruction when encoding queries; documents usually have none). ``settings`` (e.g. the model path
    and options) are recorded and must match on resume, together with whether the model is bidirectional,
    the encoder's pooling settings, ``instruction``, ``shard_size``, ``output_dtype`` and the input's
    identity. ``truncate_dim`` keeps each embedding's first dimensions (a Matryoshka-trained model),
    normalised after the cut when ``normalize_embeddings``. ``encode_kwargs`` go to ``encoder.encode``
    (batch_size, device, normalize_embeddings, ...).
    """
    if not isinstance(instruction, str):
        raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
    if not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if output_dtype not in STORAGE_DTYPES:
        raise ValueError(f"output_dtype must be one of {sorted(STORAGE_DTYPES)}, got {output_dtype!r}")
    input_format(input_path)
    hidden = encoder._hidden_size()
    if truncate_dim is not None and (not isinstance(truncate_dim, int) or isinstance(truncate_dim, bool)
                                     or not 0 < truncate_dim <= hidden):
        raise ValueError(f"truncate_dim must be an int in [1, {hidden}] (the model's hidden size), got "
                         f"{truncate_dim!r}")
    os.makedirs(output, exist_ok=True)
    from ..models.bidirectional import is_bidirectional  # torch: imported when a file is encoded
    recorded = dict(settings or {}, bidirectional=is_bidirectional(encoder.model),
                    pooling_mode=encoder.pooling_mode, max_length=encoder.max_length,
                    doc_max_length=encoder.doc_max_length, skip_instruction=encoder.skip_instruction,
                    normalize_embeddings=bool(encode_kwargs.get("normalize_embeddings", False)),
                    shard_size=shard_size, output_dtype=output_dtype, text_field=text_field,
                    instruction_field=instruction_field, instruction=instruction, truncate_dim=truncate_dim)
    recorded = json.loads(json.dumps(recorded))  # as it reads back from index.json
    identity = input_identity(input_path)
    dim = truncate_dim or hidden
    from ..distributed import rank_and_world  # torch: imported when a file is encoded, not by the CLI parser
    rank, world = rank_and_world()
    if rank == 0:
        index = _open_index(output, identity, recorded, dim)
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # rank 0 has created or checked index.json
        if rank != 0:
            index = _open_index(output, identity, recorded, dim)
    done = {s["start"]: s for s in _recorded_shards(output, index) if _shard_ok(output, s, dim)}
    # Progress goes to index.json in a single process; with several ranks each records its own shards in a
    # progress file (no two processes write one file) and rank 0 merges them at the end.
    progress_path = os.path.join(output, INDEX if world == 1 else PROGRESS_NAME.format(rank))
    progress = index if world == 1 else {"format": FORMAT, "shards": []}
    index["complete"] = False  # until every shard is there again: a finished run being repaired is not complete
    mine: Dict[int, Dict[str, Any]] = {}
    encode_kwargs.setdefault("show_progress_bar", False)
    rows = 0
    encoded = skipped = 0
    for number, chunk in enumerate(_chunks(read_records(input_path, text_field, instruction_field), shard_size)):
        start = number * shard_size
        rows = start + len(chunk)
        digest = items_digest(chunk).hex()
        if start in done and done[start].get("digest", digest) != digest:
            # The size and first MiB (input_identity) matched, but these rows are not the ones that were encoded.
            raise ValueError(f"{input_path}: rows {start}..{start + done[start]['rows'] - 1} differ from those "
                             f"{os.path.join(output, done[start]['file'])} holds (the input changed since that "
                             f"run); use a new output folder")
        if start in done and done[start]["rows"] == len(chunk):
            skipped += 1
            continue
        if number % world != rank:  # another rank's shard
            continue
        embeddings = encoder.encode([[own or instruction, text] for own, text in chunk], convert_to_numpy=True,
                                    truncate_dim=truncate_dim, **encode_kwargs)
        name = SHARD_NAME.format(number)
        path = os.path.join(output, name)
        with open(path + ".tmp", "wb") as f:
            np.save(f, embeddings.astype(STORAGE_DTYPES[output_dtype], copy=False))
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
        shard = {"file": name, "start": start, "rows": len(chunk), "digest": digest}
        mine[start] = shard
        # Each rank's file keeps the earlier runs' shards too: rank 0 merges them only at the end, so a run
        # stopped again before that must still find them.
        progress["shards"] = sorted({**done, **mine}.values(), key=lambda s: s["start"])
        _write_json_atomic(progress_path, progress)
        encoded += 1
        log(f"shard {number}: rows {start}..{rows - 1} written" + (f" (rank {rank})" if world > 1 else ""))
    if world > 1:
        import torch.distributed as dist
        dist.barrier()  # every rank's shards are written and recorded
        if rank != 0:
            dist.barrier()  # rank 0 writes the final index
            return _load_index(output)
        done.update({s["start"]: s for s in _recorded_shards(output, index) if _shard_ok(output, s, dim)})
    done.update(mine)
    index["shards"] = sorted((s for s in done.values() if s["start"] < rows), key=lambda s: s["start"])
    missing = _missing_rows(index["shards"], rows)
    if missing:
        raise RuntimeError(f"{output}: rows {missing} have no shard after encoding; resume the run")
    index["complete"], index["rows"] = True, rows
    _write_json_atomic(os.path.join(output, INDEX), index)
    for name in os.listdir(output):  # merged progress files, leftovers of writes that were interrupted
        if LEFTOVER_FILE.fullmatch(name):
            os.remove(os.path.join(output, name))
    log(f"done: {rows} rows in {len(index['shards'])} shards ({encoded} encoded now"
        f"{' by rank 0' if world > 1 else ''}, {skipped} from before)")
    if world > 1:
        dist.barrier()
    return index


def _open_index(output: str, identity: Dict[str, Any], recorded: Dict[str, Any], dim: int) -> Dict[str, Any]:
    """The run's index: the recorded one when input and settings match (else ValueError), or a new one."""
    index = _load_index(output)
    if index is not None:
        settings = index["settings"]
        differences = [f"{key}: {settings.get(key)!r} there, {recorded.get(key)!r} now"
                       for key in sorted(set(settings) | set(recorded)) if settings.get(key) != recorded.get(key)]
        if index["input"]["size"] != identity["size"] or \
                index["input"]["sha256_first_mib"] != identity["sha256_first_mib"]:
            differences.append(f"input: {index['input']['path']} ({index['input']['size']} bytes) there, "
                               f"{identity['path']} ({identity['size']} bytes) now")
        if index["dim"] != dim:
            differences.append(f"embedding size: {index['dim']} there, {dim} now")
        if differences:
            raise ValueError(f"{output} holds a run with another input or other settings; use a new output folder "
                             f"({'; '.join(differences)})")
        return index
    index = {"format": FORMAT, "input": identity, "settings": recorded, "dim": dim, "shards": [],
             "complete": False, "rows": None}
    _write_json_atomic(os.path.join(output, INDEX), index)
    return index


def _recorded_shards(output: str, index: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The shards index.json records plus those in the ranks' progress files (a multi-rank run that
    stopped before its final merge)."""
    shards = list(index["shards"])
    for name in sorted(os.listdir(output)):
        if PROGRESS_FILE.fullmatch(name):
            try:
                with open(os.path.join(output, name), encoding="utf-8") as f:
                    shards.extend(json.load(f).get("shards", []))
            except (OSError, ValueError):
                continue  # a progress file cut short: its shards are encoded again
    return shards


def _missing_rows(shards: List[Dict[str, Any]], rows: int) -> Optional[str]:
    covered = 0
    for shard in shards:
        if shard["start"] != covered:
            return f"{covered}..{shard['start'] - 1}"
        covered += shard["rows"]
    return None if covered == rows else f"{covered}..{rows - 1}"


# ----------------------------------------------------------------------------------------------- CLI

def add_model_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options that load an ``LLM2Vec`` (shared by ``encode`` and ``export``): :func:`load_encoder`."""
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id (read offline from the cache)")
    parser.add_argument("--peft", default=None, help="a second peft adapter (llm2vec's peft_model_name_or_path)")
    parser.add_argument("--merge-peft", action="store_true", help="merge the --peft adapter into the model")
    parser.add_argument("--pooling-mode", default=None,
                        choices=("mean", "weighted_mean", "eos_token", "last_token", "bos_token"),
                        help="default: llm2vec_config.json's, else mean")
    parser.add_argument("--max-length", type=int, default=None)
    parser.add_argument("--doc-max-length", type=int, default=None)
    parser.add_argument("--skip-instruction", default=None, action=argparse.BooleanOptionalAction)
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"),
                        help="model dtype (default bfloat16)")
    parser.add_argument("--attn-implementation", default=None, help='default "llm2vec_fast"')
    return parser


def check_model_arguments(args: argparse.Namespace) -> None:
    """Refusals of :func:`add_model_arguments`' options before anything loads: a --model / --peft that names
    no folder and cannot be a hub id, lengths out of range."""
    for flag, source in (("--model", args.model), ("--peft", args.peft)):
        if source is None or os.path.isdir(source):
            continue
        if os.path.exists(source) or os.path.isabs(source) or source.startswith((".", "~")) or \
                source.count("/") > 1 or "\\" in source:
            raise ValueError(f"{flag} must be a checkpoint folder or a hub id (org/name), got {source!r}: no such "
                             f"folder")
    for flag, value, low in (("--max-length", args.max_length, 1), ("--doc-max-length", args.doc_max_length, 0)):
        if value is not None and value < low:
            raise ValueError(f"{flag} must be an int >= {low}, got {value}")


def load_encoder(args: argparse.Namespace, causal: bool = False):
    """The ``LLM2Vec`` that :func:`add_model_arguments`' options name."""
    import torch

    from .llm2vec import LLM2Vec
    model_kwargs: Dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if args.attn_implementation:
        model_kwargs["attn_implementation"] = args.attn_implementation
    return LLM2Vec.from_pretrained(args.model, peft_model_name_or_path=args.peft, merge_peft=args.merge_peft,
                                   enable_bidirectional=False if causal else None,  # None: the folder's record
                                   pooling_mode=args.pooling_mode,
                                   max_length=args.max_length, doc_max_length=args.doc_max_length,
                                   skip_instruction=args.skip_instruction, **model_kwargs)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The ``encode`` options (for ``llm2vec-fast encode``)."""
    add_model_arguments(parser)
    parser.add_argument("--input", required=True, help=".txt (a text per line), .jsonl or .parquet")
    parser.add_argument("--output", required=True, help="output folder (shards + index.json); resumes a run there")
    parser.add_argument("--causal", action="store_true",
                        help="keep the model causal (llm2vec's enable_bidirectional=False), e.g. with last_token "
                             "pooling for a causal embedding model")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens-per-batch", type=int, default=None)
    parser.add_argument("--normalize", action="store_true", help="L2-normalise the embeddings")
    parser.add_argument("--truncate-dim", type=int, default=None,
                        help="keep each embedding's first N dimensions (a Matryoshka-trained model); with "
                             "--normalize, normalised after the cut")
    parser.add_argument("--shard-size", type=int, default=10_000, help="rows per shard (default 10000)")
    parser.add_argument("--output-dtype", default="float32", choices=sorted(STORAGE_DTYPES))
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--instruction-field", default="instruction")
    parser.add_argument("--instruction", default="",
                        help="instruction for every row without its own (e.g. the retrieval instruction of queries)")
    parser.add_argument("--progress", action="store_true", help="a progress bar per shard")
    return parser


def _source(path_or_id: Optional[str]) -> Optional[str]:
    return os.path.realpath(path_or_id) if path_or_id is not None and os.path.isdir(path_or_id) else path_or_id


def check_arguments(args: argparse.Namespace) -> None:
    """Every refusal of the ``encode`` options before the model loads or anything is written."""
    check_model_arguments(args)
    if not os.path.isfile(args.input):
        raise ValueError(f"--input must be a file, got {args.input!r}: "
                         f"{'a folder' if os.path.isdir(args.input) else 'no such file'}")
    input_format(args.input)
    if os.path.isfile(args.output):
        raise ValueError(f"--output must be a folder, got {args.output!r}: a file")
    parent = os.path.dirname(os.path.abspath(args.output))
    while not os.path.exists(parent):  # the folder that makedirs would create it in
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"--output must be a folder, got {args.output!r}: {parent} is a file")
    for flag, value in (("--batch-size", args.batch_size), ("--shard-size", args.shard_size),
                        ("--max-tokens-per-batch", args.max_tokens_per_batch), ("--truncate-dim", args.truncate_dim)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive int, got {value}")


def run(args: argparse.Namespace) -> int:
    """``llm2vec-fast encode``. Under ``torchrun`` (WORLD_SIZE > 1) every rank loads the model once, onto
    its LOCAL_RANK GPU (or the CPU with gloo), and encodes every world_size-th shard. A bad option or input
    path is refused before the model loads (exit status 2, as argparse), a bad row when it is read or a failed
    write (a full disk: status 1, the shards written before it kept for a resume), each with the message alone."""
    try:
        check_arguments(args)
    except ValueError as error:
        print(f"llm2vec-fast encode: error: {error}", file=sys.stderr)
        return 2
    from .cpu_heap import retain_freed_memory
    from ..distributed import join_torchrun_group
    device, started_group = join_torchrun_group(args.device)
    if device.type == "cpu":
        retain_freed_memory()  # this process is ours: reuse layer buffers instead of page-faulting them in
    try:
        encoder = load_encoder(args, causal=args.causal)
        # A local folder by its real path: a resume that spells it another way (relative, a trailing /) matches.
        settings = {"model": _source(args.model), "peft": _source(args.peft), "merge_peft": args.merge_peft,
                    "dtype": args.dtype}
        encode_file(encoder, args.input, args.output, settings=settings, shard_size=args.shard_size,
                    output_dtype=args.output_dtype, text_field=args.text_field,
                    instruction_field=args.instruction_field, instruction=args.instruction,
                    truncate_dim=args.truncate_dim, batch_size=args.batch_size,
                    max_tokens_per_batch=args.max_tokens_per_batch, device=device,
                    normalize_embeddings=args.normalize, show_progress_bar=args.progress)
    except (ValueError, OSError) as error:  # a bad row (file:line), a run there with other settings, a full disk
        print(f"llm2vec-fast encode: error: {error}", file=sys.stderr)
        return 1
    finally:
        if started_group:
            import torch.distributed as dist
            dist.destroy_process_group()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="llm2vec-fast encode", description=__doc__.split("\n\n")[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
