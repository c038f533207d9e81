"""Load a model folder in diffusers' format into a :class:`ModelBundle`.

Layout (a Stable Diffusion diffusers folder is one; dreamlab's own models add ``dreamlab.json``):
    unet/            UNet2DConditionModel config + weights
    scheduler/       scheduler_config.json: the training betas and prediction_type
    vae/             AutoencoderKL (optional: without it the model works in pixel space)
    text_encoder/, tokenizer/   a transformers encoder (optional if dreamlab.json names a packaged one)
    dreamlab.json    optional, see :class:`ModelSpec`

Weights load from safetensors only; a folder with only pickled weights is refused unless
``allow_pickle=True`` (and then diffusers/transformers load them with ``weights_only=True``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..core.prediction import Prediction
from ..core.schedules import DiscreteSchedule
from ..errors import DreamlabError, ModelNotFoundError
from ..models.bundle import ModelBundle
from ..models.space import PixelSpace, VAESpace
from ..models.text import Pooling
from .files import folder_hashes, use_safetensors
from .text_encoders import load_folder_encoder, load_minilm


class TextEncoderSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: Literal["folder", "minilm"] = "folder"  # minilm: the pinned PyPI package, sha256-checked
    max_length: int | None = Field(None, ge=1, le=512)
    pooling: Pooling = "pooler"


class ModelSpec(BaseModel):
    """Contents of ``dreamlab.json``."""

    model_config = ConfigDict(extra="allow")
    name: str | None = None
    sample_size: int | None = Field(None, ge=8, le=4096, description="default image size in pixels")
    use_mask: bool = False
    text_encoder: TextEncoderSpec = TextEncoderSpec()
    latent_scale: float | None = None  # overrides vae.config.scaling_factor
    latent_shift: float | None = None


def default_model_dir() -> Path:
    """Where the default model is looked for: $DREAMLAB_MODEL, else the weights shipped in the package."""
    env = os.environ.get("DREAMLAB_MODEL")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parent.parent / "weights" / "default"


def load_model(
    path: str | Path | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_pickle: bool = False,
) -> ModelBundle:
    from diffusers import AutoencoderKL, UNet2DConditionModel

    explicit = path is not None
    root = Path(path).expanduser() if explicit else default_model_dir()
    if not (root / "unet").is_dir():
        if explicit:
            raise ModelNotFoundError(f"no model at {root} (expected a diffusers-format folder with unet/)")
        raise ModelNotFoundError(
            f"no trained model is installed (looked for the default model in {root}). "
            "Pass --model DIR with a diffusers-format model folder, or set DREAMLAB_MODEL"
        )
    try:
        spec = ModelSpec.model_validate_json((root / "dreamlab.json").read_text()) if (root / "dreamlab.json").exists() else ModelSpec()
    except ValidationError as e:
        raise DreamlabError(f"{root / 'dreamlab.json'} is invalid: {e.errors()[0]['msg']}") from None

    sched_file = root / "scheduler" / "scheduler_config.json"
    if not sched_file.exists():
        raise ModelNotFoundError(f"{root} has no scheduler/scheduler_config.json (the training noise schedule)")
    sched_cfg = json.loads(sched_file.read_text())

    try:
        unet = UNet2DConditionModel.from_pretrained(
            root / "unet", use_safetensors=use_safetensors(root / "unet", allow_pickle), torch_dtype=dtype
        )
        space: PixelSpace | VAESpace
        if (root / "vae").is_dir():
            vae = AutoencoderKL.from_pretrained(
                root / "vae", use_safetensors=use_safetensors(root / "vae", allow_pickle), torch_dtype=dtype
            )
            space = VAESpace(vae.to(device), spec.latent_scale, spec.latent_shift)
        else:
            space = PixelSpace(int(unet.config.in_channels))
    except (OSError, ValueError) as e:
        raise DreamlabError(f"cannot load the model in {root}: {str(e).splitlines()[0]}") from None

    te = spec.text_encoder
    if int(unet.config.cross_attention_dim or 0) == 0:
        text_encoder = None
    elif te.source == "minilm":
        text_encoder = load_minilm(te.max_length or 32, device=str(device))
    else:
        text_encoder = load_folder_encoder(
            root, max_length=te.max_length, pooling=te.pooling, device=str(device), allow_pickle=allow_pickle
        )
    if text_encoder is not None and text_encoder.dim != unet.config.cross_attention_dim:
        raise DreamlabError(
            f"text encoder width {text_encoder.dim} does not match the UNet's cross_attention_dim "
            f"{unet.config.cross_attention_dim} in {root}"
        )

    sample_size = spec.sample_size or int(unet.config.sample_size) * space.factor
    return ModelBundle(
        unet=unet.to(device).eval().requires_grad_(False),
        text_encoder=text_encoder,
        space=space,
        schedule=DiscreteSchedule.from_diffusers_config(sched_cfg),
        prediction=Prediction(sched_cfg.get("prediction_type", "epsilon")),
        sample_size=sample_size,
        use_mask=spec.use_mask,
        name=spec.name or root.name,
        source=str(root.resolve()),
        files=folder_hashes(root),
    )
