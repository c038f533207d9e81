"""GenerationRequest -> images + manifests: the one path every task takes (ARCHITECTURE.md)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import inspect
import io
import math
import platform
import re
import secrets
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from . import __version__
from .core.guidance import classifier_free, dynamic_threshold
from .core.noise import MAX_SEED, NoiseSource, stream_seed
from .core.objectives import q_sample
from .core.samplers import SAMPLERS, get_sampler, prior_std
from .control.inpaint import inpaint
from .core.schedules import Spacing, truncate
from .core.types import Cond, StepCallback
from .errors import InvalidRequestError
from .images import resize, to_pil
from .models.bundle import ModelBundle

MAX_BATCH = 16
MAX_STEPS = 1000
MAX_SIDE = 2048
MAX_PROMPT_CHARS = 2000
MAX_IMAGE_B64_CHARS = 12_000_000  # about 9 MB of encoded image
MAX_PROMPT_PARTS = 8  # composed prompts: each part costs one more network row per step
MAX_PART_WEIGHT = 10.0

_AND = re.compile(r"(?<!\S)AND(?!\S)")  # a word of its own: "ANDROID", "bAND" are text
_WEIGHT = re.compile(r"^(?P<text>.*?)(?:\s+|^):\s*(?P<weight>[-+]?(?:\d+\.?\d*|\.\d+))\s*$", re.DOTALL)


def split_prompt(prompt: str) -> list[tuple[str, float]]:
    """The parts of a composed prompt and their weights: "a cat AND a hat :0.5 AND snow :-1" ->
    [("a cat", 1.0), ("a hat", 0.5), ("snow", -1.0)] (composable diffusion, Liu et al. 2022; the
    syntax of the AUTOMATIC1111 web UI). Parts are separated by an upper-case AND standing alone; a
    weight follows its part after a space and a colon. A prompt without AND is one part, left exactly as
    written (a colon in it is text). Raises InvalidRequestError for an empty part, more than
    MAX_PROMPT_PARTS parts, or a weight outside +-MAX_PART_WEIGHT."""
    pieces = _AND.split(prompt)
    if len(pieces) == 1:
        return [(prompt, 1.0)]
    if len(pieces) > MAX_PROMPT_PARTS:
        raise InvalidRequestError(f"the prompt composes {len(pieces)} parts with AND; at most {MAX_PROMPT_PARTS}")
    parts = []
    for i, piece in enumerate(pieces, 1):
        m = _WEIGHT.match(piece)
        text, weight = (m["text"], float(m["weight"])) if m else (piece, 1.0)
        text = text.strip()
        if not text:
            raise InvalidRequestError(f"part {i} of the prompt (between ANDs) is empty")
        if not abs(weight) <= MAX_PART_WEIGHT:
            raise InvalidRequestError(f"part {i} of the prompt ({text!r}) has weight {weight}; at most {MAX_PART_WEIGHT} either way")
        parts.append((text, weight))
    return parts


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
    init_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="img2img / inpainting source: base64 PNG or JPEG"
    )
    strength: float = Field(0.75, ge=0.0, le=1.0, description="img2img: share of the schedule re-run (SDEdit)")
    mask_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="inpainting mask, base64 image: white = repaint"
    )
    lowres_image: str | None = Field(
        None, max_length=MAX_IMAGE_B64_CHARS, description="super-resolution models: the image to enlarge, base64"
    )
    noise_level: int | None = Field(
        None, ge=0, le=999, description="super-resolution: noise added to the low-res input (a timestep); None = the model's"
    )

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        get_sampler(v)  # raises UnknownNameError listing the known ones
        return v

    @field_validator("prompt")
    @classmethod
    def _composable(cls, v: str) -> str:
        split_prompt(v)  # raises InvalidRequestError naming the bad part
        return v


def encode_image(image: Image.Image | str | Path) -> str:
    """A PIL image (as PNG) or an image file (its bytes unchanged, once checked to be a readable image)
    -> the base64 string requests carry. Keeping a file's bytes makes the manifest's hash its sha256sum."""
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return base64.b64encode(buf.getvalue()).decode("ascii")
    try:
        data = Path(image).read_bytes()
    except OSError as e:
        raise InvalidRequestError(f"cannot read {image}: {e.strerror or e}") from None
    open_image(data, str(image))
    return base64.b64encode(data).decode("ascii")


def open_image(data: bytes, what: str, *, load: bool = True) -> Image.Image:
    """The image in ``data``; ``load=False`` reads only its header (size, mode), not its pixels."""
    try:
        image = Image.open(io.BytesIO(data))
        if load:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise InvalidRequestError(f"{what} is not a readable image ({e})") from None
    if max(image.size) > 4 * MAX_SIDE:
        raise InvalidRequestError(f"{what} is too large ({image.size[0]}x{image.size[1]})")
    return image


def image_bytes(b64: str, what: str) -> bytes:
    """The file bytes a base64 request field carries (an optional data: URL prefix is allowed)."""
    if b64.startswith("data:"):
        b64 = b64.partition(",")[2]
    try:
        return base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"{what} is not valid base64") from None


def decode_image(b64: str, what: str) -> Image.Image:
    return open_image(image_bytes(b64, what), what)


def image_sha256(b64: str, what: str = "image") -> str:
    """How manifests record an input image: "sha256:" + the hash of its file bytes (= sha256sum FILE)."""
    return "sha256:" + hashlib.sha256(image_bytes(b64, what)).hexdigest()


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
    latents: torch.Tensor = field(repr=False)  # final sampler state
    pixels: torch.Tensor = field(repr=False)  # decoded images, (B, C, H, W) in [-1, 1]


def _sampler_options(req: GenerationRequest) -> dict[str, Any]:
    if req.eta is None:
        return {}
    if "eta" not in inspect.signature(SAMPLERS[req.sampler]).parameters:
        raise InvalidRequestError(f"sampler '{req.sampler}' takes no eta")
    return {"eta": req.eta}


def _to_tensor(image: Image.Image, channels: int, width: int, height: int) -> torch.Tensor:
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    image = image.convert(mode)
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    t = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).reshape(height, width, channels)
    return t.permute(2, 0, 1).unsqueeze(0) / 127.5 - 1


def _load_inputs(req: GenerationRequest, model: ModelBundle, width: int, height: int):
    """Decode the source image and mask of img2img / inpainting, at the output size."""
    if req.init_image is None:
        return None, None
    source = _to_tensor(decode_image(req.init_image, "init_image"), model.space.image_channels, width, height)
    mask = None
    if req.mask_image is not None:
        mask = (_to_tensor(decode_image(req.mask_image, "mask_image"), 1, width, height) + 1) / 2
    return source, mask


INPUT_IMAGES = ("init_image", "mask_image", "lowres_image")  # request fields that carry an image


def _recorded(request: dict[str, Any]) -> dict[str, Any]:
    """The request as a manifest records it: input images by the sha256 of their bytes, not inline."""
    for key in INPUT_IMAGES:
        if request.get(key):
            request[key] = image_sha256(request[key], key)
    return request


def _upscale(model: ModelBundle) -> int:
    """How much a cascade's SR stage enlarges its base model's images (1 for other models)."""
    return model.upscaler.sample_size // model.sample_size if model.upscaler is not None else 1


def check_request(model: ModelBundle, req: GenerationRequest) -> tuple[int, int]:
    """What a valid request can still get wrong against a particular model; the output (width, height).
    Raises InvalidRequestError. Cheap: decodes no image and runs no network."""
    final = model.upscaler or model
    width, height = req.width or final.sample_size, req.height or final.sample_size
    if model.sr is not None and req.lowres_image is not None and not (req.width or req.height):
        # enlarge the given image by the model's factor (its header is read, not its pixels)
        w, h = open_image(image_bytes(req.lowres_image, "lowres_image"), "lowres_image", load=False).size
        width, height = w * sr_factor(model), h * sr_factor(model)
    k = _upscale(model)
    f = model.space.factor * k
    if model.upscaler is not None:
        f = f * final.space.factor // math.gcd(f, final.space.factor)
    if width % f or height % f:
        what = "the cascade's factor (its upscaling times the base's latent factor)" if k > 1 else "the model's factor"
        raise InvalidRequestError(f"size {width}x{height} is not divisible by {what} {f}")
    if model.upscaler is not None and (req.init_image is not None or req.lowres_image is not None):
        raise InvalidRequestError(
            f"{model.name} is a cascade: it makes its own low-resolution image; for img2img, inpainting or "
            "enlarging a given image use its base or its super-resolution model alone"
        )
    if model.sr is not None:
        if req.lowres_image is None:
            raise InvalidRequestError(f"{model.name} is a super-resolution model: give it a lowres_image to enlarge")
        if width % sr_factor(model) or height % sr_factor(model):
            raise InvalidRequestError(f"size {width}x{height} is not divisible by the model's upscaling {sr_factor(model)}")
        if req.init_image is not None:
            raise InvalidRequestError("img2img and inpainting are not supported with a super-resolution model")
    elif model.upscaler is None and (req.lowres_image is not None or req.noise_level is not None):
        raise InvalidRequestError(f"lowres_image and noise_level are for super-resolution models, and {model.name} is not one")
    if req.seed is not None and req.seed + req.batch - 1 > MAX_SEED:
        raise InvalidRequestError("seed + batch - 1 exceeds 2**63 - 1")
    if req.mask_image is not None and req.init_image is None:
        raise InvalidRequestError("mask_image needs an init_image to inpaint")
    _sampler_options(req)
    return width, height


def sr_factor(model: ModelBundle) -> int:
    """How many times a super-resolution model enlarges its input (per side)."""
    assert model.sr is not None
    return max(1, model.sample_size // model.sr.from_size)


def _noise_level(model: ModelBundle, req: GenerationRequest) -> int:
    assert model.sr is not None
    return req.noise_level if req.noise_level is not None else model.sr.noise_level


SR_STAGE_STREAM = 1 << 40  # a cascade's SR stage draws its noise from stream_seed(seed, this)
AUGMENT_STREAM = 1 << 41  # the noise added to a super-resolution model's low-res input


@dataclass
class _Stage:
    """One sampler run per image: a model, its output size, per-image seeds and optional inputs."""

    model: ModelBundle
    width: int
    height: int
    seeds: list[int]
    sigmas: torch.Tensor
    lowres: list[torch.Tensor] | None = None  # pixels at (height, width), SR conditioning: one per image, or one for all
    noise_level: int | None = None


def _run_stage(stage: _Stage, req: GenerationRequest, source, mask, progress) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sampler states and decoded images (B, C, H, W) of one stage, image by image."""
    model, sigmas = stage.model, stage.sigmas
    options = _sampler_options(req)
    sampler = get_sampler(req.sampler)
    f = model.space.factor
    shape = (model.space.channels, stage.height // f, stage.width // f)
    parts = split_prompt(req.prompt)
    cond = model.encode_prompts([text for text, _ in parts])
    weights = [w for _, w in parts] if len(parts) > 1 else None  # composed: one guidance term per part
    guided = cond is not None and (req.cfg_scale != 1.0 or weights is not None)
    uncond = model.encode_prompts([req.negative_prompt]) if guided else None
    known = model.space.encode(source.to(model.device)) if source is not None else None
    keep = None
    if mask is not None:
        small = torch.nn.functional.interpolate(mask, size=shape[1:], mode="area").to(model.device)
        keep = (small > 0.01).float()
    lows = [model.space.encode(low.to(model.device)) for low in stage.lowres] if stage.lowres is not None else None
    states = []
    for i, seed in enumerate(stage.seeds):
        noise = NoiseSource([seed], shape, device=model.device)
        c, u = cond, uncond
        if lows is not None:  # super-resolution: the low-res latents, augmented, ride along in Cond
            low = lows[i if len(lows) > 1 else 0]
            level = torch.full((1,), stage.noise_level, dtype=torch.long)
            extra = {"noise_level": stage.noise_level}
            low = q_sample(low, level.to(low.device), noise.draw(AUGMENT_STREAM), model.schedule)
            c = replace(cond, concat=torch.cat([low] * len(parts)), extra=extra) if cond is not None else Cond(concat=low, extra=extra)
            u = replace(uncond, concat=low, extra=extra) if uncond is not None else None
        denoise = model.denoiser()
        if guided:
            denoise = classifier_free(denoise, u, req.cfg_scale, rescale=req.guidance_rescale, weights=weights)
        if req.dynamic_threshold is not None:
            denoise = dynamic_threshold(denoise, req.dynamic_threshold)
        z = noise.initial()
        if known is None:
            x = z * prior_std(float(sigmas[0]))
        else:
            if keep is not None:
                denoise = inpaint(denoise, known, keep, z)
            x = known + z * float(sigmas[0])
        states.append(sampler(denoise, x, sigmas, cond=c, noise=noise, on_step=progress, **options) if len(sigmas) > 1 else x)
    images = torch.cat([model.space.decode(s) for s in states])
    return states, images


def generate(model: ModelBundle, request: GenerationRequest, *, on_step: StepCallback | None = None) -> Result:
    """Images for ``request``; image i of a batch is bit-identical to generating it alone with seed + i.

    The prompt encodings and input latents are computed once; then each image of the batch gets its own
    batch-1 sampler run and decode. Batched forwards are not bit-identical to single ones on every CPU
    (oneDNN and BLAS pick their blocking by batch size; seen on an AMD EPYC machine where an Intel one had
    agreed), and `dreamlab replay` must reproduce any image of a batch from its own manifest. Progress
    runs over the whole batch (steps x images x stages).

    A cascade (``model.upscaler``) runs its base model at 1/k of the output size, then its
    super-resolution stage on each image, with noise from ``stream_seed(seed + i, SR_STAGE_STREAM)``.
    """
    req = request
    width, height = check_request(model, req)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    seeds = [seed + i for i in range(req.batch)]
    k = _upscale(model)
    base = _Stage(model, width // k, height // k, seeds, model.schedule.sigmas_for(req.steps, req.schedule))
    stages = [base]
    if model.upscaler is not None:
        sr = model.upscaler
        stages.append(_Stage(sr, width, height, [stream_seed(s, SR_STAGE_STREAM) for s in seeds],
                             sr.schedule.sigmas_for(req.steps, req.schedule), noise_level=_noise_level(sr, req)))
    source, mask = _load_inputs(req, model, width, height)
    if source is not None:
        # SDEdit (Meng et al. 2021): noise the source to a level part-way down the schedule, denoise from there
        base.sigmas = truncate(base.sigmas, req.strength)
    if model.sr is not None:
        k_sr = sr_factor(model)
        low = _to_tensor(decode_image(req.lowres_image, "lowres_image"), model.space.image_channels, width // k_sr, height // k_sr)
        base.lowres = [resize(low, (height, width))]  # the same input for every image: encoded once
        base.noise_level = _noise_level(model, req)

    total = sum(len(st.sigmas) - 1 for st in stages) * req.batch
    done = [0]

    def progress(info) -> None:  # one bar over the whole request
        done[0] += 1
        if on_step is not None:
            on_step(replace(info, i=done[0] - 1, total=total))

    with torch.inference_mode():
        states, images = _run_stage(base, req, source, mask, progress)
        if mask is not None:  # keep the known pixels exactly, not only their latents
            m = mask.to(images.device)
            images = images * m + source.to(images.device) * (1 - m)
        if len(stages) > 1:
            stages[1].lowres = [resize(im.unsqueeze(0).float().cpu(), (height, width)) for im in images.clamp(-1, 1)]
            states, images = _run_stage(stages[1], req, None, None, progress)
        state = torch.cat(states)

    recorded = _recorded(req.model_dump())  # input images hashed once for the whole batch
    common: dict[str, Any] = {
        "dreamlab_version": __version__,
        "torch_version": torch.__version__,
        "platform": platform.machine(),
        "model": {"name": model.name, "source": model.source, "files": model.files},
        "sampler": req.sampler,
        "sigmas": [float(s) for s in base.sigmas],
        "request": recorded,
    }
    if base.noise_level is not None:
        common["noise_level"] = base.noise_level
    if len(stages) > 1:
        common["stages"] = [
            {"stage": name, "width": st.width, "height": st.height, "sigmas": [float(s) for s in st.sigmas],
             **({"noise_level": st.noise_level} if st.noise_level is not None else {})}
            for name, st in zip(("base", "super_resolution"), stages)
        ]
    manifests = []
    for i in range(req.batch):
        per_image = {**recorded, "seed": seed + i, "batch": 1}
        manifests.append({**common, "seed": seed + i, "batch_index": i, "request": per_image, "width": width, "height": height})
    return Result(images=to_pil(images), manifests=manifests, latents=state, pixels=images.clamp(-1, 1))
