"""Contrastive recipes: SimCSE (llm2vec's ``run_simcse.py``) and supervised (``run_supervised.py``), with GradCache.

Both recipes train a new LoRA on top of the merged MNTP adapter and implement the Recipe protocol that
``loop.Trainer`` runs (see ``notes/training_contract.md``):

- **SimCSE**: each sentence of a .txt (one per line) or .jsonl (``text``) file is paired with itself;
  attention dropout (``simcse_dropout``, 0.3) is the only noise, so the two copies get different masks.
- **Supervised**: E5-format rows (query, positive, negative) from a folder of ``<dataset>.jsonl`` files or one
  .jsonl with a ``dataset`` field; a row may give a list of ``negatives`` instead (e.g. mined hard negatives),
  each a candidate for every query of the batch, as llm2vec's one negative is. Queries are
  ``[instruction + ";", query]``, documents ``["", text]`` (the strings of llm2vec's E5 loader, see
  :class:`SupervisedConfig`; tokenised as llm2vec's training collator tokenises those inputs: separator, embed
  mask, skip_instruction, no ``doc_max_length`` cut). Every global batch comes from one dataset.

The work is the encoder's: :func:`embed` is ``LLM2Vec._embed_batch`` (packed forward, no compute on padding, our
attention, ``llm2vec_fast.pool``) run with gradient, and the loss is ``llm2vec_fast.contrastive_loss`` with
``gather=True`` (under torch.distributed every rank gets the union loss and only its share of the gradient; the
loop SUM-reduces the gradients).

GradCache (``grad_cache_chunk_size``): the batch's sequences are embedded in chunks without gradient, the loss is
differentiated w.r.t. those embeddings only, and each chunk is then embedded again with gradient (its RNG state
restored, so dropout draws the same masks) and back-propagated with its cached embedding gradient. The gradient
equals that of the whole batch embedded at once with the same masks; memory is that of one chunk.
"""
from __future__ import annotations

import logging
import math
import os
import random
from dataclasses import dataclass, field
from typing import Callable, ClassVar, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..distributed import rank_and_world, share
from ..encoder.files import iter_jsonl, read_records
from ..encoder.llm2vec import POOLING_MODES
from .config import TrainConfig, data_files
from .e5 import dataset_instructions

logger = logging.getLogger(__name__)

Item = Tuple[str, str]  # (instruction, text), as LLM2Vec.plan takes it


# ----------------------------------------------------------------------------------------------- configs

@dataclass
class ContrastiveConfig(TrainConfig):
    """Fields both contrastive recipes share. ``doc_max_length`` and ``skip_instruction`` are the encoder's
    (llm2vec's defaults), saved in ``llm2vec_config.json``; ``doc_max_length`` cuts texts at encode time only
    (training tokenises as llm2vec's collator does: ``LLM2Vec.plan(word_cut=False)``). The inherited
    ``grad_cache_chunk_size`` counts sequences (queries, positives and negatives alike) per forward.

    Matryoshka (``matryoshka_dims``, e.g. ``[4096, 1024, 256]``): the loss is the sum over those sizes d of
    ``matryoshka_weights[i]`` (default 1) times the contrastive loss of the embeddings' first d dimensions
    (sentence-transformers' ``MatryoshkaLoss``), so that truncated embeddings (``truncate_dim``) stay useful."""

    dataset_file_path: Optional[str] = None
    pooling_mode: str = "mean"
    loss_scale: float = 20.0
    skip_instruction: bool = True
    doc_max_length: int = 400
    matryoshka_dims: Optional[List[int]] = None
    matryoshka_weights: Optional[List[float]] = None

    def validate(self) -> None:
        super().validate()
        if self.pooling_mode not in POOLING_MODES:
            raise ValueError(f"config key 'pooling_mode' must be one of {POOLING_MODES}, got {self.pooling_mode!r}")
        if self.loss_scale <= 0:
            raise ValueError(f"config key 'loss_scale' must be > 0, got {self.loss_scale!r}")
        dims, weights = self.matryoshka_dims, self.matryoshka_weights
        if dims is not None:
            if not dims or any(d <= 0 for d in dims) or len(set(dims)) != len(dims):
                raise ValueError(f"config key 'matryoshka_dims' must be a non-empty list of distinct sizes > 0, "
                                 f"got {dims!r}")
        if weights is not None:
            if dims is None or len(weights) != len(dims):
                raise ValueError(f"config key 'matryoshka_weights' needs one weight per entry of 'matryoshka_dims' "
                                 f"({dims!r}), got {weights!r}")
            if not all(0 <= w < math.inf for w in weights) or not any(w > 0 for w in weights):  # NaN fails both
                raise ValueError(f"config key 'matryoshka_weights' must be finite, >= 0, with one > 0, got "
                                 f"{weights!r}")
        if self.doc_max_length <= 0:
            raise ValueError(f"config key 'doc_max_length' must be > 0, got {self.doc_max_length!r}")
        if self.dataset_file_path is None:
            raise ValueError(f"config key 'dataset_file_path' is required for {type(self).__name__} (a local file "
                             f"or folder; hub datasets are not downloaded)")


