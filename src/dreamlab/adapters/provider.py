"""The patches a request's adapters need (a patch provider of :data:`dreamlab.generate.PATCH_PROVIDERS`):
its LoRAs, each merged at its scale, and every known embedding whose token one of its prompts writes.

Each patch records what it applied (name, file hashes, scale) on the request's view, and the manifest of
every image carries those records (``adapters``), so ``dreamlab replay`` can find and check the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ..manifest import AdapterRecord
from ..models.patches import Patch, TokenEmbeddings, Undo, WeightDelta


@dataclass(frozen=True)
class Recorded:
    """A patch whose application is recorded in the view's manifest adapters."""

    patch: Patch
    record: AdapterRecord

    def apply(self, view) -> Undo:
        undo = self.patch.apply(view)
        view.applied_adapters.append(self.record)
        return undo


def _files(path: Path) -> dict[str, str]:
    from ..loading.files import sha256_file

    if path.is_dir():
        return {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file() and p.suffix in (".safetensors", ".json", ".pt", ".bin")}
    return {path.name: sha256_file(path)}


def prompts_of(req) -> Iterator[str]:
    """Every text of a request that the text encoder reads."""
    yield req.prompt
    yield req.negative_prompt
    if req.edit is not None:
        yield req.edit.target
    for r in req.regions:
        yield r.prompt
    if req.illusion is not None:
        yield from req.illusion.prompts
    if req.collage is not None:
        yield from (layer.prompt for layer in req.collage.layers)


def adapter_patches(model, req) -> list[Patch]:
    from .lora import lora_deltas

    adapters = getattr(model, "adapters", None)
    if adapters is None:
        return []
    patches: list[Patch] = []
    text = "\n".join(prompts_of(req))
    for token, path in adapters.known("embedding").items():
        if token in text or token.lower() in text.lower():
            emb = adapters.embedding(path)
            record = AdapterRecord(kind="embedding", name=token, source=str(path), files=_files(path))
            patches.append(Recorded(TokenEmbeddings({token: emb.vectors}), record))
    for lo in req.loras:
        weights, path = adapters.lora(lo.name)
        record = AdapterRecord(kind="lora", name=lo.name, source=str(path), files=_files(path), scale=lo.scale)
        for k, (target, deltas) in enumerate(lora_deltas(weights, model).items()):
            patch = WeightDelta(deltas, lo.scale, target)
            patches.append(Recorded(patch, record) if k == 0 else patch)  # one record per LoRA
    return patches


def register_from_manifest(model, adapters: list[Any] | None) -> list[str]:
    """Register the files a manifest's adapters came from (replay); what differs or is missing, in lines."""
    lines = []
    for a in adapters or []:
        if a.kind == "imagic" and a.source and Path(a.source).is_dir():
            model.adapters.register(a.source, "imagic")
            continue
        if a.kind not in ("lora", "embedding"):
            continue
        path = Path(a.source) if a.source else None
        if path is None or not path.exists():
            known = model.adapters.known(a.kind)
            if a.name not in known:
                lines.append(f"{a.kind} {a.name}: {a.source or 'its file'} is gone and none of that name is installed")
                continue
            path = known[a.name]
        else:
            model.adapters.register(path, a.kind)
        now = _files(path)
        if a.files and now != a.files:
            lines.append(f"{a.kind} {a.name}: the files at {path} differ from those that made this image")
    return lines
