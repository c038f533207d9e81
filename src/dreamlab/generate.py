"""GenerationRequest -> images + manifests: the one path every task takes (ARCHITECTURE.md)."""

from __future__ import annotations

import inspect
import platform
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .core.guidance import classifier_free, dynamic_threshold
from .core.noise import MAX_SEED, NoiseSource
from .core.samplers import SAMPLERS, get_sampler, prior_std
from .core.schedules import Spacing
from .core.types import StepCallback
from .errors import InvalidRequestError
from .models.bundle import ModelBundle

MAX_BATCH = 16
MAX_STEPS = 1000
MAX_SIDE = 2048
MAX_PROMPT_CHARS = 2000


class GenerationRequest(BaseModel):
    """Everything that determines an image, given the model. The CLI, HTTP API and web UI all build one."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i of the batch uses seed + i; None draws one")
    steps: int = Field(30, ge=1, le=MAX_STEPS)
    sampler: str = "dpmpp_2m"
    schedule: Spacing = "karras"
    cfg_scale: float = Field(5.0, ge=0.0, le=50.0, description="classifier-free guidance scale; 1 = no guidance")
    guidance_rescale: float = Field(0.0, ge=0.0, le=1.0)
    eta: float | None = Field(None, ge=0.0, le=1.0, description="noise of ddim / ancestral / sde samplers")
    dynamic_threshold: float | None = Field(None, gt=0.0, le=1.0, description="Imagen percentile, pixel models")
    width: int | None = Field(None, ge=8, le=MAX_SIDE)
    height: int | None = Field(None, ge=8, le=MAX_SIDE)
    batch: int = Field(1, ge=1, le=MAX_BATCH)

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        get_sampler(v)  # raises UnknownNameError listing the known ones
        return v


def format_validation_error(e: ValidationError) -> str:
    """One line naming each bad field."""
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "request"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def make_request(**kwargs: Any) -> GenerationRequest:
    """Build a request, turning validation errors into one-line :class:`InvalidRequestError`."""
    try:
        return GenerationRequest(**kwargs)
    except ValidationError as e:
        raise InvalidRequestError(format_validation_error(e)) from None


@dataclass
class Result:
    images: list[Image.Image]
    manifests: list[dict[str, Any]]
    latents: torch.Tensor = field(repr=False)


def _sampler_options(req: GenerationRequest) -> dict[str, Any]:
    if req.eta is None:
        return {}
    if "eta" not in inspect.signature(SAMPLERS[req.sampler]).parameters:
        raise InvalidRequestError(f"sampler '{req.sampler}' takes no eta")
    return {"eta": req.eta}


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> PIL images (RGBA for 4 channels, straight alpha)."""
    arr = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return [Image.fromarray(np.ascontiguousarray(a.squeeze(-1) if mode == "L" else a), mode) for a in arr]


def generate(model: ModelBundle, request: GenerationRequest, *, on_step: StepCallback | None = None) -> Result:
    req = request
    width, height = req.width or model.sample_size, req.height or model.sample_size
    f = model.space.factor
    if width % f or height % f:
        raise InvalidRequestError(f"size {width}x{height} is not divisible by the model's factor {f}")
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    if seed + req.batch - 1 > MAX_SEED:
        raise InvalidRequestError(f"seed + batch - 1 exceeds 2**63 - 1")
    options = _sampler_options(req)
    sampler = get_sampler(req.sampler)

    sigmas = model.schedule.sigmas_for(req.steps, req.schedule)
    noise = NoiseSource.for_batch(seed, req.batch, (model.space.channels, height // f, width // f), device=model.device)

    with torch.inference_mode():
        cond = model.encode_prompts([req.prompt] * req.batch)
        denoise = model.denoiser()
        if cond is not None and req.cfg_scale != 1.0:
            uncond = model.encode_prompts([req.negative_prompt] * req.batch)
            denoise = classifier_free(denoise, uncond, req.cfg_scale, rescale=req.guidance_rescale)
        if req.dynamic_threshold is not None:
            denoise = dynamic_threshold(denoise, req.dynamic_threshold)
        x = noise.initial() * prior_std(float(sigmas[0]))
        state = sampler(denoise, x, sigmas, cond=cond, noise=noise, on_step=on_step, **options)
        images = model.space.decode(state)

    base = {
        "dreamlab_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.machine(),
        "model": {"name": model.name, "source": model.source, "files": model.files},
        "sampler": req.sampler,
        "sigmas": [float(s) for s in sigmas],
        "request": req.model_dump(),
    }
    manifests = []
    for i in range(req.batch):
        per_image = req.model_copy(update={"seed": seed + i, "batch": 1}).model_dump()
        manifests.append({**base, "seed": seed + i, "batch_index": i, "request": per_image, "width": width, "height": height})
    return Result(images=to_pil(images), manifests=manifests, latents=state)
