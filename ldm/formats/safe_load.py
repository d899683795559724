"""Checkpoints are data, never code: validated safetensors and weights-only torch.load.

A ``.safetensors`` header is checked before any tensor is touched (length, JSON, dtypes, offsets
that tile the data buffer exactly), so a truncated or hostile file fails fast in bounded memory.
``.ckpt``/``.pt``/``.bin`` go only through ``torch.load(weights_only=True)``, whose restricted
unpickler refuses every global that is not a tensor or plain container *before* calling it; a file
that needs full unpickling is refused with a message saying how to convert it, never retried.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.errors import CheckpointError
from ldm.io import atomic_save

MAX_HEADER_BYTES = 100_000_000  # the same limit the safetensors library enforces
LFS_POINTER = b"version https://git-lfs.github.com/spec/"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")

# safetensors dtype name -> (bytes per element, torch dtype)
DTYPES: dict[str, tuple[int, torch.dtype]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "I16": (2, torch.int16),
    "U16": (2, torch.uint16),
    "I32": (4, torch.int32),
    "U32": (4, torch.uint32),
    "I64": (8, torch.int64),
    "U64": (8, torch.uint64),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "F32": (4, torch.float32),
    "F64": (8, torch.float64),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
}
_TORCH_TO_NAME = {dt: name for name, (_, dt) in DTYPES.items()}


def load_state_dict(
    path: str | os.PathLike, check_finite: bool = True, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Load a flat ``{name: tensor}`` dict from a safetensors file or a weights-only pickle.

    ``dtype``: floating tensors are cast to it as they are read (integer tensors never are).
    """
    path = Path(path)
    if not path.is_file():
        what = "is a directory, not a checkpoint file" if path.is_dir() else "does not exist"
        raise CheckpointError(f"{path}: {what}")
    _refuse_lfs_pointer(path)
    if path.suffix == ".safetensors":
        state_dict = _load_safetensors(path, dtype)
    elif path.suffix in TORCH_SUFFIXES:
        state_dict = _load_torch(path)
        if dtype is not None:
            state_dict = {k: v.to(dtype) if v.is_floating_point() else v
                          for k, v in state_dict.items()}  # fmt: skip
    else:
        raise CheckpointError(
            f"{path}: unknown checkpoint type {path.suffix!r} "
            f"(expected .safetensors or one of {', '.join(TORCH_SUFFIXES)})"
        )
    if check_finite:
        warn_non_finite(state_dict, path)
    return state_dict


def read_safetensors_header(path: str | os.PathLike) -> dict:
    """Parse and validate a safetensors header without reading tensor data (bounded memory)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, too short)")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            raise CheckpointError(f"{path}: safetensors header of {n} bytes exceeds the limit")
        if 8 + n > size:
            raise CheckpointError(
                f"{path}: safetensors header length {n} runs past the end of the file "
                f"({size} bytes; truncated or not a safetensors file)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        msg = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({msg})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    _check_layout(path, header, data_size=size - 8 - n)
    return header


def _no_duplicates(pairs: list) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_layout(path: Path, header: dict, data_size: int) -> None:
    """Offsets must tile [0, data_size) exactly: contiguous, non-overlapping, no trailing bytes."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
            continue
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
        ok_shape = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
        ok_offsets = (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(type(o) is int and o >= 0 for o in offsets)
        )
        if not ok_shape or not ok_offsets:
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed shape or offsets")
        begin, end = offsets
        if end - begin != math.prod(shape) * DTYPES[dtype][0]:
            raise CheckpointError(
                f"{path}: tensor {name!r} byte span {begin}..{end} does not match "
                f"shape {shape} of {dtype}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            kind = "overlaps the previous tensor" if begin < position else "leaves a gap"
            raise CheckpointError(f"{path}: tensor {name!r} at offset {begin} {kind}")
        position = end
    if position > data_size:
        raise CheckpointError(
            f"{path}: file is truncated (tensor data needs {position} bytes, has {data_size})"
        )
    if position < data_size:
        raise CheckpointError(f"{path}: {data_size - position} unexpected trailing bytes")


def _load_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Copy tensors out one at a time in file order, each cast to ``dtype`` on the way.

    Each tensor is read through its own short-lived memory map: the cast reads the page cache
    directly (no intermediate buffer to fill), and the process never holds more of the file
    than one tensor besides the result (mapped pages count towards its memory until unmapped).
    The header was validated first, so every offset and length below is known to be in bounds.
    """
    header = read_safetensors_header(path)
    entries = sorted(
        (info["data_offsets"][0], name, info)
        for name, info in header.items()
        if name != "__metadata__"
    )
    tensors = {}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        for _, name, info in entries:
            begin, end = info["data_offsets"]
            stored = DTYPES[info["dtype"]][1]
            t = _mapped(f, 8 + n + begin, end - begin, stored).reshape(info["shape"])
            cast = dtype if dtype is not None and t.is_floating_point() else stored
            tensors[name] = t.to(cast, copy=True)  # a copy: the map goes when t does
    return tensors


def _mapped(f, offset: int, length: int, dtype: torch.dtype) -> torch.Tensor:
    """A 1-D tensor viewing ``length`` bytes of ``f`` at ``offset`` through a private map."""
    if length == 0:
        return torch.empty(0, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY  # maps begin on a page boundary
    view = mmap.mmap(f.fileno(), offset - start + length, offset=start, access=mmap.ACCESS_COPY)
    return torch.frombuffer(
        view, dtype=dtype, offset=offset - start, count=length // dtype.itemsize
    )


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``; a refused global becomes a one-line CheckpointError."""
    is_zip = zipfile.is_zipfile(path)
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols is noise to users
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as e:
        text = str(e)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if "Weights only load failed" in text:
            culprit = f" (it references {found.group(1)})" if found else ""
            raise CheckpointError(
                f"{path}: refusing to load: this pickle needs full unpickling{culprit}, which can "
                "run arbitrary code; if you trust the file, re-save it as safetensors in a "
                "trusted environment (torch.load then safetensors.torch.save_file)"
            ) from None
        msg = text.splitlines()[0] if text else type(e).__name__
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]  # Lightning / CompVis checkpoints wrap the weights
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    state_dict = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not state_dict:
        raise CheckpointError(f"{path}: contains no tensors")
    return state_dict


