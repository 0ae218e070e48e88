"""Timing, memory and results writing shared by every benchmark module.

Timing:
- CUDA: ``triton.testing.do_bench`` median (it flushes L2 between runs), after an explicit warm-up of
  two calls (so torch.compile / autotuning never lands in do_bench's run-time estimate); CUDA events
  (median) when triton is missing or its do_bench fails.
- CPU: median of ``time.perf_counter`` over a few repeats after a warm-up call.

Memory: ``peak_mem_mb`` is ``torch.cuda.max_memory_allocated`` minus the memory allocated just before
one extra call of the timed function, so it counts what the call itself allocates (outputs included,
inputs and a retained autograd graph not). On the CPU it is null: RSS deltas of a single call are
dominated by the allocator's caching and are not reliable.

Results: one JSON file per run with exactly the schema of DESIGN.md ("Benchmark results format"), a
markdown table and a PNG plot next to it, named ``<device>-<date>-<shortsha>[-quick].{json,md,png}``.
"""
from __future__ import annotations

import datetime
import gc
import json
import math
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# cuda_v2: the "cuda" backend with the v2 (warp-specialised) Hopper attention kernel (bench_attention.py)
# llm2vec_fast's own backends and paths (llm2vec_fast_unfused: the packed path without the fused elementwise ops;
# llm2vec_fast_lean: the lean layers' LoRA linear, bench_fused.py); every other impl is a baseline
OUR_IMPLS = ("triton", "cuda", "cuda_v2", "torch", "llm2vec_fast_packed", "llm2vec_fast_unfused",
             "llm2vec_fast_padded", "llm2vec_fast_lean")
# Plot order and colours: ours first, then the baselines.
IMPL_ORDER = ("triton", "cuda", "cuda_v2", "torch", "sdpa_cudnn", "sdpa_flash", "sdpa_efficient", "flex", "flash_attn",
              "eager", "torch_naive", "naive")
IMPL_COLORS = {"triton": "#1f77b4", "cuda": "#ff7f0e", "cuda_v2": "#ffbb78", "torch": "#2ca02c",
               "sdpa_cudnn": "#d62728", "sdpa_flash": "#9467bd", "sdpa_efficient": "#8c564b", "flex": "#e377c2", "flash_attn": "#17becf",
               "eager": "#7f7f7f", "torch_naive": "#bcbd22", "naive": "#bcbd22"}
OP_ORDER = ("attention_fwd", "attention_bwd", "pool", "contrastive_loss_fwd", "contrastive_loss_fwd_bwd",
            "model_forward")
META_FIELDS = ("device", "gpu_name", "torch", "triton", "cuda", "commit", "date", "rows")
ROW_FIELDS = ("op", "impl", "shape", "dtype", "ms", "tflops", "gbps", "peak_mem_mb")
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class SkipImpl(Exception):
    """Raised by an impl's setup when it cannot run here; the message says why."""


def our_impls(op: str, device: torch.device, setup_for: Callable[[str], Callable[[], Any]]) -> List[Tuple[str, Any]]:
    """(backend, setup) for each of our backends of ``op`` here, in the tables' order (triton, cuda, torch), the cuda
    one skipped where ``LLM2VEC_FAST_CUDA_OFF`` turns its kernel off (see :func:`unless_switched_off`)."""
    from llm2vec_fast import dispatch
    return [(backend, unless_switched_off(op, backend, setup_for(backend))) for backend in ("triton", "cuda", "torch")
            if backend in dispatch.available_backends(op, device)]


def unless_switched_off(op: str, backend: str, setup: Callable[[], Any]) -> Callable[[], Any]:
    """``setup``, or for the "cuda" impl of an op whose kernel ``LLM2VEC_FAST_CUDA_OFF`` turns off (the device check
    does so for a kernel that failed its check), a setup that skips it: the cuda backend would run its Triton
    fallback, timed under the cuda name, and ``make_auto_table.py`` could then pick the kernel that failed."""
    if backend != "cuda":
        return setup

    def checked():
        from llm2vec_fast import cuda_backend
        if op in cuda_backend.switched_off_ops():
            raise SkipImpl(f"LLM2VEC_FAST_CUDA_OFF turns the {op} kernel off (it would time the Triton fallback)")
        return setup()
    return checked