@dataclass
class SimCSEConfig(ContrastiveConfig):
    """Unsupervised SimCSE: llm2vec's ``train_configs/simcse`` keys and defaults."""

    per_device_train_batch_size: int = 128
    max_seq_length: int = 128
    simcse_dropout: float = 0.3

    ALIASES: ClassVar[Dict[str, str]] = {**TrainConfig.ALIASES, "attention_dropout": "simcse_dropout"}

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.simcse_dropout < 1.0:
            raise ValueError(f"config key 'simcse_dropout' must be in [0, 1), got {self.simcse_dropout!r}")
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)  # set by torchrun; the batch spans the ranks
        if self.per_device_train_batch_size * world < 2:
            raise ValueError(f"config key 'per_device_train_batch_size' must give SimCSE at least 2 sentences a "
                             f"batch (the other sentences are each one's negatives; alone, the loss is 0), got "
                             f"{self.per_device_train_batch_size} on {world} process(es)")
        path = self.dataset_file_path
        if not os.path.isfile(path) or not path.endswith((".txt", ".jsonl")):
            raise ValueError(f"config key 'dataset_file_path' must be an existing .txt (one sentence per line) or "
                             f".jsonl (a 'text' per row) file for SimCSE, got {path!r}")


@dataclass
class SupervisedConfig(ContrastiveConfig):
    """Supervised contrastive training on E5-format data: llm2vec's ``train_configs/supervised`` keys and
    defaults, plus ``instructions`` ({dataset name: query instruction}), laid over llm2vec's table for the
    E5 datasets (``e5.E5_INSTRUCTIONS``: a folder of echo-data files needs no instructions); a row's own
    ``instruction`` wins over both.

    The data follow llm2vec's E5 loader by default:
    - ``instruction_suffix`` (";") ends each instruction, so a query reads
      ``"{instruction}; !@#$%^&*(){query}"`` as llm2vec writes it ("" uses the instruction as given);
    - documents are ``"!@#$%^&*(){text}"``, except in ``symmetric_datasets`` (llm2vec's three), whose
      positives and negatives get the query's instruction too;
    - with ``merge_splits``, ``<name>_split1`` and ``<name>_split2`` share batches as one dataset ``<name>``.
    """

    per_device_train_batch_size: int = 64
    loss_scale: float = 50.0
    instructions: Dict[str, str] = field(default_factory=dict)
    instruction_suffix: str = ";"
    symmetric_datasets: List[str] = field(
        default_factory=lambda: ["allnli_split2", "quora_duplicates_split1", "quora_duplicates_split2"])
    merge_splits: bool = True

    def validate(self) -> None:
        super().validate()
        for name, instruction in self.instructions.items():
            if not isinstance(instruction, str):
                raise TypeError(f"config key 'instructions' maps dataset names to str, got {instruction!r} "
                                f"({type(instruction).__name__}) for {name!r}")
        path = self.dataset_file_path
        if os.path.isfile(path) and not path.endswith(".jsonl"):
            raise ValueError(f"config key 'dataset_file_path' must be a .jsonl file or a folder of <dataset>.jsonl "
                             f"files, got {path!r}")
        data_files(path)  # raises when missing or empty


