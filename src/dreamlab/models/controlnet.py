"""ControlNets (Zhang, Rao & Agrawala 2023) made from a model's UNet: building, saving, finding, loading.

A ControlNet is diffusers' ``ControlNetModel``: a trainable copy of the UNet's encoder and middle block,
joined to the frozen UNet through zero-initialised convolutions (so at the start of training it adds
exactly nothing), with a small hint encoder that brings the control map down to the latent size. Ours
are made with ``ControlNetModel.from_unet`` and a hint encoder of log2(factor) stride-2 stages, since the
default one downsamples 8x (Stable Diffusion's autoencoder) and the emoji autoencoder's factor is 4.

A ControlNet folder is diffusers' format plus ``dreamlab.json``: ``{"controlnet": {"condition": "canny",
"base_unet": "<sha256 of the UNet weights it was made from>", "base_name": ...}, "training": {...}}``.
A model uses the ControlNets made for its UNet: those shipped in the package (``weights/controlnets/``),
those in folders named by ``$DREAMLAB_CONTROLNETS`` (``:``-separated), and any given explicitly.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..errors import DreamlabError, ModelNotFoundError
from ..loading.files import folder_hashes, use_safetensors

HINT_CHANNELS = (16, 32, 96, 256)  # diffusers' default widths; ours keep the first log2(factor) + 1
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


class ControlNetInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: str
    base_unet: str  # sha256 of the base model's UNet weights
    base_name: str = ""


class ControlNetSpec(BaseModel):
    model_config = ConfigDict(extra="allow")
    controlnet: ControlNetInfo
    training: dict[str, Any] = {}


def controlnet_from_unet(unet, conditioning_channels: int, factor: int):
    """A fresh ControlNet for ``unet``: its encoder and middle block copied, zero convolutions, and a hint
    encoder that downsamples by ``factor`` (the autoencoder's)."""
    from diffusers import ControlNetModel

    stages = int(round(math.log2(factor)))
    if 2**stages != factor or not 1 <= stages <= 3:
        raise DreamlabError(f"a ControlNet hint encoder needs a latent factor of 2, 4 or 8, not {factor}")
    return ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT_CHANNELS[: stages + 1],
                                     conditioning_channels=conditioning_channels)


def base_hash(files: dict[str, str]) -> str | None:
    """The sha256 of a model's UNet weights, from its manifest file list."""
    return files.get(UNET_WEIGHTS)


def read_controlnet_spec(root: Path) -> ControlNetSpec:
    file = root / "dreamlab.json"
    if not (root / "config.json").exists() or not file.exists():
        raise ModelNotFoundError(f"no ControlNet at {root} (expected a diffusers ControlNet folder with dreamlab.json)")
    try:
        return ControlNetSpec.model_validate_json(file.read_text())
    except ValidationError as e:
        err = e.errors()[0]
        raise DreamlabError(f"{file} is invalid: {'.'.join(str(p) for p in err['loc'])}: {err['msg']}") from None


def search_path() -> list[Path]:
    shipped = Path(__file__).resolve().parent.parent / "weights" / "controlnets"
    extra = [Path(p).expanduser() for p in os.environ.get("DREAMLAB_CONTROLNETS", "").split(":") if p]
    return [*extra, shipped]


def installed_controlnets(files: dict[str, str], also: tuple[str, ...] = ()) -> dict[str, Path]:
    """condition -> ControlNet folder, for the model whose file hashes are ``files`` (first found wins); a
    student also takes those made for its teacher's UNet (``also``: their sha256), after its own."""
    found: dict[str, Path] = {}
    for bases in ((base_hash(files),), also):  # its own first
        for root in search_path():
            for folder in sorted(root.glob("*")) if root.is_dir() else []:
                try:
                    spec = read_controlnet_spec(folder)
                except DreamlabError:
                    continue
                if spec.controlnet.base_unet in bases:
                    found.setdefault(spec.controlnet.condition, folder)
    return found


def load_controlnet(folder: Path, files: dict[str, str], *, device="cpu", dtype=None, allow_pickle: bool = False,
                    also: tuple[str, ...] = ()):
    """The ControlNet in ``folder``, checked to be made for the model whose file hashes are ``files`` (or
    for one of the UNets whose sha256 is in ``also``: a student's teacher). Returns (network, spec, the
    folder's file hashes)."""
    from diffusers import ControlNetModel

    spec = read_controlnet_spec(folder)
    want = base_hash(files)
    if spec.controlnet.base_unet != want and spec.controlnet.base_unet not in also:
        raise DreamlabError(
            f"the ControlNet in {folder} was made for another UNet ({spec.controlnet.base_name or 'unnamed'}, "
            f"sha256 {spec.controlnet.base_unet[:12]}...), not this model's ({(want or 'none')[:12]}...)"
        )
    try:
        net = ControlNetModel.from_pretrained(folder, use_safetensors=use_safetensors(folder, allow_pickle), torch_dtype=dtype)
    except (OSError, ValueError) as e:
        raise DreamlabError(f"cannot load the ControlNet in {folder}: {str(e).splitlines()[0]}") from None
    return net.to(device).eval().requires_grad_(False), spec, folder_hashes(folder)


def save_controlnet(net, dest: Path, condition: str, base_files: dict[str, str], base_name: str,
                    training: dict[str, Any], dtype=None) -> Path:
    """Write a ControlNet folder atomically (fp16 on disk with ``dtype``; loaded in float32)."""
    import shutil

    import torch

    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    (net.to(dtype) if dtype is not None else net).save_pretrained(tmp)
    if dtype is not None:
        net.to(torch.float32)
    spec = {"controlnet": {"condition": condition, "base_unet": base_hash(base_files), "base_name": base_name},
            "training": training}
    (tmp / "dreamlab.json").write_text(json.dumps(spec, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