@dataclass
class Row:
    op: str
    impl: str
    shape: str
    dtype: str
    ms: float
    tflops: Optional[float]
    gbps: Optional[float]
    peak_mem_mb: Optional[float]

    def to_dict(self) -> Dict[str, Any]:
        return {name: getattr(self, name) for name in ROW_FIELDS}


@dataclass
class Differential:
    """An impl timed as median(total) - median(base), e.g. backward = (forward+backward) - forward,
    for a backward that cannot be replayed on a saved graph. Peak memory is that of ``total``."""
    total: Callable[[], Any]
    base: Callable[[], Any]


@dataclass
class Case:
    """One op at one shape. ``impls`` are (name, setup) pairs: ``setup()`` builds what the impl needs
    (outside the timed region) and returns the function to time, or a :class:`Differential`; it raises
    :class:`SkipImpl` (or anything else) when the impl cannot run, and the runner records nothing."""
    op: str
    shape: str
    dtype: torch.dtype
    impls: List[Tuple[str, Callable[[], Any]]]
    flops: Optional[float] = None  # per call, for TFLOP/s
    nbytes: Optional[float] = None  # bytes read + written per call, for GB/s


@dataclass
class TimingConfig:
    warmup_ms: float = float(os.environ.get("BENCH_WARMUP_MS", 25))
    rep_ms: float = float(os.environ.get("BENCH_REP_MS", 100))
    cpu_min_repeats: int = 3
    cpu_max_repeats: int = 25
    cpu_target_s: float = 0.15


# ----------------------------------------------------------------------------------------- inputs

