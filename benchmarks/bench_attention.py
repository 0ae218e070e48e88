"""Attention benchmarks: ``attention_fwd`` and ``attention_bwd`` (bidirectional, non-causal).

Impls, all measured in the same run on the same random inputs:
- ours: ``lf.flash_attention(q, k, v, cu_seqlens, max_seqlen, backend=b)`` for every backend in
  ``dispatch.available_backends("flash_attention", device)`` (named "triton", "cuda", "torch"; our
  "flash_attn" backend is skipped, the raw flash-attn function below is the same kernel);
- ``cuda_v2``: the "cuda" backend with the v2 (warp-specialised, FA3-style) Hopper kernel
  (``cuda_backend.use_attention_variant(2)``; "cuda" runs the variant LLM2VEC_FAST_CUDA_ATTENTION selects,
  v1 by default); skipped wherever "cuda" is;
- ``sdpa_cudnn`` / ``sdpa_flash`` / ``sdpa_efficient`` / ``eager``: torch SDPA with one backend forced
  by ``torch.nn.attention.sdpa_kernel`` (CUDNN_ATTENTION / FLASH_ATTENTION / EFFICIENT_ATTENTION / MATH),
  on (B, H, S, D) views of (B, S, H, D) tensors;
- ``flex``: ``torch.compile(flex_attention)`` on the packed layout (1, Hq, T, D) with a document
  BlockMask, for every case (T is the same for every full case, so one compile serves them all); GPU only;
- ``flash_attn``: ``flash_attn_varlen_func`` on the packed layout, when flash-attn is importable.

Sliding-window cases ("window=w", |i - j| < w, as Gemma3's and Mistral's sliding layers made bidirectional):
ours with ``sliding_window=w`` (the "cuda" backend would run its Triton fallback: skipped), flex with the
window in its mask_mod, flash-attn with ``window_size=(w - 1, w - 1)``, and SDPA's cuDNN / efficient backends
with a boolean (B, 1, S, S) band mask (its flash backend takes no mask: skipped). FLOPs count the kept
pairs only.

Layouts:
- equal-length cases ("B=..,S=..") are one dense batch: SDPA sees (B, S) with no mask, our op and
  flash-attn see the same tokens packed with cu_seqlens;
- the varlen case ("varlen=lognormal,sdpa=pad+mask") packs lognormal lengths; SDPA and eager see it
  padded to (B, Smax) with a boolean key-padding mask (built outside the timed region), so they pay for
  the padding; FLOPs count only the real tokens (4 * sum s_i^2 * Hq * D) for every impl.

GQA (Hq=32, Hkv=8): SDPA is called with ``enable_gqa=True``; a backend that rejects it gets K and V
repeated along heads by ``repeat_interleave`` *outside* the timed region (favouring the baseline), noted.

Backward: ``attention_bwd`` times ``torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)``
replayed on one saved forward graph, i.e. the backward alone. An impl whose graph cannot be replayed is
timed as (forward+backward) - forward instead, noted. FLOPs: bwd = 2.5 x fwd.

Impls that materialise the B x Hq x S x S score matrix ("torch", our reference; "eager") are skipped
when it would exceed ``BENCH_SCORE_LIMIT`` elements (default 2^30) so they cannot exhaust memory or time.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import llm2vec_fast as lf
from llm2vec_fast import dispatch

from .harness import Case, Differential, SkipImpl, cu_seqlens_of, lognormal_lengths, randn

OP = "flash_attention"
SCORE_LIMIT = int(float(os.environ.get("BENCH_SCORE_LIMIT", 2**30)))

FULL_TOKENS = 16384
FULL_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)  # the FA3 paper's shapes: B*S = 16k tokens
FULL_HEAD_DIMS = (128, 64)
FULL_HEADS = (32, 8)
QUICK_TOKENS = 256
QUICK_HEADS = (4, 2)

METHOD_NOTES = [
    "attention: FLOPs fwd = 4*sum(s_i^2)*Hq*D, bwd = 2.5x fwd; attention_bwd is the backward alone "
    "(autograd.grad replayed on a saved forward graph with retain_graph=True).",
    "attention: equal-length cases are one dense (B, S) batch for SDPA/eager and the same tokens packed "
    "for ours/flash_attn; the varlen case is padded to (B, Smax) with a key-padding mask for SDPA/eager "
    "(sdpa=pad+mask); flex uses the packed layout with a document BlockMask everywhere.",
    "attention: SDPA uses enable_gqa=True; where a backend rejects it, K/V are repeat_interleave'd "
    "outside the timed region (noted below).",
]

NOTES: List[str] = []  # per-run notes added by setups (GQA fallbacks, differential backward timing)


def _note(message: str) -> None:
    if message not in NOTES:
        NOTES.append(message)
        print(f"note  {message}")


class Problem:
    """One batch of random q, k, v in the packed layout, and the views every impl needs."""

    def __init__(self, lengths: Sequence[int], heads: Tuple[int, int], head_dim: int, dtype: torch.dtype,
                 device: torch.device, varlen: bool, seed: int = 0, window: Optional[int] = None):
        torch.manual_seed(seed)
        self.window = window
        self.lengths = [int(n) for n in lengths]
        self.hq, self.hkv = heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = device
        self.varlen = varlen
        self.total = sum(self.lengths)
        self.batch = len(self.lengths)
        self.max_seqlen = max(self.lengths)
        self.q = randn((self.total, self.hq, head_dim), dtype, device)
        self.k = randn((self.total, self.hkv, head_dim), dtype, device)
        self.v = randn((self.total, self.hkv, head_dim), dtype, device)
        self.cu_seqlens = cu_seqlens_of(self.lengths, device)
        self._padded: Optional[Tuple[torch.Tensor, ...]] = None

    @property
    def shape(self) -> str:
        heads = f"Hq={self.hq},Hkv={self.hkv},D={self.head_dim}"
        if self.window is not None:
            heads += f",window={self.window}"
        if self.varlen:
            return f"B={self.batch},T={self.total},Smax={self.max_seqlen},{heads},varlen=lognormal,sdpa=pad+mask"
        return f"B={self.batch},S={self.max_seqlen},{heads}"

    @property
    def flops(self) -> float:
        return 4.0 * sum(self._pairs(n) for n in self.lengths) * self.hq * self.head_dim

    def _pairs(self, n: int) -> int:
        """(query, key) pairs that attend in a sequence of n tokens: n^2, or |i - j| < window only."""
        w = self.window
        if w is None or w >= n:
            return n * n
        return n + 2 * sum(n - d for d in range(1, w))

    @property
    def score_elements(self) -> int:
        """Elements of one padded B x Hq x Smax x Smax score matrix."""
        return self.batch * self.hq * self.max_seqlen ** 2

    def doc_ids(self) -> torch.Tensor:
        lengths = torch.tensor(self.lengths, device=self.device)
        return torch.repeat_interleave(torch.arange(self.batch, device=self.device, dtype=torch.int32), lengths)

    def padded(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """(q, k, v) as (B, Smax, H, D) and a (B, 1, 1, Smax) bool key mask (None when lengths are equal)."""
        if self._padded is None:
            if not self.varlen:
                b, s = self.batch, self.max_seqlen
                self._padded = (self.q.view(b, s, self.hq, -1), self.k.view(b, s, self.hkv, -1),
                                self.v.view(b, s, self.hkv, -1), None)
            else:
                seq = self.doc_ids().long()
                pos = torch.arange(self.total, device=self.device) - self.cu_seqlens.long()[seq]

                def pad(x):
                    out = randn((self.batch, self.max_seqlen, x.shape[1], self.head_dim), self.dtype, self.device)
                    out[seq, pos] = x
                    return out

                lengths = torch.tensor(self.lengths, device=self.device)
                mask = torch.arange(self.max_seqlen, device=self.device)[None, :] < lengths[:, None]
                self._padded = (pad(self.q), pad(self.k), pad(self.v), mask[:, None, None, :])
            if self.window is not None:  # the band |i - j| < window, on top of the key-padding mask
                positions = torch.arange(self.max_seqlen, device=self.device)
                band = ((positions[:, None] - positions[None, :]).abs() < self.window)[None, None]
                q, k, v, mask = self._padded
                self._padded = (q, k, v, band if mask is None else band & mask)
        return self._padded


def _leaves(*tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    return tuple(t.detach().clone().requires_grad_(True) for t in tensors)


def _backward_timed(name: str, forward: Callable, leaves: Tuple[torch.Tensor, ...]):
    """The backward of ``forward(*leaves)`` alone, replayed on one saved graph; else (fwd+bwd) - fwd."""
    out = forward(*leaves)
    dout = torch.randn_like(out)

    def replay():
        return torch.autograd.grad(out, leaves, dout, retain_graph=True)

    try:
        replay()
        return replay
    except Exception as error:  # e.g. a compiled graph that frees its buffers after one backward
        _note(f"{name}: backward timed as (fwd+bwd) - fwd ({type(error).__name__}: "
              f"{str(error).strip().splitlines()[0][:100] if str(error).strip() else ''})")

    def total():
        return torch.autograd.grad(forward(*leaves), leaves, dout)

    return Differential(total=total, base=lambda: forward(*leaves))


def _forward_timed(forward: Callable, inputs: Tuple[torch.Tensor, ...]):
    def run():
        with torch.no_grad():
            return forward(*inputs)
    return run


def _timed(name: str, p: Problem, forward: Callable, inputs: Tuple[torch.Tensor, ...], backward: bool):
    return _backward_timed(name, forward, _leaves(*inputs)) if backward else _forward_timed(forward, inputs)


# ------------------------------------------------------------------------------------------ impls

def _ours(p: Problem, backend: str, backward: bool, variant: int = 0):
    """Our backend; variant (the "cuda" backend only): 0 = the kernel the environment selects
    (LLM2VEC_FAST_CUDA_ATTENTION, default v1), 2 = the v2 (warp-specialised) kernel: row "cuda_v2"."""
    name = "cuda_v2" if variant == 2 else backend

    def setup():
        if backend == "torch" and p.score_elements > SCORE_LIMIT:
            raise SkipImpl(f"the torch reference would materialise {p.score_elements:.2e} scores "
                           f"(> BENCH_SCORE_LIMIT={SCORE_LIMIT:.2e})")
        if backend == "cuda":  # the Hopper kernel (csrc/attention.cu); elsewhere it would time Triton's fallback
            from llm2vec_fast import cuda_backend
            if p.window is not None:
                raise SkipImpl("the cuda backend runs sliding windows on its Triton fallback (the triton row)")
            if cuda_backend.attention_switched_off():
                raise SkipImpl("LLM2VEC_FAST_CUDA_ATTENTION=off (the device check's diagnosis failed)")
            if not cuda_backend.attention_kernel_supported(p.q, p.k, p.v, p.cu_seqlens, False, 0.0):
                raise SkipImpl("the cuda attention kernel needs sm_90 and bf16/fp16 with head dim 64/128 "
                               "(it would run the Triton fallback)")
        cu, max_seqlen, window = p.cu_seqlens, p.max_seqlen, p.window

        if variant:
            from llm2vec_fast import cuda_backend

            def forward(q, k, v):
                previous = cuda_backend.use_attention_variant(variant)
                try:
                    return lf.flash_attention(q, k, v, cu, max_seqlen, backend=backend)
                finally:
                    cuda_backend.use_attention_variant(previous)
        else:
            def forward(q, k, v):
                return lf.flash_attention(q, k, v, cu, max_seqlen, sliding_window=window, backend=backend)

        return _timed(name, p, forward, (p.q, p.k, p.v), backward)
    return setup


def _first_warning(caught) -> str:
    for w in caught:
        text = str(w.message).strip().replace("\n", " ")
        if text:
            return f" ({text[:200]})"
    return ""


def _sdpa(p: Problem, name: str, backend_name: str, backward: bool):
    def setup():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)
        if name == "sdpa_flash" and p.window is not None:
            raise SkipImpl("SDPA's flash backend takes no mask, so no sliding window")
        if name == "eager" and p.score_elements > SCORE_LIMIT:
            raise SkipImpl(f"eager would materialise {p.score_elements:.2e} scores "
                           f"(> BENCH_SCORE_LIMIT={SCORE_LIMIT:.2e})")
        q, k, v, mask = p.padded()
        group = p.hq // p.hkv

        def make_forward(enable_gqa: bool):
            def forward(q_, k_, v_):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q_.transpose(1, 2), k_.transpose(1, 2), v_.transpose(1, 2),
                                                          attn_mask=mask, enable_gqa=enable_gqa)
            return forward

        forward = make_forward(group > 1)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with torch.no_grad():
                    forward(q[:1], k[:1], v[:1]) if mask is None else forward(q, k, v)
            except RuntimeError as error:
                if group == 1:
                    raise RuntimeError(f"{error}{_first_warning(caught)}") from None
                gqa_error = f"{error}{_first_warning(caught)}"
                forward = make_forward(False)
                k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
                try:
                    with torch.no_grad():
                        forward(q, k, v)
                except RuntimeError as error2:
                    raise RuntimeError(f"{error2}{_first_warning(caught)}") from None
                _note(f"{name}: enable_gqa rejected ({gqa_error.splitlines()[0][:120]}); K/V repeated to Hq "
                      f"heads outside the timed region")
        return _timed(name, p, forward, (q, k, v), backward)
    return setup


_FLEX: Dict[str, Callable] = {}
_DOC_BUFFERS: Dict[Tuple[str, int], Tuple[torch.Tensor, Callable]] = {}


def _compiled_flex() -> Callable:
    if "fn" not in _FLEX:
        from torch.nn.attention.flex_attention import flex_attention
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    return _FLEX["fn"]


def _document_mask_mod(doc_ids: torch.Tensor, window: Optional[int]) -> Callable:
    """One mask_mod function per (device, T, windowed), reading persistent buffers that each case overwrites
    (the documents; the window), so the compiled flex kernel is reused across cases instead of recompiled for
    a new closure."""
    key = (str(doc_ids.device), doc_ids.numel(), window is not None)
    if key not in _DOC_BUFFERS:
        buffer = doc_ids.clone()
        width = torch.zeros((), dtype=torch.int32, device=doc_ids.device)

        if window is None:
            def mask_mod(b, h, q_idx, kv_idx):
                return buffer[q_idx] == buffer[kv_idx]
        else:
            def mask_mod(b, h, q_idx, kv_idx):  # packed positions: within a document they differ as in it
                return (buffer[q_idx] == buffer[kv_idx]) & ((q_idx - kv_idx).abs() < width)

        _DOC_BUFFERS[key] = (buffer, (width, mask_mod))
    buffer, (width, mask_mod) = _DOC_BUFFERS[key]
    buffer.copy_(doc_ids)
    width.fill_(window or 0)
    return mask_mod


def _flex(p: Problem, backward: bool):
    def setup():
        if p.device.type != "cuda":
            raise SkipImpl("flex runs on a CUDA GPU only in this suite")
        from torch.nn.attention.flex_attention import create_block_mask
        flex = _compiled_flex()
        block_mask = create_block_mask(_document_mask_mod(p.doc_ids(), p.window), None, None, p.total, p.total,
                                       device=p.device)

        def forward(q, k, v):  # (T, H, D) -> (1, H, T, D) views
            out = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                       block_mask=block_mask, enable_gqa=p.hq != p.hkv)
            return out

        return _timed("flex", p, forward, (p.q, p.k, p.v), backward)
    return setup


def _flash_attn(p: Problem, backward: bool):
    def setup():
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            raise SkipImpl("flash_attn is not importable") from None
        if p.device.type != "cuda":
            raise SkipImpl("flash_attn runs on a CUDA GPU only")
        cu, max_seqlen = p.cu_seqlens, p.max_seqlen
        window = (p.window - 1, p.window - 1) if p.window is not None else (-1, -1)

        def forward(q, k, v):
            return flash_attn_varlen_func(q, k, v, cu, cu, max_seqlen, max_seqlen, causal=False, window_size=window)

        return _timed("flash_attn", p, forward, (p.q, p.k, p.v), backward)
    return setup


def impls(p: Problem, backward: bool) -> List[Tuple[str, Callable]]:
    ours = [b for b in ("triton", "cuda", "torch") if b in dispatch.available_backends(OP, p.device)]
    result = [(b, _ours(p, b, backward)) for b in ours]
    if "cuda" in ours:  # the v2 Hopper kernel next to the default one (skipped where "cuda" is)
        result.insert(ours.index("cuda") + 1, ("cuda_v2", _ours(p, "cuda", backward, variant=2)))
    result += [("sdpa_cudnn", _sdpa(p, "sdpa_cudnn", "CUDNN_ATTENTION", backward)),
               ("sdpa_flash", _sdpa(p, "sdpa_flash", "FLASH_ATTENTION", backward)),
               ("sdpa_efficient", _sdpa(p, "sdpa_efficient", "EFFICIENT_ATTENTION", backward)),
               ("flex", _flex(p, backward)),
               ("flash_attn", _flash_attn(p, backward)),
               ("eager", _sdpa(p, "eager", "MATH", backward))]
    return result


def problems(quick: bool, device: torch.device) -> Iterator[Problem]:
    if quick:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        yield Problem(lognormal_lengths(QUICK_TOKENS, 48, 0.6, 8, 128, seed=0), QUICK_HEADS, 64, dtype, device,
                      varlen=True)
        yield Problem([128] * (QUICK_TOKENS // 128), QUICK_HEADS, 64, dtype, device, varlen=False)
        yield Problem([128] * (QUICK_TOKENS // 128), QUICK_HEADS, 64, dtype, device, varlen=False, window=32)
        return
    # The encoder's mix (issue 3): lognormal lengths with mean ~200, capped at 512; then a long-tailed mix.
    yield Problem(lognormal_lengths(FULL_TOKENS, 170, 0.75, 8, 512, seed=0), FULL_HEADS, 128, torch.bfloat16,
                  device, varlen=True)
    yield Problem(lognormal_lengths(FULL_TOKENS, 600, 0.9, 32, 4096, seed=0), FULL_HEADS, 128, torch.bfloat16,
                  device, varlen=True)
    for head_dim in FULL_HEAD_DIMS:
        for seqlen in FULL_SEQLENS:
            yield Problem([seqlen] * (FULL_TOKENS // seqlen), FULL_HEADS, head_dim, torch.bfloat16, device,
                          varlen=False)
    # Sliding windows: a Gemma3 (4B+) layer's 1024 and a Mistral-style 4096, on 8k-token sequences.
    for window in (1024, 4096):
        yield Problem([8192] * (FULL_TOKENS // 8192), FULL_HEADS, 128, torch.bfloat16, device, varlen=False,
                      window=window)


def cases(quick: bool, device: torch.device) -> Iterator[Case]:
    """attention_fwd then attention_bwd for each problem (sharing its inputs)."""
    for p in problems(quick, device):
        yield Case("attention_fwd", p.shape, p.dtype, impls(p, backward=False), flops=p.flops)
        yield Case("attention_bwd", p.shape, p.dtype, impls(p, backward=True), flops=2.5 * p.flops)