def _refuse_lfs_pointer(path: Path) -> None:
    with open(path, "rb") as f:
        start = f.read(len(LFS_POINTER))
    if start == LFS_POINTER:
        raise CheckpointError(
            f"{path}: this is a git-lfs pointer, not the weights; run `git lfs pull` to fetch them"
        )


def warn_non_finite(state_dict: dict[str, torch.Tensor], path: str | os.PathLike = "") -> list:
    """Warn naming every floating tensor that holds NaN or Inf; return their names.

    A NaN or Inf anywhere makes a tensor's sum non-finite, and a sum is one vectorised pass where
    ``isfinite`` is not (~30x slower on the CPU); only a tensor whose sum is not finite (a real
    NaN/Inf, or a finite overflow) is checked element by element.
    """
    floats = [(name, t) for name, t in state_dict.items() if t.is_floating_point()]
    small = [t.reshape(-1).float() for _, t in floats if t.numel() <= 1 << 16]
    # one sum over all small tensors at once: per-tensor calls dominate for tiny models
    small_ok = not small or bool(torch.isfinite(torch.cat(small).sum()))
    bad = [
        name
        for name, t in floats
        if (t.numel() > 1 << 16 or not small_ok)
        and not bool(torch.isfinite(t.sum()))
        and not bool(torch.isfinite(t).all())
    ]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        warnings.warn(f"{path}: non-finite (NaN/Inf) values in {shown}", stacklevel=2)
    return bad


def save_state_dict(
    state_dict: dict[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: dict[str, str] | None = None,
) -> None:
    """Write a safetensors file atomically (temp + rename); shared storage is copied apart."""
    seen: set[tuple[int, int]] = set()
    tensors = {}
    for name, t in state_dict.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if t.numel() and key in seen:
            t = t.clone()  # safetensors refuses tensors that share memory (tied weights)
        seen.add(key)
        tensors[name] = t
    atomic_save(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_into(
    module: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str, assign: bool = False
) -> None:
    """``module.load_state_dict(strict=True)`` with a one-line CheckpointError naming keys.

    ``assign``: the module takes the given tensors as its parameters (no copy), as a module built
    on the meta device must.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    for keys, what in ((missing, "missing"), (unexpected, "unexpected")):
        if keys:
            shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
            raise CheckpointError(f"{source}: {len(keys)} {what} weights for the model: {shown}")
    for name, t in state_dict.items():
        want = own[name]
        if t.shape != want.shape:
            raise CheckpointError(
                f"{source}: weight {name!r} has shape {list(t.shape)}, "
                f"the model expects {list(want.shape)}"
            )
        if want.is_floating_point() != t.is_floating_point():
            raise CheckpointError(f"{source}: weight {name!r} has dtype {t.dtype}, not floating")
    module.load_state_dict(state_dict, strict=True, assign=assign)


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype ("F16", ...)."""
    return _TORCH_TO_NAME[dtype]
