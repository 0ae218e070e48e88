"""``llm2vec-fast check``: is this installation right, on this machine?

Made for an installed wheel on a GPU server, where the repository's tests are not at hand. It prints
the versions that matter (the package, torch, triton, CUDA, the GPU, and what the CUDA extension was
built against), then runs every public op with every backend that can run on the device, forward and
backward, on fresh random inputs (odd varlen lengths, GQA, softcap, sliding windows, all pooling modes, hard
negatives, both RMSNorm casting modes, SwiGLU and GeGLU, LoRA linears with float32 and bf16 adapters), and
compares each with a float64 evaluation of the same formulas. The bound is flash-attention's: a backend may err
at most 2x (forward) or 3x (gradients) as much as PyTorch's own evaluation in the same dtype, plus a small floor
for results that PyTorch happens to get exactly. Exit status 0 when every check passes, 1 otherwise, 2 for
options that are wrong or that this machine cannot honour (an unknown or absent device, a backend that cannot run).

    llm2vec-fast check [--device cuda] [--backend triton] [--quick]
"""
from __future__ import annotations

import argparse
import importlib.util
import platform
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

FORWARD_FACTOR, BACKWARD_FACTOR = 2.0, 3.0
# Floor of the bound, relative to the largest reference value, per dtype: below this, PyTorch's error
# is luck (an exact result), not a measure of the dtype's rounding.
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@dataclass
class Result:
    op: str
    backend: str
    case: str
    output: str
    error: float
    bound: float

    @property
    def ok(self) -> bool:
        return self.error <= self.bound


# ------------------------------------------------------------------------------------------- environment

