"""One SimCSE training step: op ``train_step``, judged in samples/s and in the largest batch that fits.

The model: a Mistral-7B-shaped ``MistralBiModel`` with random weights (hidden 4096, MLP 14336, Hq=32,
Hkv=8, D=128, vocab 32000; ``BENCH_TRAIN_LAYERS`` layers, default 8 of the 32), bf16, a LoRA r16 (alpha 32,
dropout 0.05) on every projection, gradient checkpointing (non-reentrant), attention dropout 0.3 (SimCSE).
The workload: B sentences of random tokens with lognormal lengths (mean about 40, clipped to [4, 128]); each
sentence is its own positive (two copies, different dropout masks), in-batch negatives, scale 20.

Impls, measured in the same run on the same model:
- ``llm2vec_fast_packed``: ours, the recipe's step (``training.contrastive``): both copies packed into one
  ``forward_packed`` with ``attn_implementation="llm2vec_fast"``, mean pooling from the packed layout
  (``llm2vec_fast.pool``), ``llm2vec_fast.contrastive_loss``, backward;
- ``hf_sdpa_padded``: an llm2vec-style step: each copy a left-padded batch through the model with
  transformers' ``"sdpa"``, mean pooling with the padding mask in torch, and the naive B x B loss
  ``cross_entropy(20 * normalize(q) @ normalize(d).T, arange(B))``, backward.

Row fields: ``ms`` is one step (forward + backward, no optimizer) at B = ``BENCH_TRAIN_BATCH`` (default 128);
samples/s = B / (ms / 1000); ``tflops`` counts useful FLOPs on real tokens: 3 x the forward (forward, backward)
of both copies, recomputation not counted; ``peak_mem_mb`` is what the step allocates (CUDA).
Largest batch (CUDA): a doubling-then-bisection search on B for the largest step whose allocation peak
(``torch.cuda.max_memory_allocated`` above the model's) stays within ``BENCH_TRAIN_MEMORY_MB`` (default 16384)
without OOM, at most ``BENCH_TRAIN_MAX_BATCH`` (default 8192), within ``BENCH_TRAIN_SEARCH_S`` seconds (default
120) per impl; reported as notes. On the CPU there is no search: the notes give the peak memory each step
allocates at the timed batch (torch profiler's memory timeline, after a warm-up step).
``--quick``: a tiny float32 model (2 layers, hidden 128), B=8, lengths up to 32: a dry run of the code paths.

    python -m benchmarks.bench_train [--quick] [--out DIR] [--device auto|cpu|cuda]
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks import harness  # noqa: E402
from benchmarks.harness import Case  # noqa: E402
from benchmarks.shapes import (SMALL_CPU, ModelShape, build_bidirectional_mistral, forward_flops,  # noqa: E402
                               lognormal_lengths, mistral_7b, set_attention, tiny)

OP = "train_step"
IMPLS = ("llm2vec_fast_packed", "hf_sdpa_padded")
SCALE = 20.0
SIMCSE_DROPOUT = 0.3
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


@dataclass(frozen=True)
class Setting:
    model: ModelShape
    batch: int
    mean_length: float
    max_length: int


QUICK = Setting(model=tiny(vocab=256), batch=8, mean_length=12, max_length=32)
CPU = Setting(model=SMALL_CPU, batch=int(os.environ.get("BENCH_TRAIN_BATCH", 32)), mean_length=40, max_length=128)
GPU = Setting(model=mistral_7b(int(os.environ.get("BENCH_TRAIN_LAYERS", 8))),
              batch=int(os.environ.get("BENCH_TRAIN_BATCH", 128)), mean_length=40, max_length=128)
SIGMA = 0.6  # lognormal spread of the lengths; the median is set so that the mean is mean_length
MIN_LENGTH = 4
MEMORY_MB = float(os.environ.get("BENCH_TRAIN_MEMORY_MB", 16384))
MAX_BATCH = int(os.environ.get("BENCH_TRAIN_MAX_BATCH", 8192))
SEARCH_S = float(os.environ.get("BENCH_TRAIN_SEARCH_S", 120))

METHOD_NOTES = [
    "train_step: one SimCSE step (forward + backward of both copies, loss; no optimizer) at batch B, LoRA r16, "
    "gradient checkpointing, attention dropout 0.3; samples/s = B / (ms / 1000). llm2vec_fast_packed = the "
    "recipe's packed step (forward_packed, llm2vec_fast.pool, contrastive_loss); hf_sdpa_padded = llm2vec-style "
    "(padded batches, transformers 'sdpa', torch mean pooling, naive B x B cross-entropy) on the same model.",
]
NOTES: List[str] = []


def lengths_for(setting: Setting, batch: int, seed: int = 0) -> List[int]:
    """Lognormal lengths (mean about ``mean_length``), clipped to [MIN_LENGTH, max_length]."""
    return lognormal_lengths(batch, setting.mean_length, SIGMA, MIN_LENGTH, setting.max_length, seed)


def sentences_for(setting: Setting, batch: int, seed: int = 0) -> List[List[int]]:
    generator = torch.Generator().manual_seed(seed + 1)
    return [torch.randint(3, setting.model.vocab, (n,), generator=generator).tolist()
            for n in lengths_for(setting, batch, seed)]


def build_model(setting: Setting, device: torch.device):
    """A random-weight bidirectional Mistral in ``setting.model.dtype`` with a float32 LoRA, gradient
    checkpointing and SimCSE's attention dropout, in training mode."""
    from peft import LoraConfig, get_peft_model

    from llm2vec_fast.training.contrastive import set_attention_dropout
    base = build_bidirectional_mistral(setting.model, device, attn_implementation="llm2vec_fast")
    base.config.use_cache = False
    model = get_peft_model(base, LoraConfig(**LORA))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    set_attention_dropout(model, SIMCSE_DROPOUT)
    return model.train()


