"""Input checks shared by the public ops.

Every failure raises ValueError or TypeError naming the argument, what was expected and what was
received. Checks that read tensor values (cu_seqlens contents) are skipped while torch.compile traces,
where they would break the graph; eager calls always run them.
"""
from __future__ import annotations

import numbers
import weakref
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 80, 96, 128, 256)
# The float32 range a float argument must fit, where the kernels compute with it in float32 (beyond it, it
# would round to 0 or to inf there).
FLOAT32_TINY = 2.0 ** -149
FLOAT32_MAX = torch.finfo(torch.float32).max
# The smallest normal float32: a divisor below it may be flushed to 0 on a GPU (ftz), or round to 0 on the way.
FLOAT32_NORMAL_MIN = torch.finfo(torch.float32).tiny


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_dense(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got a {'nested' if x.is_nested else x.layout} one")


def check_tensor(name: str, x, *, ndim: Optional[Sequence[int]] = None, dtypes=FLOAT_DTYPES) -> None:
    _check_dense(name, x)
    if ndim is not None and x.dim() not in ndim:
        want = " or ".join(str(n) for n in ndim)
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[_dtype_name(d) for d in dtypes]}, got {_dtype_name(x.dtype)}")


def check_last_dim(name: str, x: torch.Tensor, dim_name: str) -> None:
    """x has a last dimension, of at least one element (the one the op works along)."""
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{name} must be (..., {dim_name} >= 1), got shape {tuple(x.shape)}")


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
    """A Python or numpy number (not a bool) within the bounds; a non-integer one must also fit a float."""
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):  # numpy's bool is no numbers.Real
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {type(value).__name__}")
    if not integer:
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"{name} must fit a float, got an int of {len(str(value))} digits") from None
    if value != value:  # NaN
        raise ValueError(f"{name} must be a number, got nan")
    if low is not None and (value < low or (value == low and not low_inclusive)):
        raise ValueError(f"{name} must be {'>=' if low_inclusive else '>'} {low}, got {value}")
    if high is not None and (value > high or (value == high and not high_inclusive)):
        raise ValueError(f"{name} must be {'<=' if high_inclusive else '<'} {high}, got {value}")


def _reach_bytes(x: torch.Tensor) -> int:
    """Bytes from x's first element to the end of its last (strides are never negative in torch)."""
    return (sum((size - 1) * stride for size, stride in zip(x.shape, x.stride())) + 1) * x.element_size()


def _may_share_elements(a: torch.Tensor, b: torch.Tensor) -> bool:
    """False only where a and b provably hold no common element: another storage, byte spans apart, or rows at
    the same stride whose footprints sit apart within it (the q/k/v or gate/up slices of one fused projection)."""
    if a.numel() == 0 or b.numel() == 0 or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a_start, b_start = a.data_ptr(), b.data_ptr()
    if a_start + _reach_bytes(a) <= b_start or b_start + _reach_bytes(b) <= a_start:
        return False
    if a.dim() >= 2 and b.dim() >= 2 and a.stride(0) == b.stride(0) and a.element_size() == b.element_size():
        row_bytes = a.stride(0) * a.element_size()
        a_row, b_row = _reach_bytes(a[0]), _reach_bytes(b[0])
        if a_row <= row_bytes and b_row <= row_bytes:
            gap = (b_start - a_start) % row_bytes  # where b's row footprint starts within a's row period
            return not (gap >= a_row and gap + b_row <= row_bytes)
    return True


def check_writable(written: dict, read: Optional[dict] = None, *, same_ok: bool = False) -> None:
    """For ``inplace=True``: each written tensor must be writable in place (no two of its elements in one memory
    location; an inference tensor only inside ``torch.inference_mode``) and share no element with another
    written or read tensor, so that no backend reads what it has already overwritten. ``same_ok``: a read tensor
    may be the written one itself (the very same elements: an elementwise op reads each before writing it)."""
    if _tracing():
        return
    read = read or {}
    names = list(written)
    for index, name in enumerate(names):
        x = written[name]
        if torch._debug_has_internal_overlap(x) == 1:
            raise ValueError(f"inplace=True needs a {name} whose elements each have their own memory (it is written "
                             f"in place), got shape {tuple(x.shape)} and strides {x.stride()} (expanded?)")
        if x.is_inference() and not torch.is_inference_mode_enabled():
            raise ValueError(f"inplace=True: {name} is an inference tensor, which can be written only inside "
                             f"torch.inference_mode() (or pass inplace=False)")
        others = [(n, written[n], False) for n in names[index + 1:]] + [(n, t, same_ok) for n, t in read.items()]
        for other_name, other, may_be_same in others:
            same = (other.data_ptr() == x.data_ptr() and other.shape == x.shape and other.stride() == x.stride())
            if (same and not may_be_same) or (not same and _may_share_elements(x, other)):
                raise ValueError(f"inplace=True needs {name} and {other_name} to share no memory (the op writes "
                                 f"{name} in place), got views of one storage that may overlap; pass inplace=False")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# id(cu_seqlens) -> (version, total, longest, values): a model calls attention once per layer
# with the same cu_seqlens, and reading a device tensor's values costs a host sync each time, so a checked
# tensor on a GPU is remembered (with its values, see :func:`cu_seqlens_values`) until it is modified in place
# (its version changes) or freed. :func:`register_cu_seqlens` fills it from values known on the host, so that
# a batch prepared on the host is never read back from the device. The values of a tensor checked by reading
# it are kept only on a GPU and for a tensor with a version counter: a CPU tensor is read again at every call
# (no sync there, and a refill through numpy leaves its version as it was), and so is an inference tensor
# (no version counter, and it may be refilled in place inside ``inference_mode``).
_CHECKED_CU_SEQLENS = {}


def _version(cu_seqlens: torch.Tensor):
    return None if cu_seqlens.is_inference() else cu_seqlens._version


def _remember(cu_seqlens: torch.Tensor, version, total: int, longest: int, values, registered: bool) -> None:
    if not registered and (cu_seqlens.device.type == "cpu" or cu_seqlens.is_inference()):
        return
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
    _remember(cu_seqlens, _version(cu_seqlens), values[-1], max(steps), values, registered=True)
    return True


def dense_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """cu_seqlens as the kernels read it (one int32 after another): itself, or a checked strided one's copy,
    registered with its values."""
    if cu_seqlens.is_contiguous():
        return cu_seqlens
    copy = cu_seqlens.contiguous()
    if not _tracing():
        register_cu_seqlens(copy, cu_seqlens_values(cu_seqlens))
    return copy


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
    _check_dense(name, cu_seqlens)
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
    _remember(cu_seqlens, version, total, max(steps), values, registered=False)
    return max(steps)


def check_mask(name: str, mask, shape, like: torch.Tensor) -> None:
    """A 0/1 mask: bool or integer dtype (or float holding 0/1), of the given shape, on like's device."""
    _check_dense(name, mask)
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