# ------------------------------------------------------------------------------------------------- data

@dataclass
class Example:
    """One supervised row: the query with its instruction, the positive, its hard negatives (none, llm2vec's
    one ``negative``, or a row's list of ``negatives``)."""
    query: Item
    positive: Item
    negatives: List[Item] = field(default_factory=list)


@dataclass
class ContrastiveBatch:
    """This rank's part of one global batch: ``queries[i]`` pairs with ``positives[i]``; ``negatives`` are
    extra candidates for every query (any number, also none)."""
    queries: List[Item]
    positives: List[Item]
    negatives: List[Item]
    dataset: Optional[str] = None

    def items(self) -> List[Item]:
        return self.queries + self.positives + self.negatives


def _string(row: dict, key: str, where: str, required: bool = True) -> Optional[str]:
    value = row.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {value!r}")
    return value


def _negatives(row: dict, where: str) -> List[str]:
    """A row's hard negatives: llm2vec's ``negative`` (a string), or ``negatives`` (a list of strings, e.g.
    mined ones); not both."""
    if "negative" in row and "negatives" in row:
        raise ValueError(f"{where}: give 'negative' (a string) or 'negatives' (a list of strings), not both")
    if "negatives" not in row:
        negative = _string(row, "negative", where, required=False)
        return [] if negative is None else [negative]
    value = row["negatives"]
    if not isinstance(value, list) or not all(isinstance(text, str) for text in value):
        raise ValueError(f"{where}: field 'negatives' must be a list of strings, got {value!r}")
    return value


def read_sentences(path: str) -> List[str]:
    """SimCSE sentences: the non-empty lines of a .txt file (stripped, as llm2vec's Wiki1M), or the ``text``
    of each row of a .jsonl file."""
    texts = [text.strip() for _, text in read_records(path) if text.strip()]
    if not texts:
        raise ValueError(f"config key 'dataset_file_path': {path!r} holds no sentences")
    return texts


def read_supervised(path: str, instructions: Dict[str, str], instruction_suffix: str = "",
                    symmetric: Sequence[str] = (), merge_splits: bool = False) -> Dict[str, List[Example]]:
    """E5-format rows by dataset, from a folder of ``<dataset>.jsonl`` files (llm2vec's echo-data layout) or a
    single .jsonl whose rows name their ``dataset``. Each query's instruction is the row's ``instruction`` or
    ``instructions[dataset]`` (a dataset without one is an error, before any model loads), followed by
    ``instruction_suffix``; documents of the ``symmetric`` datasets get it too; ``merge_splits`` keys
    ``<name>_split1`` / ``_split2`` rows under ``<name>`` (in that order)."""
    raw: Dict[str, List[Tuple[str, dict]]] = {}
    if os.path.isdir(path):
        for file in data_files(path):
            if file.endswith(".jsonl"):
                name = os.path.splitext(os.path.basename(file))[0]
                raw.setdefault(name, []).extend((f"{file}:{n}", row) for n, row in iter_jsonl(file))
    else:
        for n, row in iter_jsonl(path):
            where = f"{path}:{n}"
            raw.setdefault(_string(row, "dataset", where), []).append((where, row))
    data: Dict[str, List[Example]] = {}
    missing = []
    for name in sorted(raw):
        examples = []
        for where, row in raw[name]:
            instruction = _string(row, "instruction", where, required=False)
            if instruction is None:
                instruction = instructions.get(name)
            if instruction is None:
                missing.append(name)
                break
            instruction += instruction_suffix
            document_instruction = instruction if name in symmetric else ""
            examples.append(Example(query=(instruction, _string(row, "query", where)),
                                    positive=(document_instruction, _string(row, "positive", where)),
                                    negatives=[(document_instruction, text) for text in _negatives(row, where)]))
        if examples:
            key = name.replace("_split1", "").replace("_split2", "") if merge_splits else name
            data.setdefault(key, []).extend(examples)
    if missing:
        raise ValueError(f"no instruction for dataset(s) {sorted(set(missing))}: set config key 'instructions' "
                         f"({{dataset name: instruction}}) or give every row an 'instruction' field")
    if not data:
        raise ValueError(f"config key 'dataset_file_path': {path!r} holds no rows")
    return data