class Workload:
    """The model (built once, on first use, shared by both impls) and the batches."""

    def __init__(self, setting: Setting, device: torch.device):
        self.setting, self.device = setting, device
        self._model = None
        self._encoder = None

    def model(self, attn_implementation: str):
        if self._model is None:
            self._model = build_model(self.setting, self.device)
        set_attention(self._model.get_base_model(), attn_implementation)
        return self._model

    def encoder(self):
        from llm2vec_fast import LLM2Vec
        model = self.model("llm2vec_fast")
        if self._encoder is None:
            self._encoder = LLM2Vec(model, tokenizer=None, pooling_mode="mean", max_length=self.setting.max_length)
        return self._encoder

    def shape(self, batch: int) -> str:
        s = self.setting
        tokens = sum(lengths_for(s, batch))
        return (f"{s.model.describe()},B={batch},tokens={2 * tokens},"
                f"len=lognormal-mean{s.mean_length:g}-max{s.max_length},lora=r16")

    def flops(self, batch: int) -> float:
        lengths = lengths_for(self.setting, batch)
        return 3.0 * forward_flops(self.setting.model, lengths + lengths)


# --------------------------------------------------------------------------------------------- steps

def ours_step(work: Workload, batch: int) -> Callable[[], torch.Tensor]:
    """The SimCSE recipe's step on token ids: both copies in one packed forward (different packed positions,
    so different dropout masks), pooled and scored by the public ops."""
    from llm2vec_fast import contrastive_loss
    from llm2vec_fast.models.lean import lean_layers
    from llm2vec_fast.training.contrastive import embed
    encoder = work.encoder()
    sentences = sentences_for(work.setting, batch)
    ids = sentences + sentences
    counts = [len(s) for s in ids]

    def step():
        with lean_layers(encoder.model):  # as training.loop runs every step
            emb = embed(encoder, ids, counts)
            loss = contrastive_loss(emb[:batch], emb[batch:], scale=SCALE)
            loss.backward()
        return loss.detach()
    return step