def environment(device: torch.device) -> List[Tuple[str, str]]:
    """(name, value) lines describing the installation."""
    import llm2vec_fast
    from . import cuda_backend, dispatch
    lines = [("llm2vec-fast", llm2vec_fast.__version__), ("python", platform.python_version()),
             ("torch", f"{torch.__version__} (CUDA {torch.version.cuda})")]
    try:
        import triton
        lines.append(("triton", triton.__version__))
    except ImportError:
        lines.append(("triton", "not installed"))
    try:
        import transformers
        lines.append(("transformers", transformers.__version__))
    except ImportError:
        lines.append(("transformers", "not installed"))
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        lines.append(("gpu", f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"))
    else:
        lines.append(("device", str(device)))
    try:
        extension = cuda_backend.extension()
        info = getattr(extension, "build_info", None)
        lines.append(("cuda extension", f"{extension.__file__}" + (f" (built with {info})" if info else "")))
    except RuntimeError as error:
        lines.append(("cuda extension", f"not available: {error}"))
    for op in dispatch.OPS:
        lines.append((f"backends for {op}", ", ".join(dispatch.available_backends(op, device))))
    return lines


# --------------------------------------------------------------------------------------------- checking

def _max_error(got: Tensor, exact: Tensor) -> float:
    return float((got.double() - exact).abs().max()) if got.numel() else 0.0


def _compare(op: str, backend: str, case: str, names: Sequence[str], got: Sequence[Tensor],
             torch_same_dtype: Sequence[Tensor], exact: Sequence[Tensor], dtype: torch.dtype,
             factors: Sequence[float]) -> Iterator[Result]:
    for name, g, t, e, factor in zip(names, got, torch_same_dtype, exact, factors):
        scale = float(e.abs().max()) if e.numel() else 0.0
        floor = FLOOR.get(dtype, 1e-6) * max(scale, 1e-30)
        yield Result(op, backend, case, name, _max_error(g, e), factor * max(_max_error(t, e), floor))


def _run(fn: Callable[..., Tensor], inputs: Sequence[Tensor], grad_out_seed: int, **kwargs):
    """fn's output and the gradients of <output, random weights> w.r.t. the inputs."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves, **kwargs)
    generator = torch.Generator(device="cpu").manual_seed(grad_out_seed)
    weight = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device, out.dtype)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in leaves]


def _check_op(op: str, backend: str, case: str, fn, exact_fn, inputs: Sequence[Tensor], names: Sequence[str],
              dtype: torch.dtype, **kwargs) -> Iterator[Result]:
    """Backend vs torch in the same dtype, both against ``exact_fn`` (the formula in float64, on the CPU)."""
    exact_inputs = [x.detach().cpu().double() for x in inputs]
    exact_out, exact_grads = _run(exact_fn, exact_inputs, 0)
    torch_out, torch_grads = _run(fn, inputs, 0, backend="torch", **kwargs)
    got_out, got_grads = _run(fn, inputs, 0, backend=backend, **kwargs)
    outputs = ["out"] + [f"grad {n}" for n in names]
    factors = [FORWARD_FACTOR] + [BACKWARD_FACTOR] * len(names)
    yield from _compare(op, backend, case, outputs, [got_out] + got_grads, [torch_out] + torch_grads,
                        [exact_out] + exact_grads, dtype, factors)


def _varlen(lengths: Sequence[int], device) -> Tuple[Tensor, int]:
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    return cu.to(device), max(lengths)


def attention_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.attention import flash_attention
    from .reference.attention import attention
    lengths = [1, 17, 113] if quick else [1, 17, 113, 130, 257]
    cu, longest = _varlen(lengths, device)
    total = int(cu[-1])
    shapes = [(4, 1, 64)] if quick else [(4, 1, 64), (8, 2, 128), (6, 6, 96)]
    for heads_q, heads_kv, dim in shapes:
        # softcap, and a sliding window shorter than the longer sequences (None: no window)
        for softcap, window in ((0.0, None), (30.0, None), (0.0, 40)):
            q, k, v = (torch.randn((total, h, dim), generator=generator).to(device, dtype)
                       for h in (heads_q, heads_kv, heads_kv))
            case = f"lengths={lengths},Hq={heads_q},Hkv={heads_kv},D={dim},softcap={softcap:g}"
            if window is not None:
                case += f",window={window}"

            def exact(q, k, v):  # the padded softmax formula, differentiated by autograd, all in float64
                return attention(q, k, v, cu.cpu(), longest, False, dim ** -0.5, softcap, 0.0, 0, window or 0,
                                 compute_dtype=torch.float64)[0]
            yield from _check_op("flash_attention", backend, case, flash_attention, exact, [q, k, v], ["q", "k", "v"],
                                 dtype, cu_seqlens=cu, max_seqlen=longest, softcap=softcap, sliding_window=window)


def _exact_pool(hidden, lengths, embed, mode, normalize):
    """Pooling by its definition, one sequence at a time."""
    rows, start = [], 0
    for n in lengths:
        tokens, chosen = hidden[start:start + n], embed[start:start + n]
        if mode in ("mean", "weighted_mean"):
            picked = tokens[chosen]
            weights = torch.ones(len(picked), dtype=hidden.dtype) if mode == "mean" else \
                torch.arange(1, len(picked) + 1, dtype=hidden.dtype)
            row = (weights[:, None] * picked).sum(0) / weights.sum() if len(picked) else \
                hidden.new_zeros(hidden.shape[1])
        elif n == 0:
            row = hidden.new_zeros(hidden.shape[1])
        else:
            row = tokens[-1] if mode == "last_token" else tokens[0]
        if normalize:
            row = row / row.norm().clamp_min(1e-12)
        rows.append(row)
        start += n
    return torch.stack(rows)


def pool_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.pooling import pool
    lengths = [1, 17, 113, 0, 40]
    cu, _ = _varlen(lengths, device)
    total, dim = int(cu[-1]), 200
    hidden = torch.randn((total, dim), generator=generator).to(device, dtype)
    embed = torch.rand(total, generator=generator) < 0.7
    modes = ["mean", "last_token"] if quick else ["mean", "weighted_mean", "last_token", "bos_token"]
    for mode in modes:
        for normalize in (False, True):
            case = f"lengths={lengths},D={dim},mode={mode},normalize={normalize}"
            uses_embed = mode in ("mean", "weighted_mean")

            def exact(hidden):
                return _exact_pool(hidden, lengths, embed if uses_embed else torch.ones_like(embed), mode, normalize)
            yield from _check_op("pool", backend, case, pool, exact, [hidden], ["hidden"], dtype, cu_seqlens=cu,
                                 embed_mask=embed.to(device) if uses_embed else None, mode=mode, normalize=normalize)


def _exact_infonce(q, d_pos, d_neg, scale: float, symmetric: bool):
    unit = torch.nn.functional.normalize
    labels = torch.arange(q.shape[0])
    loss = torch.nn.functional.cross_entropy(scale * unit(q) @ unit(torch.cat([d_pos, d_neg])).t(), labels)
    if symmetric:
        loss = 0.5 * (loss + torch.nn.functional.cross_entropy(scale * unit(d_pos) @ unit(q).t(), labels))
    return loss


def contrastive_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.contrastive import contrastive_loss
    batch, negatives, dim = (37, 20, 64) if quick else (131, 77, 384)
    q, d_pos, d_neg = (torch.randn((n, dim), generator=generator).to(device, dtype) for n in (batch, batch, negatives))
    for symmetric in (False, True):
        case = f"B={batch},negatives={negatives},D={dim},symmetric={symmetric}"

        def loss(q, d_pos, d_neg, **kwargs):
            return contrastive_loss(q, d_pos, d_neg, scale=20.0, symmetric=symmetric, gather=False, **kwargs)

        def exact(q, d_pos, d_neg):
            return _exact_infonce(q, d_pos, d_neg, 20.0, symmetric)
        yield from _check_op("contrastive_loss", backend, case, loss, exact, [q, d_pos, d_neg],
                             ["q", "d_pos", "d_neg"], dtype)


def rms_norm_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.normalization import rms_norm
    rows, dim = (37, 200) if quick else (113, 4096)
    x = (torch.randn((rows, dim), generator=generator) + 0.2).to(device, dtype)
    weight = (0.5 * torch.randn(dim, generator=generator)).to(device, dtype)
    for mode, offset in (("llama", 0.0), ("gemma", 1.0)):
        case = f"rows={rows},D={dim},casting_mode={mode}"

        def norm(x, weight, **kwargs):
            return rms_norm(x, weight, 1e-6, offset=offset, casting_mode=mode, **kwargs)

        def exact(x, weight):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (offset + weight)
        yield from _check_op("rms_norm", backend, case, norm, exact, [x, weight], ["x", "weight"], dtype)


def gated_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.gated import gated_activation
    from .reference.gated import GELU_TANH_CUBIC, GELU_TANH_SCALE
    rows, width = (37, 304) if quick else (113, 14336)  # whole 16-byte vectors: the kernels' main path
    gate, up = ((2 * torch.randn((rows, width), generator=generator)).to(device, dtype) for _ in range(2))
    for activation in ("silu", "gelu_tanh"):
        case = f"rows={rows},I={width},activation={activation}"

        def fused(gate, up, **kwargs):
            return gated_activation(gate, up, activation, **kwargs)

        def exact(gate, up):
            if activation == "silu":
                return gate * torch.sigmoid(gate) * up
            return 0.5 * gate * (1 + torch.tanh(GELU_TANH_SCALE * (gate + GELU_TANH_CUBIC * gate ** 3))) * up
        yield from _check_op("gated_activation", backend, case, fused, exact, [gate, up], ["gate", "up"], dtype)


def rotary_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.rotary import rotary_embedding
    tokens, heads_q, heads_kv = (37, 8, 2) if quick else (1013, 32, 8)
    for dim, width in ((128, 128), (96, 32)):  # full rotary, and Phi-3's partial one
        q, k = (torch.randn((tokens, heads, dim), generator=generator).to(device, dtype)
                for heads in (heads_q, heads_kv))
        phase = torch.rand((tokens, width // 2), generator=generator, dtype=torch.float64) * 1000
        phase = torch.cat((phase, phase), dim=-1)
        cos, sin = phase.cos().to(device, dtype), phase.sin().to(device, dtype)
        case = f"T={tokens},Hq={heads_q},Hkv={heads_kv},D={dim},R={width}"

        def rotate(q, k, **kwargs):
            return torch.cat([t.reshape(-1) for t in rotary_embedding(q, k, cos, sin, **kwargs)])

        def exact(q, k):  # each pair (x_j, x_{j+R/2}) turned by its angle, in float64
            c, s, half = cos.cpu().double()[:, None], sin.cpu().double()[:, None], width // 2

            def turn(x):
                first, second = x[..., :half], x[..., half:width]
                return torch.cat((first * c[..., :half] - second * s[..., :half],
                                  second * c[..., half:] + first * s[..., half:], x[..., width:]), dim=-1)
            return torch.cat((turn(q).reshape(-1), turn(k).reshape(-1)))
        yield from _check_op("rotary_embedding", backend, case, rotate, exact, [q, k], ["q", "k"], dtype)


def lora_checks(device, dtype, backend: str, quick: bool, generator) -> Iterator[Result]:
    from .ops.lora import lora_linear
    tokens, width_in, width_out = (37, 96, 130) if quick else (1013, 4096, 1536)  # a 7B layer's width in
    for rank, adapter in ((16, torch.float32), (64, dtype)):  # peft's autocast (float32), and the model's dtype
        x = torch.randn((tokens, width_in), generator=generator).to(device, dtype)
        weight, a = ((torch.randn(shape, generator=generator) * width_in ** -0.5).to(device, kind)
                     for shape, kind in (((width_out, width_in), dtype), ((rank, width_in), adapter)))
        bias = torch.randn(width_out, generator=generator).to(device, dtype)
        b = (0.5 * torch.randn((width_out, rank), generator=generator)).to(device, adapter)
        case = f"T={tokens},in={width_in},out={width_out},r={rank},adapter={str(adapter).replace('torch.', '')}"

        def layer(x, weight, bias, a, b, **kwargs):  # eval: dropout's masks are each backend's own
            return lora_linear(x, weight, a, b, 2.0, bias, **kwargs)

        def exact(x, weight, bias, a, b):
            return x @ weight.t() + bias + 2.0 * (x @ a.t()) @ b.t()
        yield from _check_op("lora_linear", backend, case, layer, exact, [x, weight, bias, a, b],
                             ["x", "weight", "bias", "lora_a", "lora_b"], dtype)


CHECKS: Dict[str, Callable] = {"flash_attention": attention_checks, "pool": pool_checks,
                               "contrastive_loss": contrastive_checks, "rms_norm": rms_norm_checks,
                               "gated_activation": gated_checks, "rotary_embedding": rotary_checks,
                               "lora_linear": lora_checks}


def run_checks(device: torch.device, backends: Optional[Sequence[str]] = None, dtypes: Optional[Sequence] = None,
               quick: bool = False, seed: int = 0, ops: Optional[Sequence[str]] = None) -> List[Result]:
    """Every op (or those in ``ops``) x backend (other than the torch reference, unless it is the only one) x
    dtype."""
    from . import dispatch
    if dtypes is None:
        dtypes = (torch.float16, torch.bfloat16) if device.type == "cuda" else (torch.float32,)
    unknown = sorted(set(ops or ()) - set(CHECKS))
    if unknown:
        raise ValueError(f"ops must be among {list(CHECKS)}, got {unknown}")
    results: List[Result] = []
    for op, check in CHECKS.items():
        if ops and op not in ops:
            continue
        available = dispatch.available_backends(op, device)
        chosen = [b for b in (backends or available) if b in available]
        if backends is None and len(chosen) > 1:
            chosen = [b for b in chosen if b != "torch"]
        for backend in chosen:
            for dtype in dtypes:
                generator = torch.Generator().manual_seed(seed)
                results.extend(check(device, dtype, backend, quick, generator))
    return results


def report(results: Sequence[Result], dtype_note: str = "") -> List[str]:
    lines = []
    width = max((len(r.case) for r in results), default=10)
    for r in results:
        verdict = "ok  " if r.ok else "FAIL"
        lines.append(f"{verdict} {r.op:<16} {r.backend:<10} {r.output:<12} {r.case:<{width}}  "
                     f"error {r.error:.3g} (bound {r.bound:.3g})")
    failed = sum(not r.ok for r in results)
    lines.append(f"{len(results) - failed} of {len(results)} checks passed{dtype_note}")
    return lines


# --------------------------------------------------------------------------------------------------- CLI

def _device_option(value: str) -> torch.device:
    """--device, checked while parsing: a wrong or unusable device is a usage error (exit 2, one line), not a
    failed check (exit 1) or a traceback."""
    choices = "cpu, cuda or cuda:0..cuda:{}".format(torch.cuda.device_count() - 1) if torch.cuda.is_available() \
        else "cpu (no CUDA device here)"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device; choose {choices}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: the check runs on cpu or cuda; choose {choices}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{value!r}: CUDA is not available here; choose cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{value!r}: only {torch.cuda.device_count()} CUDA devices are "
                                             f"visible; choose {choices}")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from . import dispatch
    parser.add_argument("--device", default=None, type=_device_option,
                        help="cpu, cuda or cuda:N; default: cuda when available, else cpu")
    parser.add_argument("--backend", action="append", default=None, choices=list(dispatch.BACKENDS),
                        help="check only this backend (repeatable); default: every accelerated backend")
    parser.add_argument("--op", action="append", default=None, choices=list(CHECKS),
                        help="check only this op (repeatable); default: every op")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--failures-only", action="store_true", help="print only failing checks")
    parser.set_defaults(check_parser=parser)  # run() reports options this device cannot honour through it
    return parser


def _usage_error(args: argparse.Namespace, message: str) -> None:
    """argparse's one line and exit status 2 when run from the command line; ValueError when called directly."""
    parser = getattr(args, "check_parser", None)
    if parser is None:
        raise ValueError(message)
    parser.error(message)


def run(args: argparse.Namespace) -> int:
    from . import dispatch
    device = args.device if args.device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):  # a Namespace built by hand
        try:
            device = _device_option(device)
        except argparse.ArgumentTypeError as error:
            _usage_error(args, f"argument --device: {error}")
    if args.backend:
        ops = args.op or list(CHECKS)
        here = sorted({b for op in ops for b in dispatch.available_backends(op, device)},
                      key=dispatch.BACKENDS.index)
        missing = [b for b in args.backend if b not in here]
        if missing:
            hint = " (Triton runs on the CPU only with TRITON_INTERPRET=1)" if "triton" in missing and \
                device.type == "cpu" and importlib.util.find_spec("triton") is not None else ""
            _usage_error(args, f"argument --backend: {', '.join(map(repr, missing))} cannot run "
                               f"{'any op' if not args.op else ', '.join(ops)} on {device}{hint}; choose from "
                               f"{', '.join(here)}")
    for name, value in environment(device):
        print(f"{name:>28}: {value}")
    print()
    results = run_checks(device, backends=args.backend, quick=args.quick, ops=args.op)
    if not results:
        print("no backend to check on this device")
        return 1
    lines = report(results)
    for line, result in zip(lines, results):
        if not (args.failures_only and result.ok):
            print(line)
    print(lines[-1])
    return 0 if all(r.ok for r in results) else 1
