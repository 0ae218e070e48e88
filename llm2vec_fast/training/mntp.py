"""Masked next-token prediction (MNTP), llm2vec's first training stage.

A fraction ``mlm_probability`` of the tokens is selected (never special tokens); selected inputs are
replaced (80% mask token, 10% a random token, 10% kept: ``data_collator_type="default"``; all mask
token: ``"all_mask"``) and the bidirectional model predicts each selected token i from its output at
position i - 1, as llm2vec does (its causal-LM head shifts the labels). Labels are stored already
shifted: ``labels[:, i - 1]`` holds original token i where i was selected, -100 elsewhere.

The LM head runs only on the labelled rows, and never forms the (rows, vocab) logits of the whole batch
in float32: liger-kernel's fused linear cross-entropy on a GPU when installed, else
:func:`chunked_cross_entropy` (row chunks, each recomputed in the backward).

Evaluation (:meth:`MNTPRecipe.evaluate`, scheduled by the loop from the config's ``do_eval`` /
``eval_strategy``): loss, token accuracy and perplexity on held-out chunks (``validation_file``, or the first
``validation_split_percentage`` % of the documents), masked by one fixed generator so that evaluations
compare; the head's logits are formed a chunk of rows at a time there too.
"""
from __future__ import annotations

import inspect
import itertools
import logging
import math
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..distributed import share
from .config import MNTPConfig, data_files

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
EVAL_MASK_KEY = -1  # the held-out masks' generator key (training batches use (epoch, index) with epoch >= 0)
CE_CHUNK_ROWS = 2048  # rows of logits formed at once: 2048 x 128k vocab x 4 bytes = 1 GiB


# ------------------------------------------------------------------------------------------------ loss
def _head_logits(hidden: Tensor, weight: Tensor, softcap: Optional[float]) -> Tensor:
    """float32 logits of the LM head, capped as the family's causal-LM head caps them."""
    logits = (hidden @ weight.t()).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_ce_sum(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float]) -> Tensor:
    return F.cross_entropy(_head_logits(hidden, weight, softcap), targets, reduction="sum")


def chunked_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float] = None,
                          chunk_rows: int = CE_CHUNK_ROWS) -> Tensor:
    """Sum over rows of cross_entropy(softcap(hidden @ weight.T), targets), in float32.

    ``hidden`` (N, H), ``weight`` (V, H), ``targets`` (N,) (no ignore index: gather labelled rows first).
    Each chunk of rows runs under ``torch.utils.checkpoint``, so at most one (chunk_rows, V) logits block
    exists at a time, in the forward and in the backward.
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets has {targets.shape[0]}")
    total = hidden.new_zeros((), dtype=torch.float32)
    if hidden.shape[0] == 0:
        return total + 0.0 * hidden.sum() + 0.0 * weight.sum()  # keeps the graph for a rank with no labels
    for start in range(0, hidden.shape[0], chunk_rows):
        h, t = hidden[start:start + chunk_rows], targets[start:start + chunk_rows]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_ce_sum, h, weight, t, softcap, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, weight, t, softcap)
    return total


@torch.no_grad()
def lm_head_eval_sums(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float] = None,
                      chunk_rows: int = CE_CHUNK_ROWS) -> Tuple[float, int]:
    """(summed CE, number of rows whose most likely token is the target) of the LM head on labelled rows,
    one (chunk_rows, V) logits block at a time: the evaluation's loss and accuracy in one pass."""
    loss_sum, correct = 0.0, 0
    for start in range(0, hidden.shape[0], chunk_rows):
        logits = _head_logits(hidden[start:start + chunk_rows], weight, softcap)
        t = targets[start:start + chunk_rows]
        loss_sum += float(F.cross_entropy(logits, t, reduction="sum"))
        correct += int((logits.argmax(dim=-1) == t).sum())
    return loss_sum, correct


def _liger_loss():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def lm_head_loss_sum(hidden: Tensor, weight: Tensor, targets: Tensor, softcap: Optional[float] = None) -> Tensor:
    """Summed CE of the LM head on labelled rows: liger's fused kernel on a GPU when available (and able to
    softcap if needed), else :func:`chunked_cross_entropy`."""
    liger = _liger_loss() if hidden.is_cuda else None
    if liger is not None and hidden.shape[0] > 0:
        accepts_softcap = "softcap" in inspect.signature(liger).parameters
        if not softcap or accepts_softcap:
            kwargs = {"softcap": softcap} if softcap else {}
            out = liger(hidden, weight, targets, reduction="sum", **kwargs)
            return (out[0] if isinstance(out, tuple) else out).float()
    return chunked_cross_entropy(hidden, weight, targets, softcap)


