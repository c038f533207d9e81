"""Where adapters come from: the installed library and the files a caller registers.

The library is a folder (``$DREAMLAB_ADAPTERS``, default ``~/.cache/dreamlab/adapters``) with
``loras/`` (diffusers/peft folders or kohya ``.safetensors`` files) and ``embeddings/`` (textual-inversion
folders or files). Requests name adapters: a LoRA by its folder or file name (``<lora:NAME:0.8>``), an
embedding by its token written in a prompt. Names are looked up in a listing of the library, never joined
onto a path, so no name from a request reaches the filesystem. Files given by path (``--lora PATH``,
``--embedding PATH``, replay) are registered on the model by the trusted caller (the CLI, the Python API).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InvalidRequestError

ADAPTERS_ENV = "DREAMLAB_ADAPTERS"
KINDS = ("lora", "embedding")
NAME = re.compile(r"^[\w.+-]{1,100}$")
_SUFFIXES = (".safetensors", ".pt", ".bin")


def library_dir() -> Path:
    return Path(os.environ.get(ADAPTERS_ENV) or "~/.cache/dreamlab/adapters").expanduser()


def adapter_name(path: Path) -> str:
    """A LoRA's name: its folder's name, or its file's stem; characters outside [A-Za-z0-9_.+-] become -."""
    stem = path.name if path.is_dir() else path.stem
    return re.sub(r"[^\w.+-]", "-", stem)[:100] or "lora"


def installed(kind: str, root: Path | None = None) -> dict[str, Path]:
    """name -> path of every adapter of ``kind`` in the library."""
    folder = (root or library_dir()) / ("loras" if kind == "lora" else "embeddings")
    if not folder.is_dir():
        return {}
    found = {}
    for p in sorted(folder.iterdir()):
        if p.name.startswith(".") or not (p.is_dir() or p.suffix in _SUFFIXES):
            continue
        found.setdefault(adapter_name(p), p)
    return found


@dataclass
class AdapterSet:
    """A model's adapters: those registered by path, then the library's; each file read once (per mtime).
    Shared by the model's request views (it holds files, never a request's state)."""

    # kind -> name -> path; "imagic": folders prepared by `dreamlab imagic` (registered only, no library)
    registered: dict[str, dict[str, Path]] = field(default_factory=lambda: {k: {} for k in (*KINDS, "imagic")})
    root: Path | None = None  # the library (None: library_dir() at lookup)
    allow_pickle: bool = False
    _cache: dict[tuple[str, int], Any] = field(default_factory=dict, repr=False)

    def register(self, path: str | Path, kind: str) -> str:
        """Make the adapter at ``path`` known under its name (a LoRA) or token (an embedding); the name."""
        p = Path(path).expanduser()
        if kind == "lora":
            from .lora import read_lora

            self._read(p, lambda: read_lora(p, allow_pickle=self.allow_pickle))
            name = adapter_name(p)
        elif kind == "imagic":
            name = adapter_name(p)
        else:
            name = self.embedding(p).token
        self.registered[kind][name] = p
        return name

    def known(self, kind: str) -> dict[str, Path]:
        if kind == "embedding":
            tokens = {self.embedding(p).token: p for p in installed(kind, self.root).values()}
            return {**tokens, **self.registered[kind]}
        return {**installed(kind, self.root), **self.registered[kind]}

    def lora_path(self, name: str) -> Path:
        path = self.known("lora").get(name)
        if path is None:
            have = ", ".join(sorted(self.known("lora"))) or "none installed"
            raise InvalidRequestError(f"no LoRA named {name!r} (known: {have}); install it in "
                                      f"{(self.root or library_dir()) / 'loras'} or pass --lora PATH")
        return path

    def lora(self, name: str):
        """(the LoRA named ``name``, read once per file version; the path it was read from)."""
        from .lora import read_lora

        path = self.lora_path(name)
        return self._read(path, lambda: read_lora(path, allow_pickle=self.allow_pickle)), path

    def embedding(self, path: Path):
        from .embedding import embedding_file, read_embedding

        file = embedding_file(path)
        return self._read(file, lambda: read_embedding(file, allow_pickle=self.allow_pickle))

    def _read(self, path: Path, read):
        key = (str(path.resolve()), _mtime(path))
        if key not in self._cache:
            self._cache[key] = read()
        return self._cache[key]


def _mtime(path: Path) -> int:
    if path.is_dir():
        return max((p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()), default=0)
    return path.stat().st_mtime_ns
