"""First-contact diagnosis of the CUDA (Hopper) attention forward, for the GPU machine's device check.

The emulator (csrc/emulator) proves the kernel's logic, but one layout fact it cannot confirm: the order
of the two byte strides in V's MN-major SWIZZLE_128B wgmma descriptor (csrc/attention.cu, kMNMajorLBO /
kMNMajorSBO). This script runs the kernel with the built-in order and with the swapped one, on odd varlen
lengths with GQA, for head dims 64 and 128, and compares each with float64 attention (bound: 2x torch's
own error in the same dtype). It does so for both kernels, v1 and v2 (the warp-specialised one; it
shares the V descriptor constants), and prints one line per case and a verdict per kernel naming the
constants to keep (or, when only v2 fails with both orders, that v2's pipeline is at fault).

    python benchmarks/diagnose_cuda_attention.py [--small]

Exit status: 0 when the built-in layout passes every case of both kernels (or when there is no sm_90 GPU / no extension:
nothing to diagnose), 1 otherwise (device_check.sh then reruns ``--small`` under compute-sanitizer).
"""
from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

VARIANTS = {"v1": 1, "v2": 2}  # AttentionProblem::variant
BUILT_IN = (0, 0)             # the kernel's constants
SWAPPED = (1024, 128 * 128)   # LBO = 8-key group stride, SBO = panel stride


def cases(small: bool):
    lengths = (17, 130) if small else (1, 17, 113, 130, 257, 128, 600, 1100)  # 1100: wraps v2's stage ring
    for dim in (64, 128):
        yield lengths, 4, 2, dim, 0.0
    if not small:
        yield lengths, 8, 1, 128, 30.0


def run_case(ext, lengths, hq, hkv, dim, softcap, v_desc, variant=1, dtype=torch.bfloat16, seed=0):
    from llm2vec_fast.reference.attention import attention
    g = torch.Generator(device="cpu").manual_seed(seed)
    total = sum(lengths)
    q, k, v = ((torch.randn(total, h, dim, generator=g) * 1.5).to("cuda", dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    scale = dim ** -0.5
    out, lse = ext.attention_forward(q, k, v, cu, max(lengths), scale, softcap, *v_desc, variant)
    torch.cuda.synchronize()
    args = (cu, max(lengths), False, scale, softcap, 0.0, 0)
    exact, exact_lse = attention(q.double(), k.double(), v.double(), *args, compute_dtype=torch.float64)
    same_dtype, _ = attention(q, k, v, *args, compute_dtype=None)
    error = (out.double() - exact).abs()
    bound = 2 * (same_dtype.double() - exact).abs().max().item() + 1e-6
    by_panel = [error[..., p * 64:(p + 1) * 64].max().item() for p in range(dim // 64)]
    lse_error = (lse.double() - exact_lse.double()).abs().max().item()
    ok = torch.isfinite(out.float()).all().item() and error.max().item() <= bound and lse_error <= 1e-4
    return ok, error.max().item(), bound, by_panel, lse_error


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="two short cases per head dim (for compute-sanitizer)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("diagnose_cuda_attention: no CUDA GPU, nothing to diagnose")
        return 0
    if torch.cuda.get_device_capability() != (9, 0):
        print(f"diagnose_cuda_attention: {torch.cuda.get_device_name()} is not sm_90, nothing to diagnose")
        return 0
    try:
        from llm2vec_fast import cuda_backend
        ext = cuda_backend.extension()
    except RuntimeError as error:
        print(f"diagnose_cuda_attention: {error}")
        return 0
    print(f"diagnose_cuda_attention on {torch.cuda.get_device_name()}, extension {ext.build_info}")
    verdict = {}
    for kernel, variant in VARIANTS.items():
        for name, v_desc in (("built-in", BUILT_IN), ("swapped", SWAPPED)):
            passed = True
            for lengths, hq, hkv, dim, softcap in cases(args.small):
                where = f"{kernel} {name:<8} lengths={lengths} Hq={hq} Hkv={hkv} D={dim} softcap={softcap:g}"
                try:
                    ok, err, bound, panels, lse_err = run_case(ext, lengths, hq, hkv, dim, softcap, v_desc, variant)
                except RuntimeError as error:  # a launch or encoding failure: report it, try the rest
                    print(f"FAIL {where}: {str(error).splitlines()[0]}")
                    passed = False
                    continue
                panel_text = ", ".join(f"{e:.3g}" for e in panels)
                print(f"{'ok  ' if ok else 'FAIL'} {where}: error {err:.3g} (bound {bound:.3g}; per 64-column panel "
                      f"{panel_text}), lse error {lse_err:.3g}")
                passed &= ok
            verdict[kernel, name] = passed
    status = 0
    for kernel in VARIANTS:
        if verdict[kernel, "built-in"]:
            print(f"verdict {kernel}: the built-in V descriptor strides are right")
            continue
        status = 1
        if verdict[kernel, "swapped"]:
            print(f"verdict {kernel}: the SWAPPED order is right: in csrc/attention.cu set kMNMajorLBO = 1024 and "
                  "kMNMajorSBO = kPanelBytes, and swap the emulator's MN-major decoding to match")
        elif kernel == "v2" and verdict["v1", "built-in"]:
            print("verdict v2: fails with both orders while v1 passes: the fault is in v2's pipeline (stages, "
                  "empty barriers, setmaxnreg, wgmma overlap); keep the default variant at v1")
        else:
            print(f"verdict {kernel}: neither order passes: the fault is elsewhere (see the per-panel errors; run "
                  "the compute-sanitizer step's output)")
    return status

if __name__ == "__main__":
    sys.exit(main())
