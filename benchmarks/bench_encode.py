"""End-to-end ``LLM2Vec.encode``: op ``encode``, judged in texts/s and tokens/s.

The workload: ``BENCH_ENCODE_TEXTS`` (default 384) English-like texts with lognormal word counts
(the same texts for every impl; every fourth one an [instruction, text] pair), tokenised by the
Llama-2-style tokenizer of ``tests/fixtures/llm2vec/llama``, mean pooling with skip_instruction,
max_length 512, doc_max_length 400. One timed call encodes the whole workload, tokenisation and
pooling included, from strings to (N, hidden) float32 embeddings on the CPU.

The model (random weights, a bidirectional ``MistralBiModel`` built in memory):
- ``--quick``: tiny (2 layers, hidden 128, 48 texts), float32: a dry run of the code paths;
- CPU: small and Mistral-shaped (4 layers, hidden 256, MLP 1024, Hq=4, Hkv=2, D=64, vocab 32000), float32;
- GPU: Mistral-7B-shaped (hidden 4096, MLP 14336, Hq=32, Hkv=8, D=128, vocab 32000; ``BENCH_ENCODE_LAYERS``
  layers, default 8 of the 32), bf16.

Impls, measured in the same run on the same model:
- ``llm2vec_fast_packed``: ours, ``llm2vec_fast.LLM2Vec.encode`` with its defaults (each string tokenised
  once, sorted, packed into batches of at most batch_size * max_length tokens, ``forward_packed`` with
  ``attn_implementation="llm2vec_fast"``, pooled from the packed layout);
- ``llm2vec_sdpa_padded``: llm2vec 0.2.3's algorithm, re-implemented here on transformers 5
  (:func:`llm2vec_reference_encode`): every text tokenised for the doc_max_length check, the batch
  tokenised again with padding, each text part tokenised once more for embed_mask; sorted by character
  length, batches of 32 left-padded to their longest, transformers' ``"sdpa"`` with the padding mask,
  and pooling by a Python loop over rows.

Row fields: ``ms`` is one call (the whole workload); the shape's ``tokens=N`` counts real tokens, so
tokens/s = N / (ms / 1000); ``tflops`` counts useful model FLOPs on real tokens only (as bench_model).

    python -m benchmarks.bench_encode [--quick] [--out DIR] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case  # noqa: E402
from benchmarks.shapes import (SMALL_CPU, ModelShape, build_bidirectional_mistral, forward_flops,  # noqa: E402
                               lognormal_lengths, mistral_7b, set_attention, tiny)

OP = "encode"
IMPLS = ("llm2vec_fast_packed", "llm2vec_sdpa_padded")
TOKENIZER_DIR = os.path.join(harness.REPO_ROOT, "tests", "fixtures", "llm2vec", "llama")
SEPARATOR = "!@#$%^&*()"
INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query:"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can out other what "
         "time up about into only some could them new these two may first then do any like my now over such our "
         "man me even most made after also did many before must through back years where much your way well down "
         "should because each just those people how too little state good very make world still own see men work "
         "long get here between both life being under never day same another know while last might us great old "
         "year off come since against go came right used take three embedding model vector retrieval query passage "
         "document search ranking tide moon ocean sailor guitar stage bread flour water salt yeast dough capital "
         "France Paris history science number attention bidirectional contrastive training sentence").split()


@dataclass(frozen=True)
class Setting:
    model: ModelShape
    texts: int
    mean_words: float
    max_words: int


QUICK = Setting(model=tiny(vocab=1024), texts=48, mean_words=24, max_words=200)
CPU = Setting(model=SMALL_CPU, texts=int(os.environ.get("BENCH_ENCODE_TEXTS", 384)), mean_words=48, max_words=600)
GPU = Setting(model=mistral_7b(int(os.environ.get("BENCH_ENCODE_LAYERS", 8))),
              texts=int(os.environ.get("BENCH_ENCODE_TEXTS", 384)), mean_words=48, max_words=600)
SIGMA = 0.8  # lognormal spread of the word counts; the median is set so that the mean is mean_words
POOLING = dict(pooling_mode="mean", max_length=512, doc_max_length=400, skip_instruction=True)
PADDED_BATCH = 32
# BENCH_ENCODE_LORA=1 adds a case with an unmerged LoRA (r 16, alpha 32, on the seven projections; float32 on a
# bf16 model, as peft's autocast loads llm2vec's supervised adapters with merge_peft=False): what encoding
# McGill-NLP's published models costs. Off by default (the device check's time budget).
WITH_LORA = os.environ.get("BENCH_ENCODE_LORA", "0").strip() not in ("", "0")
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])

METHOD_NOTES = [
    "encode: one call embeds the whole workload from strings (tokenisation and pooling included); tokens/s = "
    "real tokens (in the shape) / (ms / 1000). llm2vec_fast_packed = llm2vec_fast.LLM2Vec.encode (tokenise once, "
    "token-budget packing, forward_packed, packed pooling); llm2vec_sdpa_padded = llm2vec 0.2.3's algorithm "
    "(tokenise twice, sorted batches of 32 left-padded, transformers 'sdpa', pooling loop over rows) on the "
    "same model.",
    "encode on the CPU: both impls run with freed memory kept in the heap (llm2vec_fast.encoder.cpu_heap, glibc "
    "mallopt, set once before either runs), so neither time depends on where glibc happened to trim the heap; "
    "without it the baseline's page faults made it vary from 7.3k to 10.3k tokens/s between runs.",
]
NOTES: List[str] = []


def make_texts(setting: Setting, seed: int = 0) -> List:
    """Texts with lognormal word counts (clipped to [1, max_words]); every fourth one with an instruction."""
    generator = torch.Generator().manual_seed(seed)
    counts = lognormal_lengths(setting.texts, setting.mean_words, SIGMA, 1, setting.max_words, generator=generator)
    items: List = []
    for index, n in enumerate(counts):
        picks = torch.randint(0, len(WORDS), (n,), generator=generator).tolist()
        text = " ".join(WORDS[i] for i in picks).capitalize() + "."
        items.append([INSTRUCTION, text] if index % 4 == 3 else text)
    return items


def load_tokenizer():
    """The Llama-2-style test tokenizer, set up as llm2vec does (pad = eos, left padding)."""
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


# ------------------------------------------------------------------- llm2vec 0.2.3's algorithm (baseline)

def llm2vec_reference_encode(model, tokenizer, sentences, device, *, pooling_mode: str = "mean",
                             max_length: int = 512, doc_max_length: int = 400, skip_instruction: bool = True,
                             batch_size: int = PADDED_BATCH) -> torch.Tensor:
    """llm2vec 0.2.3's ``encode`` (no chat template, no EOS text: the benchmark's model has no template
    name and pools the mean), step by step as llm2vec runs it, on a transformers 5 model."""
    if pooling_mode not in ("mean", "weighted_mean"):
        raise ValueError("this baseline covers mean and weighted_mean pooling")
    pairs = [["", s] if isinstance(s, str) else list(s) for s in sentences]

    def text_tokens(text: str) -> int:
        return len(tokenizer(text, return_tensors="pt", padding=True, truncation=True, max_length=max_length,
                             add_special_tokens=False)["input_ids"][0])

    joined = []
    for instruction, text in pairs:  # _convert_to_str: the text alone, tokenised (and cut by words)
        length = text_tokens(text)
        while length > doc_max_length:
            words = text.split()
            text = " ".join(words[:int(len(words) * (doc_max_length / length))])
            length = text_tokens(text)
        joined.append(f"{instruction.strip()} {SEPARATOR}{text}" if instruction else f"{SEPARATOR}{text}")
    order = np.argsort([-len(s) for s in joined])
    outputs = []
    for start in range(0, len(joined), batch_size):
        batch = [joined[i] for i in order[start:start + batch_size]]
        parts = [s.split(SEPARATOR) for s in batch]
        features = tokenizer(["".join(p) for p in parts], return_tensors="pt", padding=True, truncation=True,
                             max_length=max_length)
        embed_rows = []
        for row, p in enumerate(parts):  # the text part of each input, tokenised alone once more
            n = len(tokenizer([p[1] if len(p) > 1 else ""], return_tensors="pt", padding=True, truncation=True,
                              max_length=max_length, add_special_tokens=False)["input_ids"][0])
            e_m = torch.zeros_like(features["attention_mask"][row])
            if n > 0:
                e_m[-n:] = torch.ones(n)
            embed_rows.append(e_m.unsqueeze(0))
        embed_mask = torch.cat(embed_rows, dim=0)
        with torch.no_grad():
            hidden = model(input_ids=features["input_ids"].to(device),
                           attention_mask=features["attention_mask"].to(device)).last_hidden_state
        mask = embed_mask if skip_instruction else features["attention_mask"]
        lengths = mask.sum(dim=-1)
        if pooling_mode == "mean":
            pooled = torch.stack([hidden[i, -int(n):, :].mean(dim=0) for i, n in enumerate(lengths)], dim=0)
        else:
            weights = torch.zeros(hidden.shape[:2], device=hidden.device)
            for i, n in enumerate(lengths.tolist()):
                if n > 0:
                    weights[i, -n:] = torch.arange(n, device=hidden.device) + 1
                    weights[i] /= torch.clamp(weights[i].sum(), min=1e-9)
            pooled = torch.sum(hidden * weights.unsqueeze(-1), dim=1)
        outputs.append(pooled.detach().cpu())
    embeddings = torch.cat(outputs, dim=0)[np.argsort(order)]
    return embeddings.to(torch.float32)


# ------------------------------------------------------------------------------------------- workload

class Workload:
    """The texts, the tokenizer and the model (built once, on first use, shared by every impl)."""

    def __init__(self, setting: Setting, device: torch.device, seed: int = 0, lora: bool = False):
        self.setting, self.device, self.lora = setting, device, lora
        self.items = make_texts(setting, seed)
        self.tokenizer = load_tokenizer()
        self._model = None
        self._encoder = None
        self._lengths: Optional[List[int]] = None
        self._outputs = {}

    def model(self, attn_implementation: str):
        if self._model is None:
            self._model = build_bidirectional_mistral(self.setting.model, self.device)
            if self.lora:
                from peft import LoraConfig, get_peft_model
                self._model = get_peft_model(self._model, LoraConfig(**LORA)).eval()
                with torch.no_grad():  # B starts at zero: a trained adapter's term is not
                    for name, param in self._model.named_parameters():
                        if "lora_B" in name:
                            param.normal_(0, 0.02)
        set_attention(self._model.get_base_model() if self.lora else self._model, attn_implementation)
        return self._model

    def encoder(self):
        from llm2vec_fast import LLM2Vec
        model = self.model("llm2vec_fast")
        if self._encoder is None:
            self._encoder = LLM2Vec(model, self.tokenizer, **POOLING)
        return self._encoder

    @property
    def lengths(self) -> List[int]:
        """Real tokens per input (llm2vec's, which ours reproduces)."""
        if self._lengths is None:
            from llm2vec_fast.encoder.text import normalize_inputs
            encoder = _PlanOnly(self.tokenizer)
            self._lengths = [len(ids) for ids in encoder.plan(normalize_inputs(self.items)).input_ids]
        return self._lengths

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def shape(self) -> str:
        s = self.setting
        return (f"{s.model.describe()},texts={s.texts},tokens={self.tokens},words=lognormal-mean{s.mean_words:g}"
                + (",lora=r16-fp32-unmerged" if self.lora else ""))

    @property
    def flops(self) -> float:
        return forward_flops(self.setting.model, self.lengths)

    def record(self, impl: str, embeddings: torch.Tensor) -> None:
        """Keeps each impl's result once and notes how far ours is from the baseline."""
        if impl in self._outputs:
            return
        self._outputs[impl] = embeddings
        if set(self._outputs) == set(IMPLS):
            ours, base = self._outputs["llm2vec_fast_packed"], self._outputs["llm2vec_sdpa_padded"]
            error = float((ours - base).abs().max())
            scale = float(base.abs().max())
            NOTES.append(f"{OP}{' (LoRA)' if self.lora else ''}: max |llm2vec_fast_packed - llm2vec_sdpa_padded| = "
                         f"{error:.3g} (embeddings up to {scale:.3g}, {harness.dtype_name(self.setting.model.dtype)})")


class _PlanOnly:
    """The tokenisation plan of LLM2Vec without a model (for the token counts in the row's shape)."""

    def __init__(self, tokenizer):
        from llm2vec_fast.encoder.text import prepare_for_tokenization
        from llm2vec_fast.encoder.tokenization import SpecialTokens, plan_inputs
        self._plan_inputs, self.tokenizer = plan_inputs, tokenizer
        self._prepare = lambda s: prepare_for_tokenization(s, "", "mistral", POOLING["pooling_mode"])
        self._specials = SpecialTokens.detect(tokenizer)

    def plan(self, items):
        return self._plan_inputs(items, self.tokenizer, self._prepare, POOLING["max_length"],
                                 POOLING["doc_max_length"], specials=self._specials)


def _ours(work: Workload) -> Callable:
    def setup():
        encoder = work.encoder()

        def run():
            out = encoder.encode(work.items, batch_size=PADDED_BATCH, show_progress_bar=False, device=work.device)
            work.record("llm2vec_fast_packed", out)
            return out
        return run
    return setup


def _baseline(work: Workload) -> Callable:
    def setup():
        model = work.model("sdpa")

        def run():
            out = llm2vec_reference_encode(model, work.tokenizer, work.items, work.device, **POOLING)
            work.record("llm2vec_sdpa_padded", out)
            return out
        return run
    return setup


def setting_for(quick: bool, device: torch.device) -> Setting:
    if quick:
        return QUICK
    return GPU if device.type == "cuda" else CPU


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    setting = setting_for(quick, device)
    if device.type == "cpu":
        from llm2vec_fast.encoder.cpu_heap import retain_freed_memory
        retain_freed_memory()  # the same allocator for both impls (see METHOD_NOTES)
    for lora in (False, True) if WITH_LORA else (False,):
        work = Workload(setting, device, lora=lora)
        impls = [("llm2vec_fast_packed", _ours(work)), ("llm2vec_sdpa_padded", _baseline(work))]
        yield Case(OP, work.shape, setting.model.dtype, impls, flops=work.flops)


def throughput(rows: Sequence[harness.Row]) -> List[str]:
    """One note per row with its texts/s and tokens/s, and our speed-up over the baseline."""
    goal = "2x on an H100" if any("D=128" in row.shape for row in rows if row.op == OP) else "1.3x on the CPU"
    return harness.speed_notes(rows, OP, [("texts", "texts/s", ",.0f"), ("tokens", "tokens/s", ",.0f")],
                               "llm2vec_fast_packed", "llm2vec_sdpa_padded", goal)


def main(argv: Optional[Sequence[str]] = None) -> int:
    return harness.standalone_main(argv, description="End-to-end LLM2Vec.encode, ours vs llm2vec 0.2.3's algorithm", cases=cases,
                                   method_notes=METHOD_NOTES, run_notes=NOTES, summary=throughput,
                                   results_subdir="encode")


if __name__ == "__main__":
    sys.exit(main())
