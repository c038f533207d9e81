"""PNG metadata: an A1111-compatible ``parameters`` text chunk and the full JSON manifest."""

from __future__ import annotations

import errno
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin
from pydantic import ValidationError

from .errors import DreamlabError
from .manifest import Manifest

MANIFEST_KEY = "dreamlab"
_PAIR = re.compile(r'\s*(\w[\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')  # Key: value, or Key: "value, quoted"


def weights_sha256(files: dict[str, str]) -> str | None:
    """The sha256 of the model's UNet weights file, from a model's {relative path: sha256}; its first 10
    hex digits are the "Model hash" A1111 shows (A1111 hashes the one checkpoint file)."""
    weights = [h for p, h in sorted(files.items()) if p.startswith("unet/") and p.endswith(".safetensors")]
    return weights[0] if weights else None


def a1111_parameters(manifest: Manifest | dict[str, Any]) -> str:
    """The text A1111 / ComfyUI / Civitai read: prompt, negative prompt, then 'Key: value' pairs."""
    m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
    req = m.request
    lines = [m.prompt]
    if m.negative_prompt:
        lines.append(f"Negative prompt: {m.negative_prompt}")
    weights = weights_sha256(m.model.files)
    pairs = {
        "Steps": req["steps"],
        "Sampler": req["sampler"],
        "Schedule type": req["schedule"],
        "CFG scale": req["cfg_scale"],
        "Denoising strength": req["strength"] if req.get("init_image") else None,
        "Seed": m.seed,
        "Size": f"{m.width}x{m.height}",
        "Model hash": weights[:10] if weights else None,
        "Model": m.model.name,
        "Version": f"dreamlab {m.dreamlab_version}",
    }
    lines.append(", ".join(f"{k}: {v}" for k, v in pairs.items() if v is not None))
    return "\n".join(lines)


def parse_parameters(text: str) -> dict[str, str]:
    """The fields of a ``parameters`` text (ours or any A1111-style one), as A1111's PNG-info reads them:
    "Prompt", "Negative prompt", then each "Key: value" of the last line, values as text ("Size" also as
    "Size-1" and "Size-2", width and height)."""
    lines = text.strip().split("\n")
    pairs: dict[str, str] = {}
    if len(lines) > 1 and len(found := _PAIR.findall(lines[-1])) >= 3:
        lines.pop()
        pairs = {key: _unquote(value.strip()) for key, value in found}
    prompt: list[str] = []
    negative: list[str] | None = None
    for line in lines:
        if negative is None and line.startswith("Negative prompt:"):
            negative = [line.removeprefix("Negative prompt:").strip()]
        elif negative is not None:
            negative.append(line)
        else:
            prompt.append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative or []), **pairs}
    if size := re.fullmatch(r"(\d+)x(\d+)", pairs.get("Size", "")):
        fields["Size-1"], fields["Size-2"] = size.groups()
    return fields


def _unquote(value: str) -> str:
    if value.startswith('"'):
        try:
            return str(json.loads(value))
        except ValueError:
            pass
    return value


def png_bytes(image: Image.Image, manifest: Manifest | dict[str, Any]) -> bytes:
    """The PNG file of an output: the pixels, the A1111 ``parameters`` chunk and the dreamlab manifest."""
    if isinstance(manifest, Manifest):
        manifest = manifest.dump()
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(manifest))
    info.add_text(MANIFEST_KEY, json.dumps(manifest, sort_keys=True))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(image: Image.Image, path: str | Path, manifest: Manifest | dict[str, Any]) -> Path:
    """Write atomically (a temp file renamed into place), so a failure never leaves a partial PNG."""
    return write_atomic(Path(path), png_bytes(image, manifest))


def write_atomic(path: Path, data: bytes) -> Path:
    """``data`` into ``path`` through a temp file renamed into place; errors as one-line DreamlabErrors."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=path.suffix, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
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
