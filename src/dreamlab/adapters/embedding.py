"""Textual-inversion embedding files: read diffusers' ``learned_embeds.safetensors`` ({token: (n, D)}),
A1111's ``emb_params`` safetensors and (with ``allow_pickle``) its ``.pt`` files; write the first.

A file is used by writing its token in a prompt; :class:`~dreamlab.models.patches.TokenEmbeddings` adds
it to the request's view of the text encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..errors import DreamlabError

EMBED_FILE = "learned_embeds.safetensors"
META_FILE = "dreamlab_embedding.json"


@dataclass
class Embedding:
    token: str
    vectors: Tensor  # (n, D)
    meta: dict[str, Any] = field(default_factory=dict)
    file: Path | None = None


def embedding_file(path: str | Path) -> Path:
    """The weights file of an embedding given as its folder (``dreamlab train embedding --out``) or file."""
    p = Path(path).expanduser()
    if p.is_dir():
        if (p / EMBED_FILE).is_file():
            return p / EMBED_FILE
        found = sorted(p.glob("*.safetensors")) or sorted(q for q in p.iterdir() if q.suffix in (".pt", ".bin"))
        if not found:
            raise DreamlabError(f"{p} holds no embedding (expected {EMBED_FILE})")
        return found[0]
    if not p.is_file():
        raise DreamlabError(f"no embedding at {p}")
    return p


def read_embedding(path: str | Path, *, allow_pickle: bool = False) -> Embedding:
    from ..loading.checkpoint import read_checkpoint

    file = embedding_file(path)
    meta_file = file.parent / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if file.suffix in (".pt", ".bin") and allow_pickle:
        return _a1111_pickle(file, meta)
    tensors = read_checkpoint(file, allow_pickle=allow_pickle).tensors
    if "emb_params" in tensors:  # A1111's safetensors: the token is the file's name
        return Embedding(meta.get("token", f"<{file.stem}>"), tensors["emb_params"].reshape(-1, tensors["emb_params"].shape[-1]).float(), meta, file)
    if len(tensors) != 1:
        raise DreamlabError(f"{file.name} holds {len(tensors)} tensors; an embedding file holds one token's vectors")
    token, v = next(iter(tensors.items()))
    return Embedding(token, v.reshape(-1, v.shape[-1]).float(), meta, file)


def _a1111_pickle(file: Path, meta: dict) -> Embedding:
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (unpickling errors of every kind become one line)
        raise DreamlabError(f"{file.name} is not a readable embedding: {str(e).splitlines()[0][:160]}") from None
    if isinstance(obj, dict) and isinstance(obj.get("string_to_param"), dict):
        v = next(iter(obj["string_to_param"].values()))
        return Embedding(meta.get("token", f"<{obj.get('name', file.stem)}>"), v.reshape(-1, v.shape[-1]).float(), meta, file)
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(next(iter(obj.values())), Tensor):
        token, v = next(iter(obj.items()))
        return Embedding(token, v.reshape(-1, v.shape[-1]).float(), meta, file)
    raise DreamlabError(f"{file.name} is not an embedding file dreamlab reads (diffusers' or A1111's)")


def save_embedding(emb: Embedding, folder: str | Path) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({emb.token: emb.vectors.detach().float().contiguous()}, str(folder / EMBED_FILE))
    (folder / META_FILE).write_text(json.dumps({**emb.meta, "token": emb.token}, indent=2, sort_keys=True) + "\n")
    return folder / EMBED_FILE