# ------------------------------------------------------------------------------------------------ masking
@dataclass
class MaskedBatch:
    input_ids: Tensor   # (B, L) with the selected tokens replaced
    labels: Tensor      # (B, L) shifted: labels[:, i - 1] = original token i where selected, else -100
    selected: Tensor    # (B, L) bool, the selected positions (for tests and statistics)


def mask_tokens(input_ids: Tensor, *, special_ids: Sequence[int], mask_token_id: int, vocab_size: int,
                mlm_probability: float, collator_type: str = "default",
                generator: Optional[torch.Generator] = None) -> MaskedBatch:
    """llm2vec's MNTP masking of a (B, L) batch, drawn from ``generator`` (see the module docstring)."""
    if collator_type not in ("default", "all_mask"):
        raise ValueError(f"collator_type must be 'default' or 'all_mask', got {collator_type!r}")
    special = torch.isin(input_ids, torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype))
    probability = torch.full(input_ids.shape, float(mlm_probability)).masked_fill_(special, 0.0)
    selected = torch.bernoulli(probability, generator=generator).bool()
    masked = input_ids.clone()
    if collator_type == "all_mask":
        masked[selected] = mask_token_id
    else:
        replace = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & selected
        randomise = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & selected & ~replace
        random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, dtype=input_ids.dtype)
        masked[replace] = mask_token_id
        masked[randomise] = random_ids[randomise]
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(selected[:, 1:], input_ids[:, 1:], IGNORE_INDEX)
    return MaskedBatch(masked, labels, selected)


# ------------------------------------------------------------------------------------------------ data
def read_documents(path: str, key: str = "dataset_file_path") -> List[str]:
    """Documents of a .txt (one per line) or .jsonl (``text`` field) file, or a folder of them; blank
    documents skipped. ``key`` names the config key in errors."""
    from ..encoder.files import read_records
    return [text for file in data_files(path, key) for _, text in read_records(file) if text.strip()]


def split_validation(docs: Sequence[str], percentage: int) -> Tuple[List[str], List[str]]:
    """(training documents, validation documents): the first ``percentage`` % of the documents are held out, as
    llm2vec's ``train[:p%]`` / ``train[p%:]`` split (``datasets`` rounds the count with ``round``: half to even)."""
    held = int(round(len(docs) * percentage / 100))
    if held == 0 or held == len(docs):
        raise ValueError(f"config key 'validation_split_percentage': {percentage}% of {len(docs)} documents leaves "
                         f"{'no validation' if held == 0 else 'no training'} document; give a validation_file "
                         f"or another percentage")
    return list(docs[held:]), list(docs[:held])


