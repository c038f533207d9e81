"""PNG metadata: an A1111-compatible ``parameters`` text chunk and the full JSON manifest."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin
from pydantic import ValidationError

from .errors import DreamlabError
from .manifest import Manifest

MANIFEST_KEY = "dreamlab"


def a1111_parameters(manifest: Manifest | dict[str, Any]) -> str:
    """The text A1111 / ComfyUI / Civitai read: prompt, negative prompt, then 'Key: value' pairs."""
    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    req = m.request
    lines = [m.prompt]
    if m.negative_prompt:
        lines.append(f"Negative prompt: {m.negative_prompt}")
    weights = [h for p, h in m.model.files.items() if p.startswith("unet/") and p.endswith(".safetensors")]
    pairs = {
        "Steps": req["steps"],
        "Sampler": req["sampler"],
        "Schedule type": req["schedule"],
        "CFG scale": req["cfg_scale"],
        "Denoising strength": req["strength"] if req.get("init_image") else None,
        "Seed": m.seed,
        "Size": f"{m.width}x{m.height}",
        "Model hash": weights[0][:10] if weights else None,
        "Model": m.model.name,
        "Version": f"dreamlab {m.dreamlab_version}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, manifest: Manifest | dict[str, Any]) -> Path:
    """Write atomically (a temp file renamed into place), so a failure never leaves a partial PNG."""
    path = Path(path)
    if isinstance(manifest, Manifest):
        manifest = manifest.dump()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(manifest))
    info.add_text(MANIFEST_KEY, json.dumps(manifest, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno == errno.ENOSPC:
            raise DreamlabError(f"disk full while writing {path}") from None
        raise DreamlabError(f"cannot write {path}: {e.strerror or e}") from None
    return path


def read_record(path: str | Path) -> Manifest:
    """The typed manifest of a PNG made by dreamlab."""
    try:
        return Manifest.load(read_manifest(path))
    except ValidationError as e:
        raise DreamlabError(f"{path} carries a dreamlab manifest that is not valid: {str(e).splitlines()[0]}") from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a PNG made by dreamlab, as the JSON it carries (:func:`read_record`: typed)."""
    try:
        with Image.open(path) as im:
            text = im.text.get(MANIFEST_KEY) if hasattr(im, "text") else None
    except FileNotFoundError:
        raise DreamlabError(f"no such file: {path}") from None
    except OSError as e:
        raise DreamlabError(f"{path} is not a readable image: {e}") from None
    if text is None:
        raise DreamlabError(f"{path} carries no dreamlab manifest")
    return json.loads(text)
