#!/usr/bin/env python3
"""Runs the benchmark suite and writes <out>/<device>-<date>-<shortsha>[-quick].{json,md,png}.

    python benchmarks/run.py [--quick] [--ops attention,pool,fused,loss] [--out DIR] [--device auto|cpu|cuda]
                             [--impls NAME,...] [--skip-impls NAME,...] [--time-budget SECONDS] [--no-plot]
                             [--first OP,...]
    python -m benchmarks.run ...            (the same)

``--quick``: tiny sizes on whatever device (CPU here), through the same code paths as the full H100
sizes. ``--out`` defaults to ``$OUT`` if set, else ``benchmarks/results/``. Ops run cheapest first
(pool, loss, attention) so that a ``--time-budget`` cut (or SIGTERM from ``timeout``) loses the least, after
those named by ``--first`` (the device check puts the headline goals, encode and train, there);
results are rewritten after every op, and on SIGTERM/Ctrl-C the partial results are written before
exiting with status 2. The markdown summary table is printed last. On the CPU torch runs one thread
(``BENCH_CPU_THREADS`` overrides): CPU numbers are a smoke test, and one thread stays steady on a busy box.
"""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make the repo root (benchmarks, llm2vec_fast) importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks import harness  # noqa: E402

SUITES = {"attention": "benchmarks.bench_attention", "pool": "benchmarks.bench_pool", "fused": "benchmarks.bench_fused",
          "loss": "benchmarks.bench_loss",
          "model": "benchmarks.bench_model", "encode": "benchmarks.bench_encode", "train": "benchmarks.bench_train"}
EXECUTION_ORDER = ("pool", "fused", "loss", "model", "encode", "attention", "train")
DEFAULT_OUT = os.path.join(harness.REPO_ROOT, "benchmarks", "results")


def execution_order(ops: Sequence[str], first: Sequence[str] = ()) -> List[str]:
    """The order the chosen ops run in: ``first`` (those of them chosen, as given), then the rest cheapest first."""
    lead = [op for op in first if op in ops]
    return lead + [op for op in EXECUTION_ORDER if op in ops and op not in lead]


def resolve_device(device: Optional[str]) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is visible")
    return resolved


def run_suite(*, quick: bool = False, ops: Sequence[str] = tuple(SUITES), out: Optional[str] = None,
              device: Optional[str] = None, impls: Optional[Sequence[str]] = None,
              skip_impls: Sequence[str] = (), time_budget: Optional[float] = None, plot: bool = True,
              first: Sequence[str] = (), log: Callable[[str], None] = print) -> Dict[str, Any]:
    """Runs the chosen ops (``first`` ahead of the rest, see :func:`execution_order`) and writes the results.
    Returns {"paths", "results", "markdown", "interrupted"}."""
    unknown = [op for op in list(ops) + list(first) if op not in SUITES]
    if unknown:
        raise ValueError(f"unknown ops {unknown}; choose from {list(SUITES)}")
    out = out or os.environ.get("OUT") or DEFAULT_OUT
    dev = resolve_device(device)
    meta = harness.environment(dev)
    deadline = time.monotonic() + time_budget if time_budget else None
    log(f"benchmarks: {'quick' if quick else 'full'} sizes on {meta['gpu_name'] or 'cpu'}, ops "
        f"{','.join(execution_order(ops, first))}, torch {meta['torch']}, triton {meta['triton']}, "
        f"commit {meta['commit'][:12]}" + (f", time budget {time_budget:g} s" if time_budget else ""))
    rows: List[harness.Row] = []
    method_notes: List[str] = []
    skips: List[harness.Skip] = []
    other: List[str] = []
    modules = []
    interrupted = False

    def notes() -> List[str]:
        runtime = [n for m in modules for n in getattr(m, "NOTES", [])]
        return method_notes + runtime + other + harness.skip_notes(skips)

    threads = torch.get_num_threads()
    if dev.type == "cpu":  # CPU timings are only a smoke test; one thread is far steadier on a busy machine
        torch.set_num_threads(int(os.environ.get("BENCH_CPU_THREADS", 1)))
    try:
        for op in execution_order(ops, first):
            module = importlib.import_module(SUITES[op])
            getattr(module, "NOTES", []).clear()
            modules.append(module)
            method_notes.extend(module.METHOD_NOTES)
            for case in module.cases(quick, dev):
                if deadline is not None and time.monotonic() > deadline:
                    skips.append(harness.Skip(case.op, "all impls", case.shape, harness.dtype_name(case.dtype),
                                              "time budget spent"))
                    log(f"skip  {case.op} [{case.shape}]: time budget spent")
                    continue
                case_rows, case_notes = harness.run_case(case, dev, deadline=deadline, impls=impls,
                                                             skip_impls=skip_impls, log=log)
                rows.extend(case_rows)
                skips.extend(case_notes)
            case = None  # the last case's inputs (a whole model for bench_model) are freed before the next op
            harness.free_memory(dev)
            harness.write_results(meta, rows, out, quick=quick, notes=notes(), plot=False)  # partial, per op
    except KeyboardInterrupt:
        interrupted = True
        other.append("interrupted (SIGTERM or Ctrl-C): the results are partial")
        log(other[-1])
    finally:
        torch.set_num_threads(threads)
    paths = harness.write_results(meta, rows, out, quick=quick, notes=notes(), plot=plot)
    markdown = harness.render_markdown(meta, rows, notes())
    return {"paths": paths, "results": harness.results_dict(meta, rows), "markdown": markdown,
            "interrupted": interrupted}


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU-friendly), same code paths")
    parser.add_argument("--ops", default=",".join(SUITES), help="comma-separated subset of %(default)s")
    parser.add_argument("--out", default=None, help="output folder (default: $OUT, else benchmarks/results/)")
    parser.add_argument("--device", default="auto", help="auto (cuda if visible), cpu or cuda")
    parser.add_argument("--impls", default=None, help="only these impls, comma-separated (e.g. triton,sdpa_cudnn)")
    parser.add_argument("--skip-impls", default="", help="leave these impls out, comma-separated (e.g. flex,eager)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; impls that would start later are skipped (results still written)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--first", default="",
                        help="run these ops first, in this order (e.g. encode,train: the headline goals before a "
                             "--time-budget cut); the rest run cheapest first")
    args = parser.parse_args(argv)
    ops = [op.strip() for op in args.ops.split(",") if op.strip()]
    impls = [name.strip() for name in args.impls.split(",") if name.strip()] if args.impls else None
    skip_impls = [name.strip() for name in args.skip_impls.split(",") if name.strip()]
    signal.signal(signal.SIGTERM, _raise_interrupt)
    first = [op.strip() for op in args.first.split(",") if op.strip()]
    result = run_suite(quick=args.quick, ops=ops, out=args.out, device=args.device, impls=impls, skip_impls=skip_impls,
                       time_budget=args.time_budget, plot=not args.no_plot, first=first)
    print()
    for kind, path in result["paths"].items():
        print(f"wrote {kind}: {path}")
    print()
    print(result["markdown"], end="")
    if result["interrupted"]:
        return 2
    return 0 if result["results"]["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