def group_into_chunks(docs: Sequence[str], tokenizer, length: int, batch_docs: int = 1000,
                      what: str = "training") -> Tensor:
    """(N, length) int32 token ids: each document tokenised (with the tokenizer's specials, e.g. BOS), and every
    ``batch_docs`` documents concatenated and cut into ``length`` tokens, their remainder dropped: run_mlm's
    ``group_texts``, which ``datasets.map(batched=True)`` runs on batches of 1000 rows: the chunks are llm2vec's
    (for text without blank lines, which llm2vec keeps as rows and :func:`read_documents` skips). Batches go
    straight into int32 arrays (4 bytes a token; a list of Python ints would take about 14 times that for a
    corpus of wikitext-103's size); batches widen to int64 when drawn."""
    pieces, total = [], 0
    for start in range(0, len(docs), batch_docs):
        rows = tokenizer(list(docs[start:start + batch_docs]))["input_ids"]
        count = sum(len(row) for row in rows)
        total += count
        ids = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=count)
        pieces.append(ids[:count // length * length])
    ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
    if len(ids) == 0:
        short = (f"fewer than max_seq_length={length}" if total < length else f"but no batch of {batch_docs} "
                 f"documents holds max_seq_length={length} (each batch's remainder is dropped, as in llm2vec)")
        raise ValueError(f"the {what} text has {total} tokens, {short}: no {what} chunk can be formed")
    return torch.from_numpy(ids.reshape(-1, length))


# ------------------------------------------------------------------------------------------------ recipe
class MNTPRecipe:
    """MNTP on a ``XxxBiForMNTP`` with LoRA on its body (see the Recipe protocol in loop.py)."""

    def __init__(self, config: MNTPConfig, model=None, tokenizer=None):
        from .model_setup import load_mntp_model, load_tokenizer, setup_device
        self.config = config
        self.device = setup_device(config)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(config.model_name_or_path)
        self.mask_token_id = self._mask_token_id()
        self.vocab_size = len(self.tokenizer) + (1 if self.mask_token_id == len(self.tokenizer) else 0)
        self.special_ids = sorted(set(self.tokenizer.all_special_ids))
        self._read_data(config)  # before the model: bad data is reported in seconds, not after a 7B load
        self.model = model if model is not None else load_mntp_model(config, self.device, self.vocab_size)
        self.softcap = getattr(self.model.config, "final_logit_softcapping", None)

    def _read_data(self, config: MNTPConfig) -> None:
        docs = read_documents(config.dataset_file_path)
        held_out: Optional[List[str]] = None
        if config.validation_file is not None:
            held_out = read_documents(config.validation_file, "validation_file")
        elif config.evaluates:
            docs, held_out = split_validation(docs, config.validation_split_percentage)
        chunks = group_into_chunks(docs, self.tokenizer, config.max_seq_length)
        if config.max_train_samples is not None:
            chunks = chunks[:config.max_train_samples]
        self.chunks = chunks
        self.eval_chunks: Optional[Tensor] = None
        if held_out is not None:
            self.eval_chunks = group_into_chunks(held_out, self.tokenizer, config.max_seq_length, what="validation")
            if config.max_eval_samples is not None:
                self.eval_chunks = self.eval_chunks[:config.max_eval_samples]

    def _mask_token_id(self) -> int:
        """llm2vec's rule: the tokenizer's own mask token if it has one; else "_" (blank), EOS, or a new
        "<mask>" token (id ``len(tokenizer)``; the embeddings grow when that is past their end)."""
        tok = self.tokenizer
        if tok.mask_token_id is not None:
            if self.config.mask_token_type != "mask":
                logger.info("the tokenizer has a mask token %r: it is used (mask_token_type=%r ignored, as llm2vec)",
                            tok.mask_token, self.config.mask_token_type)
            return int(tok.mask_token_id)
        kind = self.config.mask_token_type
        if kind == "blank":
            return int(tok.convert_tokens_to_ids("_"))
        if kind == "eos":
            return int(tok.eos_token_id)
        existing = tok.convert_tokens_to_ids("<mask>")
        if existing is not None and existing != tok.unk_token_id:
            return int(existing)
        return len(tok)

    # -------------------------------------------------------------------------------------- batches
    def _world(self):
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def num_batches(self) -> int:
        """Global batches per epoch (the last one kept when every rank gets at least one sample)."""
        _, world = self._world()
        size = self.config.per_device_train_batch_size * world
        full, rest = divmod(len(self.chunks), size)
        return full + (1 if rest >= world else 0)

    def _masked(self, chunks: Tensor, *key: int) -> MaskedBatch:
        """``chunks`` masked by a generator seeded from (seed, *key) alone. The hash of an int tuple is the
        same in every process (PYTHONHASHSEED only salts str/bytes)."""
        generator = torch.Generator().manual_seed(hash((self.config.seed, *key)) % (2 ** 63))
        return mask_tokens(chunks.long(), special_ids=self.special_ids, mask_token_id=self.mask_token_id,
                           vocab_size=self.vocab_size, mlm_probability=self.config.mlm_probability,
                           collator_type=self.config.data_collator_type, generator=generator)

    def batches(self, epoch: int) -> Iterator[Dict[str, Tensor]]:
        """This rank's share of each global batch. Order and masks depend on (seed, epoch, batch index)
        only, so any world size sees the same union batches and a resumed run the same masks."""
        rank, world = self._world()
        size = self.config.per_device_train_batch_size * world
        order = torch.randperm(len(self.chunks), generator=torch.Generator().manual_seed(self.config.seed + epoch))
        for index in range(self.num_batches()):
            rows = order[index * size:(index + 1) * size]
            masked = self._masked(self.chunks[rows], epoch, index)
            part = share(len(rows), rank, world)  # a row for every rank (a ceil split left the last ones none)
            yield {"input_ids": masked.input_ids[part], "labels": masked.labels[part]}

    def eval_batch(self) -> MaskedBatch:
        """The held-out chunks, masked the same way at every evaluation (so evaluations compare) and for every
        world size."""
        if self.eval_chunks is None:
            raise ValueError("this MNTP run holds no validation text: give validation_file, or set do_eval or "
                             "eval_strategy to hold out validation_split_percentage % of the documents")
        return self._masked(self.eval_chunks, EVAL_MASK_KEY)

    def num_samples(self, batch) -> int:
        return int(batch["input_ids"].shape[0])

    # -------------------------------------------------------------------------------------- step
    def _labelled(self, input_ids: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
        """(hidden states of the labelled positions, their targets), with the body run packed."""
        from ..models import forward_packed
        input_ids, labels = input_ids.to(self.device), labels.to(self.device)
        hidden = forward_packed(self.model.model, input_ids).hidden   # (B*L, H), row-major like labels
        flat = labels.reshape(-1)
        rows = (flat != IGNORE_INDEX).nonzero().squeeze(1)
        return hidden.index_select(0, rows), flat.index_select(0, rows)

    def loss_parts(self, input_ids: Tensor, labels: Tensor):
        """(summed CE over this rank's labelled tokens, their count), with the body run packed."""
        hidden, targets = self._labelled(input_ids, labels)
        weight = self.model.get_output_embeddings().weight
        return lm_head_loss_sum(hidden, weight, targets, self.softcap), targets.numel()

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """MNTP loss (mean CE over every labelled held-out token), token accuracy (llm2vec's ``compute_metrics``:
        the most likely token is the label) and perplexity (exp of the loss), over all ranks: each rank runs
        every world_size-th held-out chunk in batches of ``per_device_eval_batch_size``."""
        from ..distributed import is_distributed
        rank, world = self._world()
        masked = self.eval_batch()
        mine = torch.arange(rank, masked.input_ids.shape[0], world)
        weight = self.model.get_output_embeddings().weight
        sums = torch.zeros(3, dtype=torch.float64)  # CE sum, correct, labelled tokens
        size = self.config.per_device_eval_batch_size
        for start in range(0, mine.numel(), size):
            rows = mine[start:start + size]
            hidden, targets = self._labelled(masked.input_ids[rows], masked.labels[rows])
            loss_sum, correct = lm_head_eval_sums(hidden, weight, targets, self.softcap)
            sums += torch.tensor([loss_sum, correct, targets.numel()], dtype=torch.float64)
        if is_distributed():
            import torch.distributed as dist
            sums = sums.to(self.device)
            dist.all_reduce(sums)
            sums = sums.cpu()
        loss_sum, correct, tokens = sums.tolist()
        loss = loss_sum / max(tokens, 1.0)
        return {"eval_loss": loss, "eval_accuracy": correct / max(tokens, 1.0),
                "eval_perplexity": math.exp(loss) if loss < 700 else float("inf"), "eval_tokens": int(tokens)}

    def train_step(self, batch, grad_scale: float) -> Tensor:
        """Backward of (this rank's CE sum / the union batch's label count) * grad_scale; returns the
        union batch's mean CE."""
        from ..distributed import global_value, is_distributed
        loss_sum, count = self.loss_parts(batch["input_ids"], batch["labels"])
        count = torch.tensor(float(count), device=loss_sum.device)
        if is_distributed():
            import torch.distributed as dist
            dist.all_reduce(count)
        loss = loss_sum / count.clamp(min=1.0)
        (loss * grad_scale).backward()
        return global_value(loss.detach()).float()

    # -------------------------------------------------------------------------------------- save
    def save(self, folder: str) -> None:
        """llm2vec's MNTP layout: the body's adapter (naming the base by absolute path), the base's
        config.json and the tokenizer, so ``LLM2Vec.from_pretrained(folder)`` merges it into the base."""
        os.makedirs(folder, exist_ok=True)
        body = self.model.model
        base = os.path.abspath(self.config.model_name_or_path)
        for peft_config in body.peft_config.values():
            peft_config.base_model_name_or_path = base
        body.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
        shutil.copy(os.path.join(base, "config.json"), os.path.join(folder, "config.json"))