def shard(rows: Sequence, rank: int, world: int) -> list:
    """This rank's contiguous part of a global batch (:func:`llm2vec_fast.distributed.share`)."""
    return list(rows[share(len(rows), rank, world)])


def dataset_batches(sizes: Dict[str, int], batch_size: int, seed: int, epoch: int) -> List[Tuple[str, List[int]]]:
    """llm2vec's supervised sampler: rows shuffled within each dataset, cut into full global batches (a
    dataset's incomplete remainder is dropped), then the batches of all datasets shuffled together.
    Deterministic in (seed, epoch)."""
    rng = random.Random(seed + epoch)
    batches: List[Tuple[str, List[int]]] = []
    for name in sorted(sizes):
        order = list(range(sizes[name]))
        rng.shuffle(order)
        for start in range(0, sizes[name] - batch_size + 1, batch_size):
            batches.append((name, order[start:start + batch_size]))
    rng.shuffle(batches)
    return batches


# ----------------------------------------------------------------------------------- embedding and loss

def embed(encoder, input_ids: Sequence[List[int]], embed_counts: Sequence[int]) -> torch.Tensor:
    """(N, hidden) float32 embeddings of token-id lists from ``encoder.plan``: the encoder's packed forward and
    pooling (``LLM2Vec._embed_batch``), differentiable when gradient is enabled. An input with no token at all (an
    empty text, with a tokenizer that adds no BOS) embeds to zeros, as ``encode`` embeds it: a candidate that scores
    0 against every query (raising here stopped the run at the first batch holding one)."""
    from ..encoder.llm2vec import _input_device
    kept = [i for i, ids in enumerate(input_ids) if len(ids) > 0]
    if kept and len(kept) == len(input_ids):
        return encoder._embed_batch(list(input_ids), list(embed_counts), False)
    out = torch.zeros((len(input_ids), encoder._hidden_size()), dtype=torch.float32,
                      device=_input_device(encoder.model))
    if kept:
        rows = encoder._embed_batch([input_ids[i] for i in kept], [embed_counts[i] for i in kept], False)
        out = out.to(rows.device).index_copy(0, torch.tensor(kept, device=rows.device), rows)
    return out


