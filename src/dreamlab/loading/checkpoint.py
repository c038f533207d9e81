"""Reading a single-file checkpoint: its tensors, metadata and training step, with one clear line for a
file that is not one.

``.safetensors`` is read with safetensors after its header has been checked here (a truncated download
and a file that is not safetensors at all say so); ``.ckpt``, ``.pt``, ``.pth`` and ``.bin`` are pickles,
refused unless ``allow_pickle`` and then read with ``torch.load(weights_only=True)``, which builds
tensors and plain containers only.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CheckpointError, ModelNotFoundError, UnsafeCheckpointError

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
_MAX_HEADER = 100 << 20  # safetensors refuses headers over 100 MB too


@dataclass
class Checkpoint:
    path: Path
    tensors: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)  # safetensors' __metadata__ (e.g. modelspec.*)
    global_step: int | None = None  # a training checkpoint's step (pickles made by the original trainers)

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.tensors.items()}


def read_checkpoint(path: Path, *, allow_pickle: bool = False) -> Checkpoint:
    if not path.is_file():
        raise ModelNotFoundError(f"no checkpoint file at {path}")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise UnsafeCheckpointError(
                f"{path.name} is a pickle ({suffix}); pickles can run code when loaded. Use a .safetensors "
                "version of it, or pass --allow-pickle to load it with torch.load(weights_only=True)"
            )
        return _read_pickle(path)
    raise CheckpointError(f"{path.name} is not a checkpoint file dreamlab reads: expected "
                          f"{', '.join(CHECKPOINT_SUFFIXES)} (pickles only with --allow-pickle)")


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file, after checking that the file holds all it describes."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
        if n < 2 or n > _MAX_HEADER:
            raise CheckpointError(f"{path.name} is not a safetensors file (it does not start with a header length; "
                                  f"{size} bytes)")
        raw = f.read(n)
    if len(raw) < n:
        if raw[:1] == b"{":
            raise CheckpointError(f"{path.name} is truncated: it ends inside its header ({size} bytes); download it again")
        raise CheckpointError(f"{path.name} is not a safetensors file (its header length {n} exceeds the file, {size} bytes)")
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{path.name} is not a safetensors file (its header is not a safetensors header)") from None
    need = 8 + n + max(ends, default=0)
    if size < need:
        raise CheckpointError(f"{path.name} is truncated: its header describes {need} bytes, the file has {size} "
                              f"({100 * size / need:.0f}%); download it again")
    return header


def _read_safetensors(path: Path) -> Checkpoint:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    header = safetensors_header(path)
    metadata = header.get("__metadata__") or {}
    try:
        tensors = load_file(path)  # memory-mapped: pages are read as the tensors are used
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path.name}: {str(e).splitlines()[0]}") from None
    return Checkpoint(path, tensors, {str(k): str(v) for k, v in metadata.items()})


def _read_pickle(path: Path) -> Checkpoint:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":  # torch.save's zip archive, or a legacy pickle
        raise CheckpointError(f"{path.name} is not a PyTorch checkpoint (neither a torch.save archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f"it pickles {found[1]}" if found else str(e).splitlines()[0][:200]
        raise CheckpointError(f"{path.name} holds more than tensors, which torch.load(weights_only=True) refuses to "
                              f"build ({what}); use a .safetensors version of it") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path.name} is not a readable PyTorch checkpoint (truncated?): "
                              f"{str(e).splitlines()[0][:120]}") from None
    step = obj.get("global_step") if isinstance(obj, dict) else None
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):  # the trainers' wrapping
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path.name} is a pickle of a {type(obj).__name__}, not of a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    return Checkpoint(path, tensors, global_step=int(step) if isinstance(step, int) else None)
