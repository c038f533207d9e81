"""Weight files: SHA-256 (cached by path, size and mtime, so large checkpoints are hashed once per
process) and the safetensors-only policy."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import IntegrityError, ModelNotFoundError, UnsafeCheckpointError

_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _CACHE[key] = h.hexdigest()
    return _CACHE[key]


def verify_sha256(path: str | Path, expected: str) -> None:
    actual = sha256_file(path)
    if actual != expected.lower():
        raise IntegrityError(f"{path}: sha256 {actual} does not match the expected {expected}")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
HASHED_SUFFIXES = WEIGHT_SUFFIXES + (".json", ".txt", ".model")


def folder_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every weight, config and vocabulary file under a model folder, by relative path."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix in HASHED_SUFFIXES and not p.name.startswith(".")
    }


def use_safetensors(folder: Path, allow_pickle: bool) -> bool:
    """Whether to load the component from safetensors; refuses a pickle-only folder unless allowed."""
    files = [p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES]
    if not files:
        raise ModelNotFoundError(f"{folder} holds no weights")
    if not allow_pickle and not any(p.suffix == ".safetensors" for p in files):
        names = ", ".join(sorted(p.name for p in files))
        raise UnsafeCheckpointError(
            f"{folder} has only pickled weights ({names}); pickles can run code when loaded. "
            "Convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)"
        )
    return any(p.suffix == ".safetensors" for p in files)