def _left_padded(sentences: Sequence[List[int]], device) -> tuple:
    width = max(len(s) for s in sentences)
    ids = torch.full((len(sentences), width), 2, dtype=torch.long)
    mask = torch.zeros((len(sentences), width), dtype=torch.long)
    for row, s in enumerate(sentences):
        ids[row, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[row, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def baseline_step(work: Workload, batch: int) -> Callable[[], torch.Tensor]:
    """llm2vec's SimCSE step as it runs it: a padded forward per copy ("sdpa"), masked mean pooling, and the
    B x B cross-entropy over cosine scores."""
    model = work.model("sdpa")
    ids, mask = _left_padded(sentences_for(work.setting, batch), work.device)
    labels = torch.arange(batch, device=work.device)

    def embed_padded():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1)

    def step():
        q, d = embed_padded(), embed_padded()
        scores = SCALE * (F.normalize(q, dim=-1) @ F.normalize(d, dim=-1).T)
        loss = F.cross_entropy(scores.float(), labels)
        loss.backward()
        return loss.detach()
    return step


STEPS = {"llm2vec_fast_packed": ours_step, "hf_sdpa_padded": baseline_step}


def _setup(work: Workload, impl: str, batch: int) -> Callable:
    def setup():
        return STEPS[impl](work, batch)
    return setup


# ------------------------------------------------------------------------------------------- memory

def step_peak_mb(work: Workload, impl: str, batch: int) -> Optional[float]:
    """CUDA memory one step at ``batch`` allocates at its peak (gradients included), or None on OOM."""
    device = work.device
    model = work._model
    step = None
    try:
        step = STEPS[impl](work, batch)
        if model is None:
            model = work._model
        model.zero_grad(set_to_none=True)
        harness.free_memory(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20
    except torch.OutOfMemoryError:
        return None
    except RuntimeError as error:  # cuBLAS / cuDNN report a failed allocation as a RuntimeError
        if "out of memory" in str(error).lower() or "ALLOC_FAILED" in str(error):
            return None
        raise
    finally:
        step = None
        if model is not None:
            model.zero_grad(set_to_none=True)
        harness.free_memory(device)


def largest_batch(work: Workload, impl: str, start: int) -> tuple:
    """(largest B whose step fits in MEMORY_MB, whether that is exact rather than a lower bound): doubling from
    ``start``, then bisection to within 1/16."""
    deadline = time.monotonic() + SEARCH_S

    def fits(batch: int) -> bool:
        peak = step_peak_mb(work, impl, batch)
        return peak is not None and peak <= MEMORY_MB

    good, bad = 0, None
    batch = start
    while batch <= MAX_BATCH and time.monotonic() < deadline:
        if not fits(batch):
            bad = batch
            break
        good, batch = batch, batch * 2
    if bad is None:  # capped by MAX_BATCH or out of time: a lower bound
        return good, False
    while bad - good > max(1, good // 16) and time.monotonic() < deadline:
        middle = (good + bad) // 2
        if fits(middle):
            good = middle
        else:
            bad = middle
    return good, bad - good <= max(1, good // 16)


def cpu_step_peak_mb(step_factory: Callable[[], Callable]) -> float:
    """The CPU analogue of the CUDA peak: the most memory a step has allocated at once beyond what existed
    before it (torch profiler's memory timeline: every tensor storage created and destroyed, in order),
    after one warm-up step."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action
    step = step_factory()
    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        step()
    current = peak = 0
    for _, action, _, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            current += size
        elif action == Action.DESTROY:
            current -= size
        peak = max(peak, current)
    return peak / 2 ** 20


def memory_notes(work: Workload) -> None:
    """The largest batch of each impl within MEMORY_MB (CUDA), or each step's peak allocation at the batch (CPU)."""
    batch = work.setting.batch
    if work.device.type != "cuda":
        peak = {impl: cpu_step_peak_mb(_setup(work, impl, batch)) for impl in IMPLS}
        NOTES.append(f"{OP} memory (CPU, B={batch}): peak a step allocates: llm2vec_fast_packed "
                     f"{peak['llm2vec_fast_packed']:.1f} MiB, hf_sdpa_padded {peak['hf_sdpa_padded']:.1f} MiB "
                     f"({peak['hf_sdpa_padded'] / max(peak['llm2vec_fast_packed'], 1e-9):.2f}x)")
        return
    found = {}
    for impl in IMPLS:
        found[impl] = largest_batch(work, impl, start=max(8, batch // 4))
    ours, base = found["llm2vec_fast_packed"], found["hf_sdpa_padded"]
    exact = "" if ours[1] and base[1] else " (search cut short by BENCH_TRAIN_SEARCH_S or BENCH_TRAIN_MAX_BATCH)"
    ratio = f"{ours[0] / base[0]:.2f}x" if base[0] else "n/a (baseline fits no batch)"
    NOTES.append(f"{OP} largest batch within {MEMORY_MB:g} MiB above the weights: llm2vec_fast_packed B={ours[0]}, "
                 f"hf_sdpa_padded B={base[0]}: {ratio} (goal: >= 4x){exact}")


# -------------------------------------------------------------------------------------------- cases

def setting_for(quick: bool, device: torch.device) -> Setting:
    if quick:
        return QUICK
    return GPU if device.type == "cuda" else CPU


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    setting = setting_for(quick, device)
    work = Workload(setting, device)
    batch = setting.batch
    yield Case(OP, work.shape(batch), setting.model.dtype, [(impl, _setup(work, impl, batch)) for impl in IMPLS],
               flops=work.flops(batch))
    try:  # after the timed case: the memory comparison (notes only)
        memory_notes(work)
    except Exception as error:  # noqa: BLE001  a failed search must not lose the timed rows
        NOTES.append(f"{OP} memory comparison failed: {type(error).__name__}: {str(error)[:160]}")


def throughput(rows: Sequence[harness.Row]) -> List[str]:
    """Samples/s of each impl and our speed-up (standalone runs)."""
    return harness.speed_notes(rows, OP, [("B", "samples/s", ",.1f")], "llm2vec_fast_packed", "hf_sdpa_padded",
                               "1.5x on an H100")


def main(argv: Optional[Sequence[str]] = None) -> int:
    return harness.standalone_main(argv, description="One SimCSE training step, ours vs an llm2vec-style step",
                                   cases=cases, method_notes=METHOD_NOTES, run_notes=NOTES, summary=throughput,
                                   results_subdir="train")


if __name__ == "__main__":
    sys.exit(main())
