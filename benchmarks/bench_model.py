"""End-to-end forward of a bidirectional decoder: op ``model_forward``, judged in tokens/s.

The model: a Mistral-7B-shaped ``MistralBiModel`` with random weights (full width: hidden 4096, MLP
14336, Hq=32, Hkv=8, D=128, vocab 32000; ``BENCH_MODEL_LAYERS`` layers, default 8 of the 32), bf16.
The workload: ``BENCH_MODEL_SEQUENCES`` (default 128) random-token sequences with lognormal lengths
(mean about 200, clipped to [8, 512]), the same sequences for every impl, no tokenisation timed. One
timed call encodes the whole workload (last hidden states, no grad).

Impls, measured in the same run on the same model (``set_attn_implementation`` switches between them):
- ``llm2vec_fast_packed``: ours, the speed path: sequences packed (no padding) into batches of at most
  ``BENCH_MODEL_TOKEN_BUDGET`` (default 16384) tokens, ``model.forward_packed`` with
  ``attn_implementation="llm2vec_fast"`` (``flash_attention`` with ``cu_seqlens``, backend "auto");
- ``llm2vec_fast_unfused``: the same packed path with ``LLM2VEC_FAST_FUSED_OPS=0`` (transformers' own RMSNorms,
  MLP products and RoPE): what the fused ops (``rms_norm``, ``gated_activation``, ``rotary_embedding``) are worth;
- ``llm2vec_fast_padded``: our attention on llm2vec's padded batches (below): the attention alone;
- ``hf_sdpa_padded``: what llm2vec does: sequences sorted by length (longest first), batches of 32
  padded to their longest, the bidirectional model with transformers' ``"sdpa"`` and the padding mask.

Row fields: ``ms`` is one call (the whole workload); ``tokens=N`` in ``shape`` is the real tokens per
call, so tokens/s = N / (ms / 1000); ``tflops`` is useful model FLOP/s, counting real tokens only:
layers * (2 * T * P_layer + 4 * sum(s_i^2) * Hq * D), P_layer the layer's matrix parameters;
``gbps`` is null. ``--quick``: a tiny float32 model (2 layers, hidden 128) on 16 short sequences.

    python -m benchmarks.bench_model [--quick] [--out DIR] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case  # noqa: E402
from benchmarks.shapes import (ModelShape, build_bidirectional_mistral, forward_flops,  # noqa: E402
                               lognormal_lengths, mistral_7b, set_attention, tiny)

OP = "model_forward"
IMPLS = ("llm2vec_fast_packed", "llm2vec_fast_unfused", "llm2vec_fast_padded", "hf_sdpa_padded")


@dataclass(frozen=True)
class Setting:
    model: ModelShape
    sequences: int
    mean_length: float
    max_length: int
    padded_batch: int
    token_budget: int


FULL = Setting(model=mistral_7b(int(os.environ.get("BENCH_MODEL_LAYERS", 8))),
               sequences=int(os.environ.get("BENCH_MODEL_SEQUENCES", 128)), mean_length=200, max_length=512,
               padded_batch=32, token_budget=int(os.environ.get("BENCH_MODEL_TOKEN_BUDGET", 16384)))
QUICK = Setting(model=tiny(vocab=100, heads=4, kv_heads=2), sequences=16, mean_length=24, max_length=64,
                padded_batch=8, token_budget=256)
PAD_TOKEN_ID = 0  # the padded batches' filler (its embedding row is zero)
SIGMA = 0.6  # lognormal spread; the median is set so that the mean is mean_length

METHOD_NOTES = [
    "model_forward: one call encodes the whole workload (random-token sequences, lognormal lengths); "
    "tokens/s = tokens (in the shape) / (ms / 1000); TFLOP/s counts useful model FLOPs on real tokens only. "
    "llm2vec_fast_packed = forward_packed with attn 'llm2vec_fast' on token-budget packs; hf_sdpa_padded = "
    "llm2vec's recipe (sorted by length, batches of 32 padded, transformers 'sdpa' with the padding mask); "
    "llm2vec_fast_padded = our attention on those same padded batches; llm2vec_fast_unfused = the packed path "
    "with LLM2VEC_FAST_FUSED_OPS=0 (transformers' RMSNorm, MLP product and RoPE).",
]
NOTES: List[str] = []


class Workload:
    """The sequences and the model (built once, on first use, shared by every impl)."""

    def __init__(self, setting: Setting, device: torch.device, seed: int = 0):
        self.setting, self.device = setting, device
        low = 8 if setting.max_length >= 64 else 2
        self.lengths = lognormal_lengths(setting.sequences, setting.mean_length, SIGMA, low, setting.max_length, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        self.sequences = [torch.randint(1, setting.model.vocab, (n,), generator=generator) for n in self.lengths]
        self._model = None

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def shape(self) -> str:
        s = self.setting
        return (f"{s.model.describe()},seqs={s.sequences},tokens={self.tokens},"
                f"len=lognormal-mean{s.mean_length:g}-max{s.max_length}")

    @property
    def flops(self) -> float:
        return forward_flops(self.setting.model, self.lengths)

    def model(self, attn_implementation: str):
        if self._model is None:
            self._model = build_bidirectional_mistral(self.setting.model, self.device, pad_token_id=PAD_TOKEN_ID)
        set_attention(self._model, attn_implementation)
        return self._model

    def padded_batches(self) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """llm2vec's batching: longest first, ``padded_batch`` sequences each, right-padded to the longest."""
        order = sorted(range(len(self.sequences)), key=lambda i: -self.lengths[i])
        batches = []
        for start in range(0, len(order), self.setting.padded_batch):
            chunk = [self.sequences[i] for i in order[start:start + self.setting.padded_batch]]
            width = max(len(x) for x in chunk)
            ids = torch.full((len(chunk), width), PAD_TOKEN_ID, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, x in enumerate(chunk):
                ids[row, :len(x)] = x
                mask[row, :len(x)] = 1
            batches.append((ids.to(self.device), mask.to(self.device)))
        return batches

    def packed_batches(self):
        """Sequences in their given order, packed greedily into batches of at most ``token_budget`` tokens."""
        from llm2vec_fast.models import pack_sequences
        packs, current, used = [], [], 0
        for x in self.sequences:
            if current and used + len(x) > self.setting.token_budget:
                packs.append(current)
                current, used = [], 0
            current.append(x)
            used += len(x)
        if current:
            packs.append(current)
        return [pack_sequences(chunk).to(self.device) for chunk in packs]


def _packed(work: Workload, fused: bool = True) -> Callable:
    """Ours; ``fused=False``: with the lean layers' fused ops switched off (LLM2VEC_FAST_FUSED_OPS=0)."""
    from llm2vec_fast.models.lean import FUSED_OPS_ENV

    def setup():
        model = work.model("llm2vec_fast")
        packs = work.packed_batches()

        def run():
            saved = os.environ.get(FUSED_OPS_ENV)
            os.environ[FUSED_OPS_ENV] = "1" if fused else "0"
            try:
                with torch.no_grad():
                    return [model.forward_packed(batch=batch).hidden for batch in packs][-1]
            finally:
                if saved is None:
                    os.environ.pop(FUSED_OPS_ENV, None)
                else:
                    os.environ[FUSED_OPS_ENV] = saved
        return run
    return setup


def _padded(work: Workload, attn_implementation: str) -> Callable:
    def setup():
        model = work.model(attn_implementation)
        batches = work.padded_batches()

        def run():
            with torch.no_grad():
                return [model(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in batches][-1]
        return run
    return setup


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    setting = QUICK if quick else FULL
    work = Workload(setting, device)
    impls = [("llm2vec_fast_packed", _packed(work)), ("llm2vec_fast_unfused", _packed(work, fused=False)),
             ("llm2vec_fast_padded", _padded(work, "llm2vec_fast")), ("hf_sdpa_padded", _padded(work, "sdpa"))]
    yield Case(OP, work.shape, setting.model.dtype, impls, flops=work.flops)


def tokens_per_second(rows: Sequence[harness.Row]) -> List[str]:
    """One note per row with its tokens/s, and our speed-up over hf_sdpa_padded."""
    return harness.speed_notes(rows, OP, [("tokens", "tokens/s", ",.0f")], "llm2vec_fast_packed", "hf_sdpa_padded",
                               "2x")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return harness.standalone_main(argv, description="End-to-end bidirectional model forward, tokens/s", cases=cases,
                                   method_notes=METHOD_NOTES, run_notes=NOTES, summary=tokens_per_second,
                                   results_subdir="model")


if __name__ == "__main__":
    sys.exit(main())
