"""PNG metadata: an A1111-compatible ``parameters`` text chunk and the full JSON manifest."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import DreamlabError

MANIFEST_KEY = "dreamlab"


def a1111_parameters(manifest: dict[str, Any]) -> str:
    """The text A1111 / ComfyUI / Civitai read: prompt, negative prompt, then 'Key: value' pairs."""
    req = manifest["request"]
    lines = [req["prompt"]]
    if req.get("negative_prompt"):
        lines.append(f"Negative prompt: {req['negative_prompt']}")
    weights = [h for p, h in manifest["model"]["files"].items() if p.startswith("unet/") and p.endswith(".safetensors")]
    pairs = {
        "Steps": req["steps"],
        "Sampler": req["sampler"],
        "Schedule type": req["schedule"],
        "CFG scale": req["cfg_scale"],
        "Denoising strength": req["strength"] if req.get("init_image") else None,
        "Seed": manifest["seed"],
        "Size": f"{manifest['width']}x{manifest['height']}",
        "Model hash": weights[0][:10] if weights else None,
        "Model": manifest["model"]["name"],
        "Version": f"dreamlab {manifest['dreamlab_version']}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, manifest: dict[str, Any]) -> Path:
    """Write atomically (a temp file renamed into place), so a failure never leaves a partial PNG."""
    path = Path(path)
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


def read_manifest(path: str | Path) -> dict[str, Any]:
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