def _rng_state(device) -> tuple:
    """What dropout draws from: the CPU generator (our attention's seeds, CPU LoRA dropout) and, on CUDA,
    that device's generator (LoRA dropout there)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple, device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def grad_cache_step(embed_rows: Callable[[int, int], torch.Tensor], rows: int, loss_fn, chunk_size: int,
                    grad_scale: float, device) -> torch.Tensor:
    """GradCache: ``loss_fn(embeddings)`` differentiated through ``embed_rows(start, end)`` one chunk at a time.

    1. embed every chunk without gradient, recording the RNG state before each;
    2. ``(loss_fn(E) * grad_scale).backward()`` with E the detached embeddings, giving dLoss/dE;
    3. per chunk: restore its RNG state, embed again with gradient, ``backward(dLoss/dE[chunk])``.
    The RNG state after step 1 is restored at the end, so the step consumes randomness as one pass would.
    Returns the detached loss.
    """
    bounds = [(start, min(start + chunk_size, rows)) for start in range(0, rows, chunk_size)]
    states, parts = [], []
    with torch.no_grad():
        for start, end in bounds:
            states.append(_rng_state(device))
            parts.append(embed_rows(start, end))
    after = _rng_state(device)
    cached = torch.cat(parts).detach().requires_grad_(True)
    loss = loss_fn(cached)
    (loss * grad_scale).backward()
    grads = cached.grad
    for (start, end), state in zip(bounds, states):
        _set_rng_state(state, device)
        embeddings = embed_rows(start, end)
        if embeddings.requires_grad:  # (not where every input of the chunk is empty: zeros, no forward)
            embeddings.backward(grads[start:end].to(embeddings.dtype))
    _set_rng_state(after, device)
    return loss.detach()


def set_attention_dropout(model, p: float) -> int:
    """Sets attention dropout ``p`` on the model's config and every attention module (they copy
    ``config.attention_dropout`` when built, and pass it to the attention function in training mode).
    Returns the number of attention modules changed."""
    from ..models.bidirectional import decoder_body
    decoder_body(model).config.attention_dropout = p
    changed = 0
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), (int, float)) and hasattr(module, "is_causal"):
            module.attention_dropout = p
            changed += 1
    return changed


# --------------------------------------------------------------------------------------------- recipes

class ContrastiveRecipe:
    """What SimCSE and supervised share: data loaded (and checked) before the model, the encoder wrapper,
    the step (plain or GradCache), saving. Subclasses implement ``_load_data`` and ``batches``.

    ``model`` and ``tokenizer`` may be given (an already-built trainable model, e.g. in benchmarks and
    tests); otherwise they are loaded by ``model_setup`` from the config.
    """

    config: ContrastiveConfig

    CONFIG: ClassVar[type] = ContrastiveConfig

    def __init__(self, config: ContrastiveConfig, model=None, tokenizer=None):
        if not isinstance(config, self.CONFIG):
            raise TypeError(f"config must be a {self.CONFIG.__name__}, got {type(config).__name__}")
        self.config = config
        device = None
        if model is None:  # join the torchrun process group first: the data check needs the world size
            from . import model_setup
            device = model_setup.setup_device(config)
        self._load_data()  # data errors surface before minutes of model loading
        settings = dict(pooling_mode=config.pooling_mode, max_length=config.max_seq_length,
                        doc_max_length=config.doc_max_length, skip_instruction=config.skip_instruction)
        if model is None:
            self.encoder = model_setup.load_encoder_model(config, device, **settings)
        else:
            if tokenizer is None:
                raise ValueError("tokenizer is required when model is given, got None")
            from ..encoder import LLM2Vec
            self.encoder = LLM2Vec(model, tokenizer, **settings)
        self.model = self.encoder.model
        self.tokenizer = self.encoder.tokenizer
        self.model.train()
        hidden = self.encoder._hidden_size()
        if config.matryoshka_dims is not None and max(config.matryoshka_dims) > hidden:
            raise ValueError(f"config key 'matryoshka_dims' must be <= the model's hidden size {hidden}, got "
                             f"{config.matryoshka_dims!r}")

    def _load_data(self) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------- the protocol

    def batches(self, epoch: int) -> Iterator[ContrastiveBatch]:
        raise NotImplementedError

    def num_samples(self, batch: ContrastiveBatch) -> int:
        return len(batch.queries)

    def loss(self, embeddings, batch: ContrastiveBatch):
        """The union batch's loss from this rank's embeddings, laid out as ``batch.items()``: the contrastive
        loss, or its weighted sum over the Matryoshka sizes (each a prefix of every embedding)."""
        from ..ops import contrastive_loss
        n = len(batch.queries)
        cfg = self.config
        sizes = cfg.matryoshka_dims or [embeddings.shape[1]]
        weights = cfg.matryoshka_weights or [1.0] * len(sizes)
        terms = []
        for size, weight in zip(sizes, weights):
            if weight == 0:
                continue
            prefix = embeddings[:, :size]
            q, d_pos, d_neg = prefix[:n], prefix[n:2 * n], prefix[2 * n:]
            terms.append(weight * contrastive_loss(q, d_pos, d_neg if len(batch.negatives) else None,
                                                   scale=float(cfg.loss_scale), gather=True))
        return terms[0] if len(terms) == 1 else torch.stack(terms).sum()

    def train_step(self, batch: ContrastiveBatch, grad_scale: float):
        """Forward + backward of this rank's part of one global batch; returns the union batch's loss."""
        # tokenised as llm2vec's training collator: doc_max_length's cut by words is encode's alone (run here, it
        # shortened every text past it and emptied long texts without spaces, e.g. Chinese passages)
        plan = self.encoder.plan(batch.items(), word_cut=False)
        ids, counts = plan.input_ids, plan.embed_counts
        chunk = self.config.grad_cache_chunk_size
        if chunk is None or chunk >= len(ids):
            loss = self.loss(embed(self.encoder, ids, counts), batch)
            (loss * grad_scale).backward()
            return loss.detach().float()
        device = self.model.get_input_embeddings().weight.device
        return grad_cache_step(lambda s, e: embed(self.encoder, ids[s:e], counts[s:e]), len(ids),
                               lambda emb: self.loss(emb, batch), chunk, grad_scale, device).float()

    def save(self, folder: str) -> None:
        """The LoRA adapter, tokenizer and ``llm2vec_config.json`` in llm2vec's layout: load it with
        ``LLM2Vec.from_pretrained(base_or_mntp_folder, peft_model_name_or_path=folder)``."""
        self.encoder.save(folder)


class SimCSERecipe(ContrastiveRecipe):
    """Unsupervised SimCSE: each sentence against itself under attention dropout (different masks per copy)."""

    CONFIG = SimCSEConfig

    def __init__(self, config: SimCSEConfig, model=None, tokenizer=None):
        super().__init__(config, model, tokenizer)
        set_attention_dropout(self.model, config.simcse_dropout)

    def _load_data(self) -> None:
        self.sentences = read_sentences(self.config.dataset_file_path)

    def num_batches(self) -> int:
        _, world = rank_and_world()
        size = self.config.per_device_train_batch_size * world
        full, rest = divmod(len(self.sentences), size)
        return full + (1 if rest >= world else 0)

    def batches(self, epoch: int) -> Iterator[ContrastiveBatch]:
        """Shuffled (seed + epoch) global batches of per_device_train_batch_size * world sentences; the last,
        smaller one is kept when every rank gets at least one sentence. Yields this rank's part."""
        rank, world = rank_and_world()
        order = list(range(len(self.sentences)))
        random.Random(self.config.seed + epoch).shuffle(order)
        size = self.config.per_device_train_batch_size * world
        for start in range(0, len(order), size):
            rows = order[start:start + size]
            if len(rows) < world:
                break
            items = [("", self.sentences[i]) for i in shard(rows, rank, world)]
            yield ContrastiveBatch(queries=items, positives=list(items), negatives=[])


