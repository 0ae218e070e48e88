"""Regenerates ``llm2vec_fast.dispatch.AUTO_TABLE`` from measured GPU results.

    python benchmarks/make_auto_table.py [RESULTS_DIR] [--dispatch PATH] [--check]

Reads every ``*.json`` results file (DESIGN.md's schema) under RESULTS_DIR (default
benchmarks/results) whose device is "cuda", and for each op compares our accelerated backends on the
cases where both were measured in the same run: the geometric mean of their time ratio decides. An op
with one measured backend gets that one; an op with none stays out of the table ("auto" then means
triton). The table literal in llm2vec_fast/dispatch.py is rewritten in place; ``--check`` only prints
the table and exits 1 if the file is out of date.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable

REPO = Path(__file__).resolve().parents[1]
# Benchmark row op -> public op. attention_bwd is left out: the cuda backend's attention backward is the Triton
# kernel, so its rows would time the same code twice and only add noise to the choice.
PUBLIC_OP = {"attention_fwd": "flash_attention", "pool": "pool",
             "contrastive_loss_fwd": "contrastive_loss", "contrastive_loss_fwd_bwd": "contrastive_loss",
             "rms_norm": "rms_norm", "rms_norm_fwd_bwd": "rms_norm", "gated_activation": "gated_activation",
             "gated_activation_fwd_bwd": "gated_activation", "rotary_embedding": "rotary_embedding",
             "rotary_embedding_fwd_bwd": "rotary_embedding"}
CANDIDATES = ("triton", "cuda")
TABLE_PATTERN = re.compile(r"^AUTO_TABLE: Dict\[str, str\] = \{.*?\}$", re.MULTILINE | re.DOTALL)


def measured_table(result_files: Iterable[Path]) -> Dict[str, str]:
    # (public op) -> list of log(ms_cuda / ms_triton) over cases measured for both in one run
    log_ratios = defaultdict(list)
    seen = defaultdict(set)
    for path in result_files:
        data = json.loads(path.read_text())
        if data.get("device") != "cuda":
            continue
        times = defaultdict(dict)  # (op, shape, dtype) -> impl -> ms
        for row in data.get("rows", []):
            op = PUBLIC_OP.get(row.get("op"))
            if op and row.get("impl") in CANDIDATES and (row.get("ms") or 0) > 0:  # a differential ms can be <= 0
                times[(op, row["shape"], row["dtype"], row["op"])][row["impl"]] = float(row["ms"])
                seen[op].add(row["impl"])
        for (op, *_), by_impl in times.items():
            if len(by_impl) == len(CANDIDATES):
                log_ratios[op].append(math.log(by_impl["cuda"] / by_impl["triton"]))
    table = {}
    for op in sorted(seen):
        if log_ratios[op]:
            table[op] = "cuda" if sum(log_ratios[op]) / len(log_ratios[op]) < 0 else "triton"
        elif len(seen[op]) == 1:
            table[op] = next(iter(seen[op]))
    return table


def render(table: Dict[str, str]) -> str:
    body = ", ".join(f'"{op}": "{backend}"' for op, backend in sorted(table.items()))
    return f"AUTO_TABLE: Dict[str, str] = {{{body}}}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="?", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--dispatch", default=str(REPO / "llm2vec_fast" / "dispatch.py"))
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    table = measured_table(sorted(Path(args.results).glob("*.json")))
    line = render(table)
    print(line)
    dispatch = Path(args.dispatch)
    source = dispatch.read_text()
    if not TABLE_PATTERN.search(source):
        print(f"make_auto_table: no AUTO_TABLE literal found in {dispatch}", file=sys.stderr)
        return 2
    updated = TABLE_PATTERN.sub(line, source, count=1)
    if args.check:
        return 0 if updated == source else 1
    dispatch.write_text(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