def randn(shape: Sequence[int], dtype: torch.dtype, device, *, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Random normal data (never zeros: zeros make kernels look faster than they are)."""
    x = torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dtype)
    return x.requires_grad_(requires_grad)


def lognormal_lengths(total: int, median: float, sigma: float, low: int, high: int, seed: int) -> List[int]:
    """Sequence lengths drawn from a clipped lognormal, summing to exactly ``total`` (the last one is cut,
    or merged into its neighbour when the remainder would be shorter than ``low``)."""
    generator = torch.Generator().manual_seed(seed)
    lengths: List[int] = []
    used = 0
    while used < total:
        draw = math.exp(math.log(median) + sigma * float(torch.randn((), generator=generator)))
        n = int(min(max(round(draw), low), high, total - used))
        if n < low and lengths and lengths[-1] + n <= high:
            lengths[-1] += n
        else:
            lengths.append(n)
        used += n
    return lengths


def cu_seqlens_of(lengths: Sequence[int], device) -> torch.Tensor:
    offsets = [0]
    for n in lengths:
        offsets.append(offsets[-1] + int(n))
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


# ----------------------------------------------------------------------------------------- timing

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.empty_cache()
        except RuntimeError:  # a kernel's sticky error (illegal access): the impl that caused it is already a skip
            pass


def _cpu_median_ms(fn: Callable, cfg: TimingConfig) -> float:
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < cfg.cpu_max_repeats and (len(times) < cfg.cpu_min_repeats
                                                or time.perf_counter() - start < cfg.cpu_target_s):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_events_median_ms(fn: Callable, device: torch.device, cfg: TimingConfig) -> float:
    estimate_start, estimate_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    estimate_start.record()
    for _ in range(3):
        fn()
    estimate_end.record()
    torch.cuda.synchronize(device)
    estimate = max(estimate_start.elapsed_time(estimate_end) / 3, 1e-3)
    for _ in range(max(1, int(cfg.warmup_ms / estimate))):
        fn()
    repeats = min(1000, max(5, int(cfg.rep_ms / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    for i in range(repeats):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


_DO_BENCH_FAILED: List[BaseException] = []


def _cuda_median_ms(fn: Callable, device: torch.device, cfg: TimingConfig) -> float:
    try:
        from triton.testing import do_bench
    except ImportError:
        return _cuda_events_median_ms(fn, device, cfg)
    try:
        try:
            return float(do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, return_mode="median"))
        except TypeError:  # an old triton without return_mode
            return float(do_bench(fn, warmup=cfg.warmup_ms, rep=cfg.rep_ms, quantiles=[0.5])[0])
    except Exception as error:  # fn ran in the warm-up, so this is do_bench itself: time with CUDA events
        if not _DO_BENCH_FAILED:
            _DO_BENCH_FAILED.append(error)
            print(f"note  triton.testing.do_bench failed ({type(error).__name__}: {error}); timing with CUDA events")
        return _cuda_events_median_ms(fn, device, cfg)


def median_ms(fn: Callable, device: torch.device, cfg: Optional[TimingConfig] = None) -> float:
    """Median wall time of ``fn()`` in milliseconds on ``device`` (the caller has warmed it up)."""
    cfg = cfg or TimingConfig()
    if device.type == "cuda":
        return _cuda_median_ms(fn, device, cfg)
    return _cpu_median_ms(fn, cfg)


def peak_memory_mb(fn: Callable, device: torch.device) -> Optional[float]:
    """Memory one call of ``fn`` allocates at its peak, in MiB (CUDA); None on the CPU."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return max(peak, 0) / 2**20


def warm_up(fn: Callable, device: torch.device, calls: int = 2) -> None:
    for _ in range(calls):
        out = fn()
        del out
    synchronize(device)


def measure(timed: Any, device: torch.device, cfg: Optional[TimingConfig] = None) -> Tuple[float, Optional[float]]:
    """(ms, peak_mem_mb) of a function or a :class:`Differential`, warm-up included."""
    if isinstance(timed, Differential):
        warm_up(timed.total, device)
        warm_up(timed.base, device)
        ms = median_ms(timed.total, device, cfg) - median_ms(timed.base, device, cfg)
        return ms, peak_memory_mb(timed.total, device)
    warm_up(timed, device)
    return median_ms(timed, device, cfg), peak_memory_mb(timed, device)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 160:
        first = first[:157] + "..."
    return first if isinstance(error, SkipImpl) else f"{type(error).__name__}: {first}"


@dataclass(frozen=True)
class Skip:
    """An impl that recorded no row, and why."""
    op: str
    impl: str
    shape: str
    dtype: str
    reason: str


def skip_notes(skips: Sequence[Skip]) -> List[str]:
    """One line per (impl, reason), naming its cases (or counting them when there are many)."""
    groups: Dict[Tuple[str, str], List[Skip]] = {}
    for skip in skips:
        groups.setdefault((skip.impl, skip.reason), []).append(skip)
    lines = []
    for (impl, reason), members in groups.items():
        ops = sorted({m.op for m in members}, key=lambda op: (op_rank(op), op))
        shapes = list(dict.fromkeys(f"[{m.shape}, {m.dtype}]" for m in members))
        where = ", ".join(shapes) if len(shapes) <= 3 else f"{len(shapes)} shapes"
        lines.append(f"skipped {impl} ({'/'.join(ops)}; {where}): {reason}")
    return lines


def sig(x: Optional[float], digits: int = 4) -> Optional[float]:
    """x rounded to ``digits`` significant digits (None stays None)."""
    if x is None or not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def run_case(case: Case, device: torch.device, *, cfg: Optional[TimingConfig] = None,
             deadline: Optional[float] = None, impls: Optional[Iterable[str]] = None,
             skip_impls: Iterable[str] = (), log: Callable[[str], None] = print) -> Tuple[List[Row], List[Skip]]:
    """Measures every impl of ``case`` (one after the other, in the same process and run).

    Returns (rows, skips): an impl that raises is skipped, records no row, and leaves one :class:`Skip`.
    ``deadline`` (time.monotonic()) skips the impls that would start after it. ``impls`` keeps only
    those impls, ``skip_impls`` leaves those out (neither leaves a note).
    """
    wanted = set(impls) if impls else None
    unwanted = set(skip_impls)
    rows: List[Row] = []
    notes: List[Skip] = []
    dtype = dtype_name(case.dtype)
    for name, setup in case.impls:
        if (wanted is not None and name not in wanted) or name in unwanted:
            continue
        where = f"{case.op} {name} [{case.shape}, {dtype}]"
        if deadline is not None and time.monotonic() > deadline:
            notes.append(Skip(case.op, name, case.shape, dtype, "time budget spent"))
            log(f"skip  {where}: time budget spent")
            continue
        timed = None
        try:
            timed = setup()
            ms, peak = measure(timed, device, cfg)
        except Exception as error:  # an impl that cannot run here is skipped, never fatal
            notes.append(Skip(case.op, name, case.shape, dtype, _reason(error)))
            log(f"skip  {where}: {_reason(error)}")
            continue
        finally:
            timed = None
            free_memory(device)
        positive = ms > 0
        row = Row(op=case.op, impl=name, shape=case.shape, dtype=dtype, ms=sig(ms),
                  tflops=sig(case.flops / (ms * 1e-3) / 1e12) if case.flops and positive else None,
                  gbps=sig(case.nbytes / (ms * 1e-3) / 1e9) if case.nbytes and positive else None,
                  peak_mem_mb=sig(peak) if peak is not None else None)
        rows.append(row)
        rate = (f"{row.tflops:g} TFLOP/s" if row.tflops is not None else
                f"{row.gbps:g} GB/s" if row.gbps is not None else "")
        mem = f"  peak {row.peak_mem_mb:g} MiB" if row.peak_mem_mb is not None else ""
        log(f"{case.op:<26} {name:<15} {case.shape:<44} {dtype:<5} {row.ms:>10g} ms  {rate}{mem}")
    return rows, notes


# ---------------------------------------------------------------------------------------- results

def git_commit() -> str:
    """HEAD's sha (``BENCH_COMMIT`` overrides it, for a tree copied without .git), else "unknown"."""
    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{7,64}", sha) else "unknown"


def environment(device: torch.device) -> Dict[str, Any]:
    """The run's metadata: every key of the results schema but ``rows``."""
    try:
        import triton
        triton_version: Optional[str] = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device.type == "cuda"
    return {
        "device": "cuda" if on_gpu else "cpu",
        "gpu_name": torch.cuda.get_device_name(device) if on_gpu else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
    }


def device_slug(meta: Dict[str, Any]) -> str:
    if meta["device"] != "cuda":
        return "cpu"
    match = re.search(r"\b([A-Z]{1,2}\d{2,4}[A-Z]?)\b", meta.get("gpu_name") or "")
    return match.group(1).lower() if match else "cuda"


def results_stem(meta: Dict[str, Any], quick: bool) -> str:
    sha = meta["commit"][:7] if meta["commit"] != "unknown" else "unknown"
    return f"{device_slug(meta)}-{meta['date']}-{sha}" + ("-quick" if quick else "")


def op_rank(op: str) -> int:
    return OP_ORDER.index(op) if op in OP_ORDER else len(OP_ORDER)


def sorted_rows(rows: Sequence[Row]) -> List[Row]:
    """Rows by op (canonical order), then shape (first-measured order), then ms."""
    shape_order: Dict[Tuple[str, str], int] = {}
    for row in rows:
        shape_order.setdefault((row.op, row.shape, row.dtype), len(shape_order))
    return sorted(rows, key=lambda r: (op_rank(r.op), shape_order[(r.op, r.shape, r.dtype)], r.ms))


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:g}"


