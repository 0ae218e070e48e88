"""Input checks shared by the public ops.

Every failure raises ValueError or TypeError naming the argument, what was expected and what was
received. Checks that read tensor values (cu_seqlens contents) are skipped while torch.compile traces,
where they would break the graph; eager calls always run them.
"""
from __future__ import annotations

import weakref
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 80, 96, 128, 256)


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(name: str, x, *, ndim: Optional[Sequence[int]] = None, dtypes=FLOAT_DTYPES) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() not in ndim:
        want = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[_dtype_name(d) for d in dtypes]}, got {_dtype_name(x.dtype)}")


def check_same_device(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} must be on the same device as {first_name} ({first.device}), got {t.device}")


def check_same_dtype(**tensors) -> None:
    items = [(n, t) for n, t in tensors.items() if t is not None]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.dtype != first.dtype:
            raise TypeError(f"{name} must have the same dtype as {first_name} ({_dtype_name(first.dtype)}), "
                            f"got {_dtype_name(t.dtype)}")


def check_number(name: str, value, *, low=None, high=None, low_inclusive=True, high_inclusive=True,
                 integer=False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got nan")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# id(cu_seqlens) -> (version, total, longest, values): a model calls attention once per layer with the
# same cu_seqlens, and reading its values costs a host sync each time, so a checked tensor is remembered
# (with its values, see :func:`cu_seqlens_values`) until it is modified in place (its version changes) or
# freed. :func:`register_cu_seqlens` fills it from values known on the host, so that a batch prepared on
# the host is never read back from the device.
_CHECKED_CU_SEQLENS = {}


def _version(cu_seqlens: torch.Tensor):
    # Inference tensors have no version counter (and cannot be modified outside inference mode).
    return None if cu_seqlens.is_inference() else cu_seqlens._version


def _remember(cu_seqlens: torch.Tensor, version, total: int, longest: int, values) -> None:
    key = id(cu_seqlens)
    if key not in _CHECKED_CU_SEQLENS:
        weakref.finalize(cu_seqlens, _CHECKED_CU_SEQLENS.pop, key, None)
    _CHECKED_CU_SEQLENS[key] = (version, total, longest, tuple(values))


def _cached(cu_seqlens: torch.Tensor):
    cached = _CHECKED_CU_SEQLENS.get(id(cu_seqlens))
    if cached is not None and cached[0] == _version(cu_seqlens):
        return cached
    return None


def register_cu_seqlens(cu_seqlens: torch.Tensor, values: Sequence[int]) -> bool:
    """Records that ``cu_seqlens`` holds ``values`` (known on the host, e.g. the CPU tensor it was copied
    from), so that :func:`check_cu_seqlens` and :func:`cu_seqlens_values` need not read it back from its
    device (a host sync). Only valid values (from 0, non-decreasing, at least 2 entries) are recorded;
    anything else is left to the check, which then reads the tensor and raises. Returns whether recorded.
    The caller guarantees that the tensor holds these values (it must not be modified by other means than
    in-place ops, which change its version and so drop the record)."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        return False
    values = [int(v) for v in values]
    if len(values) < 2 or len(values) != cu_seqlens.numel() or values[0] != 0:
        return False
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    if min(steps) < 0:
        return False
    _remember(cu_seqlens, _version(cu_seqlens), values[-1], max(steps), values)
    return True


def cu_seqlens_values(cu_seqlens: torch.Tensor) -> list:
    """``cu_seqlens.tolist()``, from the record of a checked or registered tensor when there is one (no
    host sync), else read from the tensor."""
    cached = _cached(cu_seqlens) if not _tracing() else None
    if cached is not None:
        return list(cached[3])
    return cu_seqlens.tolist()


def check_cu_seqlens(cu_seqlens, total: int, *, name: str = "cu_seqlens", like: torch.Tensor):
    """cu_seqlens: int32, 1-D with at least 2 entries, starts at 0, non-decreasing, ends at ``total``.

    Returns the longest sequence's length (None while torch.compile traces, where values are unknown).
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of dtype int32, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {_dtype_name(cu_seqlens.dtype)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{name} must be 1-D with B+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != like.device:
        raise ValueError(f"{name} must be on the same device as the inputs ({like.device}), got {cu_seqlens.device}")
    if _tracing():
        return None
    version = _version(cu_seqlens)
    cached = _cached(cu_seqlens)
    if cached is not None and cached[1] == total:
        return cached[2]
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{name} must start at 0, got {values[0]}")
    if values[-1] != total:
        raise ValueError(f"{name} must end at the total token count T={total}, got {values[-1]}")
    steps = [b - a for a, b in zip(values[:-1], values[1:])]
    if min(steps) < 0:
        i = steps.index(min(steps))
        raise ValueError(f"{name} must be non-decreasing, got {name}[{i}]={values[i]} > {name}[{i + 1}]={values[i + 1]}")
    _remember(cu_seqlens, version, total, max(steps), values)
    return max(steps)


def check_mask(name: str, mask, shape, like: torch.Tensor) -> None:
    """A 0/1 mask: bool or integer dtype (or float holding 0/1), of the given shape, on like's device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.device != like.device:
        raise ValueError(f"{name} must be on the same device as hidden ({like.device}), got {mask.device}")
    if mask.dtype.is_complex:
        raise TypeError(f"{name} must be bool or integer (0/1), got {_dtype_name(mask.dtype)}")
    if _tracing() or mask.dtype == torch.bool:
        return
    bad = (mask != 0) & (mask != 1)
    if mask.numel() and bool(bad.any()):
        index = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name} must contain only 0 and 1, got {mask[index].item()!r} at index {index}")
