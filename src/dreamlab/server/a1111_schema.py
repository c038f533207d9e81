"""The AUTOMATIC1111 web UI's API as dreamlab reads it: its request models (A1111's field names and
defaults, version 1.10), its sampler and scheduler names, and the one translation of an A1111 request into
a ``GenerationRequest``. No FastAPI here: ``a1111.py`` serves these models over the service.

Every A1111 field is one of three kinds:

- honoured: translated (prompt, seed, steps, cfg_scale, sampler_name, batch_size x n_iter, the images...);
- ignored: it cannot change the image (save_images, do_not_save_grid, the hr_* fields while enable_hr is
  off, image_cfg_scale, which only instruct-pix2pix models read, ...), accepted at any value;
- refused: dreamlab cannot honour it (hires fix, face restoration, styles, variation seeds, ...), accepted
  at its default or another value that changes nothing (``NO_OPS``), otherwise the request is refused
  with one line naming every such field.

A field left out takes the model's default (its ``dreamlab.json``), not A1111's 512x512 / Euler / 50 steps /
CFG 7, which would be wrong for most dreamlab models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from pydantic import BaseModel, ConfigDict, Field

from ..core.samplers import takes_eta
from ..core.schedules import Spacing
from ..errors import InvalidRequestError, UnknownNameError
from ..request import GenerationRequest, encode_image, image_bytes, make_request, open_image

# --- names -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class A1111Sampler:
    name: str  # A1111's
    sampler: str  # dreamlab's
    aliases: tuple[str, ...]  # A1111's (k-diffusion's names), then dreamlab's


# Only what dreamlab implements (the method, not A1111's noise: the same seed gives other images).
SAMPLERS: tuple[A1111Sampler, ...] = (
    A1111Sampler("DPM++ 2M", "dpmpp_2m", ("k_dpmpp_2m", "dpmpp_2m")),
    A1111Sampler("DPM++ 2M SDE", "dpmpp_2m_sde", ("k_dpmpp_2m_sde", "dpmpp_2m_sde")),
    A1111Sampler("Euler a", "euler_ancestral", ("k_euler_a", "k_euler_ancestral", "euler_ancestral")),
    A1111Sampler("Euler", "euler", ("k_euler", "euler")),
    A1111Sampler("Heun", "heun", ("k_heun", "heun")),
    A1111Sampler("DDIM", "ddim", ("ddim",)),
)


@dataclass(frozen=True)
class A1111Scheduler:
    name: str
    label: str
    schedule: Spacing | None  # dreamlab's spacing; None: the model's default
    aliases: tuple[str, ...] = ()
    default_rho: float = -1
    need_inner_model: bool = False


# Uniform, SGM Uniform and DDIM walk the timesteps A1111's do (999 down to 0 in n evenly spaced; n evenly
# spaced from 999, leaving 0 out; every T // n from the model's steps_offset up), rounded to integers as
# dreamlab's spacings are, so their sigmas can differ a little from A1111's. Karras is the same formula.
SCHEDULERS: tuple[A1111Scheduler, ...] = (
    A1111Scheduler("automatic", "Automatic", None),
    A1111Scheduler("uniform", "Uniform", "linspace", ("linspace",), need_inner_model=True),
    A1111Scheduler("karras", "Karras", "karras", default_rho=7.0),
    A1111Scheduler("sgm_uniform", "SGM Uniform", "trailing", ("SGMUniform", "trailing"), need_inner_model=True),
    A1111Scheduler("ddim", "DDIM", "leading", ("leading",), need_inner_model=True),
)
# A1111's other schedulers, named so that "DPM++ 2M SDE Exponential" is understood, and refused
NOT_IN_DREAMLAB = ("Exponential", "Polyexponential", "KL Optimal", "kl_optimal", "Align Your Steps", "align_your_steps",
                   "Simple", "Normal", "Beta")
# older A1111 releases listed these combined names as samplers of their own (scheduler Karras)
_KARRAS_ALIASES = {"k_dpmpp_2m_ka": "DPM++ 2M", "k_dpmpp_2m_sde_ka": "DPM++ 2M SDE"}


def _names(item: A1111Sampler | A1111Scheduler) -> list[str]:
    label = item.label if isinstance(item, A1111Scheduler) else None
    return [n.lower() for n in (item.name, label, *item.aliases) if n]


_SAMPLER_BY_NAME = {n: s for s in SAMPLERS for n in _names(s)}
_SCHEDULER_BY_NAME = {n: s for s in SCHEDULERS for n in _names(s)}
_SUFFIXES = sorted({*_SCHEDULER_BY_NAME, *(n.lower() for n in NOT_IN_DREAMLAB)}, key=len, reverse=True)


@dataclass(frozen=True)
class SamplerChoice:
    sampler: A1111Sampler | None  # None: the model's default sampler
    scheduler: A1111Scheduler


def _scheduler(name: str) -> A1111Scheduler:
    found = _SCHEDULER_BY_NAME.get(name.strip().lower())
    if found is None:
        known = ", ".join(s.label for s in SCHEDULERS)
        what = "is not in dreamlab" if name.strip().lower() in _SUFFIXES else "is not a scheduler"
        raise InvalidRequestError(f"scheduler: {name!r} {what}; supported: {known}")
    return found


def choose_sampler(sampler_name: str | None, scheduler: str | None) -> SamplerChoice:
    """A1111's sampler name (or an older combined one, "DPM++ 2M Karras": the scheduler's name or label
    after a space, which wins over ``scheduler`` as in A1111) and scheduler -> dreamlab's. Names are matched
    without regard to case. Raises UnknownNameError for an unknown sampler, InvalidRequestError for a
    scheduler dreamlab lacks."""
    name = (sampler_name or "").strip()
    chosen = _scheduler(scheduler or "automatic")
    if not name:
        return SamplerChoice(None, chosen)
    key = name.lower()
    if key in _KARRAS_ALIASES:
        key, chosen = _KARRAS_ALIASES[key].lower(), _scheduler("karras")
    elif key not in _SAMPLER_BY_NAME:
        suffix = next((s for s in _SUFFIXES if key.endswith(" " + s)), None)
        if suffix is not None:
            key, chosen = key[: -len(suffix) - 1].strip(), _scheduler(name[-len(suffix):])
    if key not in _SAMPLER_BY_NAME:
        known = ", ".join(s.name for s in SAMPLERS)
        raise UnknownNameError(f"sampler_name: {name!r} is not a sampler dreamlab has; known: {known} "
                               "(a scheduler may follow the name: 'DPM++ 2M Karras')")
    return SamplerChoice(_SAMPLER_BY_NAME[key], chosen)


def a1111_sampler_name(sampler: str) -> str:
    """dreamlab's sampler name -> A1111's (dreamlab's own where A1111 has none, e.g. ddpm)."""
    return next((s.name for s in SAMPLERS if s.sampler == sampler), sampler)


def a1111_scheduler_label(schedule: str | None) -> str:
    return next((s.label for s in SCHEDULERS if s.schedule == schedule), schedule or "Automatic")


# --- requests ----------------------------------------------------------------------------------------


class A1111Request(BaseModel):
    """The fields txt2img and img2img share (A1111's StableDiffusionProcessing), with A1111's defaults
    except where a field left out means the model's default (None)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int | None = Field(-1, description="-1: random")
    subseed: int | None = -1
    subseed_strength: float | None = 0
    seed_resize_from_h: int | None = -1
    seed_resize_from_w: int | None = -1
    sampler_name: str | None = Field(None, description="an A1111 name ('Euler a', 'DPM++ 2M', ...; "
                                     "'DPM++ 2M Karras' picks the scheduler too); None: the model's default")
    sampler_index: str | None = Field(None, description="the older name of sampler_name, read when it is empty")
    scheduler: str | None = Field(None, description="'Automatic' (the model's default), 'Karras', 'Uniform', "
                                  "'SGM Uniform', 'DDIM'")
    batch_size: int | None = 1
    n_iter: int | None = Field(1, description="runs of batch_size images: one job of batch_size x n_iter images")
    steps: int | None = Field(None, description="None: the model's default")
    cfg_scale: float | None = Field(None, description="None: the model's default")
    width: int | None = Field(None, description="None: the model's default")
    height: int | None = Field(None, description="None: the model's default")
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool | None = False
    do_not_save_grid: bool | None = False
    eta: float | None = Field(None, description="noise of Euler a, DDIM and DPM++ 2M SDE; ignored by the others")
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = Field(None, description="only settings equal to /options's")
    override_settings_restore_afterwards: bool | None = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool | None = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    script_name: str | None = None
    script_args: list[Any] | None = Field(default_factory=list)
    send_images: bool | None = True
    save_images: bool | None = False
    alwayson_scripts: dict[str, Any] | None = Field(default_factory=dict)
    force_task_id: str | None = None
    infotext: str | None = None


class Txt2ImgRequest(A1111Request):
    enable_hr: bool | None = False
    denoising_strength: float | None = Field(0.75, description="hires fix only: ignored")
    firstphase_width: int | None = 0
    firstphase_height: int | None = 0
    hr_scale: float | None = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int | None = 0
    hr_resize_x: int | None = 0
    hr_resize_y: int | None = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str | None = ""
    hr_negative_prompt: str | None = ""


class Img2ImgRequest(A1111Request):
    init_images: list[str] | None = Field(None, description="one base64 PNG or JPEG (a data: URL works too)")
    resize_mode: int | None = Field(0, description="0 (just resize) only")
    denoising_strength: float | None = Field(0.75, description="share of the schedule re-run")
    image_cfg_scale: float | None = None
    mask: str | None = Field(None, description="inpainting mask, base64: white = repaint")
    mask_blur_x: int | None = 4
    mask_blur_y: int | None = 4
    mask_blur: int | None = Field(None, description="Gaussian blur of the mask (sigma, pixels); sets both x and y")
    mask_round: bool | None = True
    inpainting_fill: int | None = Field(0, description="0: fill the masked area from around it; 1: original")
    inpaint_full_res: bool | None = Field(True, description="with a mask: false only (inpaint the whole picture)")
    inpaint_full_res_padding: int | None = 0
    inpainting_mask_invert: int | None = Field(0, description="1: repaint what the mask leaves black")
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool | None = Field(False, description="echo init_images and mask in parameters")


# --- what dreamlab cannot honour --------------------------------------------------------------------


@dataclass(frozen=True)
class NoOp:
    """A field dreamlab lacks, and the values at which it changes nothing (``values``, which the OpenAPI
    schema lists; or, where that is no list, ``changes_nothing``)."""

    field: str
    values: tuple[Any, ...]
    why: str
    changes_nothing: Callable[[Any, A1111Request], bool] | None = None

    def accepts(self, req: A1111Request) -> bool:
        value = getattr(req, self.field)
        return self.changes_nothing(value, req) if self.changes_nothing is not None else value in self.values


NO_OPS: tuple[NoOp, ...] = (
    NoOp("enable_hr", (None, False), "hires fix is not in dreamlab (`dreamlab upscale` and cascade models are)"),
    NoOp("firstphase_width", (None, 0), "hires fix is not in dreamlab"),
    NoOp("firstphase_height", (None, 0), "hires fix is not in dreamlab"),
    NoOp("firstpass_image", (None, ""), "hires fix is not in dreamlab"),
    NoOp("restore_faces", (None, False), "face restoration is not in dreamlab"),
    NoOp("tiling", (None, False), "tiling is not in dreamlab"),
    NoOp("styles", (None, []), "prompt styles are not in dreamlab"),
    NoOp("subseed_strength", (None, 0), "variation seeds are not in dreamlab"),
    NoOp("seed_resize_from_h", (), "seed resizing is not in dreamlab", lambda value, req: value is None or value <= 0),
    NoOp("seed_resize_from_w", (), "seed resizing is not in dreamlab", lambda value, req: value is None or value <= 0),
    NoOp("s_churn", (None, 0), "dreamlab's samplers take no churn"),
    NoOp("s_noise", (None, 1), "dreamlab's samplers take no noise scaling"),
    NoOp("s_min_uncond", (None, 0), "skipping the negative prompt at low noise is not in dreamlab"),
    NoOp("refiner_checkpoint", (None, "", "None"), "refiner models are not in dreamlab"),
    NoOp("script_name", (None, ""), "scripts are not in dreamlab"),
    NoOp("script_args", (None, []), "scripts are not in dreamlab"),
    NoOp("alwayson_scripts", (None, {}), "extensions' scripts are not in dreamlab"),
    NoOp("infotext", (None, ""), "dreamlab does not read an infotext: send its fields"),
    NoOp("resize_mode", (None, 0), "only resize mode 0 (just resize) is in dreamlab"),
    NoOp("inpainting_fill", (None, 0, 1), "only 0 (fill) and 1 (original) are in dreamlab"),
    NoOp("inpaint_full_res", (), "dreamlab inpaints the whole picture ('Only masked' is not in it): send false",
         lambda value, req: not value or getattr(req, "mask", None) is None),
    NoOp("mask_round", (None, True), "dreamlab's latent mask is always hard"),
    NoOp("initial_noise_multiplier", (None, 1), "the initial noise multiplier is not in dreamlab"),
    NoOp("latent_mask", (None, ""), "a separate latent mask is not in dreamlab"),
)


@dataclass(frozen=True)
class Settings:
    """What this server shows as A1111's options, the names its one checkpoint answers to, and the
    sampler a request without one gets."""

    options: dict[str, Any]
    checkpoint_names: frozenset[str]
    default_sampler: str


def refused(req: A1111Request, settings: Settings) -> list[str]:
    """Every field set to something dreamlab cannot do, as 'field=value: why'; ``override_settings``
    entries pass only where they change nothing."""
    problems = [f"{n.field}={getattr(req, n.field)!r}: {n.why}" for n in NO_OPS
                if n.field in type(req).model_fields and not n.accepts(req)]
    problems += refused_settings(req.override_settings or {}, settings, "override_settings.")
    return problems


def refused_settings(changes: dict[str, Any], settings: Settings, prefix: str = "") -> list[str]:
    """Settings dreamlab cannot change: any but those equal to its options (the checkpoint also by its
    model name or hash)."""
    problems = []
    options = settings.options
    for key, value in changes.items():
        if key == "sd_model_checkpoint" and value in settings.checkpoint_names:
            continue
        if key in options and value == options[key]:
            continue
        now = f"it is {options[key]!r} on this server and cannot be changed" if key in options else "not a setting dreamlab has"
        problems.append(f"{prefix}{key}={value!r}: {now}")
    return problems


# --- the translation --------------------------------------------------------------------------------

# GenerationRequest's names in messages -> A1111's
_RENAMED = {"batch": "batch_size x n_iter", "strength": "denoising_strength", "init_image": "init_images[0]",
            "mask_image": "mask", "sampler": "sampler_name", "schedule": "scheduler"}


def a1111_message(message: str) -> str:
    """A GenerationRequest / server check message with each part's leading field named as in A1111."""
    parts = []
    for part in message.split("; "):
        name, sep, rest = part.partition(":")
        parts.append(_RENAMED[name] + sep + rest if sep and name in _RENAMED else part)
    return "; ".join(parts)


def translate(req: A1111Request, settings: Settings) -> GenerationRequest:
    """The GenerationRequest an A1111 request asks for. Raises UnknownNameError (an unknown sampler; A1111
    answers 404) or InvalidRequestError (everything else wrong, in one line)."""
    choice = choose_sampler(req.sampler_name or req.sampler_index, req.scheduler)
    problems = refused(req, settings)
    if problems:
        raise InvalidRequestError("; ".join(problems))
    sampler = choice.sampler.sampler if choice.sampler is not None else None
    fields: dict[str, Any] = dict(
        prompt=req.prompt, negative_prompt=req.negative_prompt, seed=None if req.seed in (None, -1) else req.seed,
        steps=req.steps, sampler=sampler, schedule=choice.scheduler.schedule, cfg_scale=req.cfg_scale,
        width=req.width, height=req.height,
        batch=(1 if req.batch_size is None else req.batch_size) * (1 if req.n_iter is None else req.n_iter),
        # A1111 passes eta to the samplers that take it and ignores it for the others
        eta=req.eta if req.eta is not None and takes_eta(sampler or settings.default_sampler) else None,
    )
    if isinstance(req, Img2ImgRequest):
        fields.update(img2img_inputs(req))
    try:
        return make_request(**fields)
    except InvalidRequestError as e:
        raise InvalidRequestError(a1111_message(str(e))) from None


def img2img_inputs(req: Img2ImgRequest) -> dict[str, Any]:
    """init_image, mask_image and strength from A1111's init_images, mask and its options (binarized,
    inverted, blurred; the masked area filled for inpainting_fill 0) as the job will record them."""
    if not req.init_images:
        raise InvalidRequestError("init_images: img2img needs an image")
    if len(req.init_images) > 1:
        raise InvalidRequestError(f"init_images: dreamlab takes one init image, not {len(req.init_images)}")
    init = req.init_images[0]
    fields: dict[str, Any] = {"init_image": init, "strength": 0.75 if req.denoising_strength is None else req.denoising_strength}
    if req.mask is None:
        return fields
    mask = binary_mask(open_image(image_bytes(req.mask, "mask"), "mask"))
    if req.inpainting_mask_invert:
        mask = ImageOps.invert(mask)
    if not req.inpainting_fill:  # 0, "fill": the hole's colours from around it, before the mask is blurred
        source = open_image(image_bytes(init, "init_images[0]"), "init_images[0]")
        fields["init_image"] = encode_image(fill_masked(source, mask))
    blur = (req.mask_blur, req.mask_blur) if req.mask_blur is not None else (req.mask_blur_x or 0, req.mask_blur_y or 0)
    if max(blur) > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    fields["mask_image"] = encode_image(mask)
    return fields


def binary_mask(image: Image.Image) -> Image.Image:
    """A1111's reading of a mask: its alpha if it has transparent pixels, else its luminance; white
    (above half) repaints."""
    if image.mode in ("RGBA", "LA", "PA") and image.getextrema()[-1] != (255, 255):
        image = image.getchannel("A")
    return image.convert("L").point(lambda v: 255 if v > 128 else 0)


def fill_masked(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The masked pixels replaced by the colours around them (A1111's inpainting_fill 0): push-pull
    interpolation (Gortler et al. 1996): average the known pixels down a pyramid, then fill each level's
    holes from the coarser level on the way back up. Known pixels keep their values exactly."""
    rgba = torch.from_numpy(np.asarray(image.convert("RGBA"), dtype=np.float32).copy()).permute(2, 0, 1)[None]
    hole = np.asarray(mask.resize(image.size, Image.NEAREST)) > 127
    known = torch.from_numpy(~hole).float()[None, None]  # (1, 1, H, W)
    if not known.any():
        return image  # nothing to take colours from
    levels = [(rgba * known, known)]  # (known-weighted colours, weight) per level
    while max(levels[-1][1].shape[-2:]) > 1:
        colours, weight = levels[-1]
        levels.append((torch.nn.functional.avg_pool2d(colours, 2, ceil_mode=True),
                       torch.nn.functional.avg_pool2d(weight, 2, ceil_mode=True)))
    colours, weight = levels[-1]
    filled = colours / weight.clamp_min(1e-8)
    for colours, weight in reversed(levels[:-1]):
        coarse = torch.nn.functional.interpolate(filled, size=colours.shape[-2:], mode="bilinear", align_corners=False)
        filled = colours + (1 - weight) * coarse  # weight 1: the known average; 0: the coarser estimate
    out = filled[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(out, "RGBA")