class SupervisedRecipe(ContrastiveRecipe):
    """Supervised contrastive training with hard negatives; every global batch from one dataset."""

    CONFIG = SupervisedConfig

    def _load_data(self) -> None:
        cfg = self.config
        self.data = read_supervised(cfg.dataset_file_path, dataset_instructions(cfg.instructions),
                                    cfg.instruction_suffix, cfg.symmetric_datasets, cfg.merge_splits)
        _, world = rank_and_world()
        size = self.config.per_device_train_batch_size * world
        small = [name for name, rows in self.data.items() if len(rows) < size]
        if small:
            logger.warning("datasets with fewer rows than one global batch (%d) are never used: %s", size, small)
        if len(small) == len(self.data):
            raise ValueError(f"no dataset has a full global batch of per_device_train_batch_size * world size = "
                             f"{size} rows (sizes: { {k: len(v) for k, v in self.data.items()} })")

    def num_batches(self) -> int:
        _, world = rank_and_world()
        size = self.config.per_device_train_batch_size * world
        return sum(len(rows) // size for rows in self.data.values())

    def batches(self, epoch: int) -> Iterator[ContrastiveBatch]:
        """llm2vec's sampler (:func:`dataset_batches`) over global batches; yields this rank's part."""
        rank, world = rank_and_world()
        sizes = {name: len(rows) for name, rows in self.data.items()}
        for name, rows in dataset_batches(sizes, self.config.per_device_train_batch_size * world,
                                          self.config.seed, epoch):
            examples = [self.data[name][i] for i in shard(rows, rank, world)]
            yield ContrastiveBatch(queries=[e.query for e in examples], positives=[e.positive for e in examples],
                                   negatives=[n for e in examples for n in e.negatives], dataset=name)