def render_markdown(meta: Dict[str, Any], rows: Sequence[Row], notes: Sequence[str] = ()) -> str:
    """A header, the notes (methods, skipped impls), and the table last. ``vs best baseline`` is the
    fastest baseline's time over this impl's time, for our impls (>1: ours is faster)."""
    rows = sorted_rows(rows)
    best: Dict[Tuple[str, str, str], float] = {}
    for row in rows:
        if row.impl not in OUR_IMPLS and row.ms > 0:
            key = (row.op, row.shape, row.dtype)
            best[key] = min(best.get(key, math.inf), row.ms)
    where = meta["gpu_name"] or "CPU"
    lines = [f"# llm2vec-fast benchmarks: {where}", "",
             f"device {meta['device']}, torch {meta['torch']}, triton {meta['triton']}, cuda {meta['cuda']}, "
             f"commit {meta['commit']}, {meta['date']}. Ours: {', '.join(OUR_IMPLS)}; every other impl is a "
             f"baseline measured in the same run.", ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {note}" for note in notes] + [""]
    lines += ["## Results", "",
              "| op | shape | dtype | impl | ms | TFLOP/s | GB/s | peak MiB | vs best baseline |",
              "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        baseline = best.get((row.op, row.shape, row.dtype))
        ratio = f"{baseline / row.ms:.2f}x" if row.impl in OUR_IMPLS and baseline and row.ms > 0 else ""
        lines.append(f"| {row.op} | {row.shape} | {row.dtype} | {row.impl} | {_fmt(row.ms)} | {_fmt(row.tflops)} | "
                     f"{_fmt(row.gbps)} | {_fmt(row.peak_mem_mb)} | {ratio} |")
    return "\n".join(lines) + "\n"


def _short_labels(shapes: Sequence[str]) -> Tuple[List[str], str]:
    """Labels without the key=value parts common to every shape, and those common parts."""
    parts = [s.split(",") for s in shapes]
    common = [p for p in parts[0] if all(p in other for other in parts[1:])] if len(parts) > 1 else []
    labels = [",".join(p for p in ps if p not in common) or shape for ps, shape in zip(parts, shapes)]
    return labels, ",".join(common)


def plot_rows(meta: Dict[str, Any], rows: Sequence[Row], path: str) -> bool:
    """One bar chart per op (TFLOP/s, else GB/s, else ms), bars grouped by shape. False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG plot")
        return False
    rows = sorted_rows(rows)
    ops = sorted({r.op for r in rows}, key=lambda op: (op_rank(op), op))
    seen = {row.impl for row in rows}
    impl_names = [name for name in IMPL_ORDER if name in seen] + sorted(seen - set(IMPL_ORDER))
    extra = plt.get_cmap("tab20").colors[1::2]  # light shades for impls not in IMPL_COLORS
    colors = {name: IMPL_COLORS.get(name, extra[i % len(extra)]) for i, name in enumerate(impl_names)}
    groups_max = max((len({(r.shape, r.dtype) for r in rows if r.op == op}) for op in ops), default=1)
    width = min(24.0, max(10.0, 2.0 + 1.1 * groups_max * max(1, len(impl_names)) ** 0.5))
    fig, axes = plt.subplots(max(1, len(ops)), 1, figsize=(width, 3.4 * max(1, len(ops))), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        op_rows = [r for r in rows if r.op == op]
        if all(r.tflops is not None for r in op_rows):
            metric, unit = "tflops", "TFLOP/s (higher is better)"
        elif all(r.gbps is not None for r in op_rows):
            metric, unit = "gbps", "GB/s (higher is better)"
        else:
            metric, unit = "ms", "ms (lower is better)"
        keys: List[Tuple[str, str]] = []
        for r in op_rows:
            if (r.shape, r.dtype) not in keys:
                keys.append((r.shape, r.dtype))
        present = [name for name in impl_names if any(r.impl == name for r in op_rows)]
        labels, common = _short_labels([s for s, _ in keys])
        if len({d for _, d in keys}) > 1:
            labels = [f"{label}\n{d}" for label, (_, d) in zip(labels, keys)]
        bar = 0.8 / max(1, len(present))
        for j, name in enumerate(present):
            xs, ys = [], []
            for i, key in enumerate(keys):
                match = [r for r in op_rows if r.impl == name and (r.shape, r.dtype) == key]
                if match:
                    xs.append(i - 0.4 + bar * (j + 0.5))
                    ys.append(getattr(match[0], metric))
            label = f"{name} (ours)" if name in OUR_IMPLS else name
            ax.bar(xs, ys, bar, label=label, color=colors[name], hatch="//" if name in OUR_IMPLS else None,
                   edgecolor="black", linewidth=0.4)
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([label.replace(",", "\n") if len(label) > 28 else label for label in labels], fontsize=8)
        dtypes = sorted({d for _, d in keys})
        ax.set_title(f"{op}  [{common}{', ' if common else ''}{'/'.join(dtypes)}]", fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(f"llm2vec-fast: {meta['gpu_name'] or 'CPU'}, torch {meta['torch']}, {meta['commit'][:7]}, "
                 f"{meta['date']}", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def results_dict(meta: Dict[str, Any], rows: Sequence[Row]) -> Dict[str, Any]:
    result = {key: meta[key] for key in META_FIELDS if key != "rows"}
    result["rows"] = [row.to_dict() for row in sorted_rows(rows)]
    return result


def write_results(meta: Dict[str, Any], rows: Sequence[Row], out_dir: str, *, quick: bool = False,
                  notes: Sequence[str] = (), plot: bool = True) -> Dict[str, str]:
    """Writes <stem>.json, <stem>.md and (``plot`` and matplotlib) <stem>.png; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, results_stem(meta, quick))
    paths = {"json": stem + ".json", "md": stem + ".md"}
    with open(paths["json"], "w") as f:
        json.dump(results_dict(meta, rows), f, indent=1)
        f.write("\n")
    with open(paths["md"], "w") as f:
        f.write(render_markdown(meta, rows, notes))
    if plot and rows and plot_rows(meta, rows, stem + ".png"):
        paths["png"] = stem + ".png"
    return paths


def speed_notes(rows: Sequence[Row], op: str, rates: Sequence[Tuple[str, str, str]], ours: str, baseline: str,
                goal: str) -> List[str]:
    """The end-to-end benchmarks' summary: one note per impl with its rates, then our speed-up over ``baseline``.

    ``rates`` are (shape key, unit, format): the count ``key=N`` read from the row's shape, per second, e.g.
    ("tokens", "tokens/s", ",.0f") gives "12,345 tokens/s".
    """
    notes = []
    by_impl = {row.impl: row for row in rows if row.op == op}
    for row in by_impl.values():
        seconds = row.ms / 1e3
        parts = [f"{int(row.shape.split(key + '=')[1].split(',')[0]) / seconds:{fmt}} {unit}" for key, unit, fmt in rates]
        notes.append(f"{op} {row.impl}: {', '.join(parts)}")
    if ours in by_impl and baseline in by_impl:
        notes.append(f"{op}: {ours} is {by_impl[baseline].ms / by_impl[ours].ms:.2f}x {baseline} (goal: >= {goal})")
    return notes


def standalone_main(argv, *, description: str, cases, method_notes: List[str], run_notes: List[str], summary,
                    results_subdir: str) -> int:
    """The command line of a benchmark module run on its own (``python -m benchmarks.bench_model``):
    its cases on one device, its notes printed, results written under $OUT or benchmarks/results/<subdir>.
    ``cases(quick, device)`` yields Cases; ``summary(rows)`` returns extra note lines; ``run_notes`` is
    the module's list of notes collected while running (cleared first)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="tiny float32 model, CPU-friendly, same code paths")
    parser.add_argument("--out", default=None, help=f"output folder (default: $OUT, else benchmarks/results/"
                                                    f"{results_subdir})")
    parser.add_argument("--device", default="auto", help="auto (cuda if visible), cpu or cuda")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cpu":  # as benchmarks/run.py: CPU numbers are a smoke test, one thread is steadier
        torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", 1)))
    rows: List[Row] = []
    skips = []
    run_notes.clear()
    for case in cases(args.quick, device):
        case_rows, case_skips = run_case(case, device)
        rows.extend(case_rows)
        skips.extend(case_skips)
    notes = method_notes + run_notes + summary(rows) + skip_notes(skips)
    for note in notes[len(method_notes):]:
        print(note)
    out = args.out or os.environ.get("OUT") or os.path.join(REPO_ROOT, "benchmarks", "results", results_subdir)
    paths = write_results(environment(device), rows, out, quick=args.quick, notes=notes)
    for kind, path in paths.items():
        print(f"wrote {kind}: {path}")
    return 0 if rows else 1
