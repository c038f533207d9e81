"""GenerationRequest -> images + manifests: the one path every task takes (ARCHITECTURE.md).

``generate`` composes the seams and holds no task logic: a request runs on its own view of the model
(patches applied, undone afterwards), its inputs become model wrappers (``StageInput``), its prompts a
guider, and then the one sampling loop runs image by image.
"""

from __future__ import annotations

import math
import platform
import secrets
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from . import __version__
from .adapters.provider import adapter_patches
from .imagic import imagic_patches
from .control.concat import LowResInput
from .control.controlnet import control_inputs
from .compose.plan import Plan
from .compose.plan import build as build_plan
from .compose.plan import check as check_plan
from .control.inpaint import inpaint
from .core.guidance import dynamic_threshold
from .core.noise import MAX_SEED, NoiseSource, stream_seed
from .core.samplers import get_sampler, keeps_steps, prior_std, takes_eta
from .core.schedules import truncate
from .core.types import DenoiseFn, ModelWrapper, StepCallback
from .errors import InvalidRequestError
from .images import resize, to_pil
from .manifest import AdapterRecord, Manifest, ModelRecord, StageRecord
from .models.bundle import ModelBundle
from .models.patches import Patch, patched
from .request import (  # noqa: F401  (re-exported: the request API has always been importable from here)
    INPUT_IMAGES, INPUTS, MAX_BATCH, MAX_IMAGE_B64_CHARS, MAX_PART_WEIGHT, MAX_PROMPT_CHARS, MAX_PROMPT_PARTS,
    MAX_SIDE, MAX_STEPS, GenerationRequest, InputImage, decode_image, encode_image, format_validation_error,
    image_bytes, image_sha256, make_request, open_image, recorded, split_prompt,
)

@dataclass
class Result:
    images: list[Image.Image]
    manifests: list[dict[str, Any]]  # the records' JSON form, as PNGs carry them
    latents: torch.Tensor = field(repr=False)  # final sampler state
    pixels: torch.Tensor = field(repr=False)  # decoded images, (B, C, H, W) in [-1, 1]
    notes: list[str] = field(default_factory=list)  # what the user should know (an input was resized, ...)
    records: list[Manifest] = field(default_factory=list, repr=False)  # the typed manifests
    # an edit's sources (generated beside it, or the given image reconstructed) with their own manifests,
    # and its masks (local blend's or DiffEdit's; None where there is none)
    sources: list[Image.Image] = field(default_factory=list, repr=False)
    source_manifests: list[dict[str, Any]] = field(default_factory=list, repr=False)
    masks: list[Image.Image | None] = field(default_factory=list, repr=False)
    attention: list[Image.Image | None] = field(default_factory=list, repr=False)  # an edit's attention-map sheets
    layers: list[list[Image.Image]] = field(default_factory=list, repr=False)  # a collage's RGBA layers, per image

    def gallery_items(self) -> list[tuple[Image.Image, Manifest]]:
        """What a server keeps of it: the images, an edit's sources, and its attention sheets (marked as
        such in their manifests, so that replay knows them for what they are)."""
        items = list(zip(self.images, self.records))
        items += [(im, Manifest.load(m)) for im, m in zip(self.sources, self.source_manifests)]
        items += [(im, r.model_copy(update={"artifact": "attention"})) for im, r in zip(self.attention, self.records)
                  if im is not None]
        items += [(im, r.model_copy(update={"artifact": f"layer {k}"})) for layers, r in zip(self.layers, self.records)
                  for k, im in enumerate(layers)]
        return items


# Patches a request asks for (LoRA, embeddings, attention control) come from providers registered here:
# each maps (model, request) to the patches it needs. generate() applies them to the request's view.
PatchProvider = Callable[[ModelBundle, GenerationRequest], Sequence[Patch]]
PATCH_PROVIDERS: list[PatchProvider] = [adapter_patches, imagic_patches]


class StageInput(Protocol):
    """An input of a stage that reaches the network at every call (a model wrapper per image)."""

    def model_wrapper(self, i: int, noise: NoiseSource, sigmas: torch.Tensor) -> ModelWrapper: ...


def route(model: ModelBundle, req: GenerationRequest) -> ModelBundle:
    """The model that runs ``req``: ``model``, or, for a request with a source image to edit by instruction
    when ``model`` takes none, the instruction-editing model made from it (``ModelBundle.instruction_model``),
    so that `generate --source-image`, the HTTP API and the web UI reach it through the default model."""
    if req.source_image is not None and "source_image" not in model.inputs and model.sr is None \
            and model.upscaler is None:
        return model.instruction_model() or model
    return model


def resolve(model: ModelBundle, req: GenerationRequest) -> GenerationRequest:
    """The request with the model's defaults in place of what it leaves unset (sampler, steps, CFG, schedule)."""
    model = route(model, req)
    d = model.defaults
    # editing a given image inverts it: it samples deterministically (DDIM) unless told otherwise
    sampler = "ddim" if req.edit is not None and req.init_image is not None else d.sampler
    unset = {k: v for k, v in (("sampler", sampler), ("steps", d.steps), ("cfg_scale", d.cfg_scale),
                               ("schedule", d.schedule)) if getattr(req, k) is None}
    if "source_image" in model.inputs and req.image_cfg_scale is None:
        unset["image_cfg_scale"] = d.image_cfg_scale
    return req.model_copy(update=unset) if unset else req


def _sampler_options(req: GenerationRequest) -> dict[str, Any]:
    if req.eta is None:
        return {}
    if not takes_eta(req.sampler):
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


def _upscale(model: ModelBundle) -> int:
    """How much a cascade's SR stage enlarges its base model's images (1 for other models)."""
    return model.upscaler.sample_size // model.sample_size if model.upscaler is not None else 1


def check_request(model: ModelBundle, req: GenerationRequest) -> tuple[int, int]:
    """What a valid request can still get wrong against a particular model; the output (width, height).
    Raises InvalidRequestError. Cheap: decodes no image and runs no network."""
    model = route(model, req)
    req = resolve(model, req)
    final = model.upscaler or model
    width, height = req.width or final.sample_size, req.height or final.sample_size
    if req.outpaint is not None:  # the canvas: the init image (its header) grown by the pads
        from .compose.outpaint import check_outpaint

        width, height = check_outpaint(model, req)
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
    if req.controls:
        if model.sr is not None:
            raise InvalidRequestError("controls are for text-to-image models; this is a super-resolution model")
        have = model.controlnets()
        for c in req.controls:
            if c.condition not in have:
                model.controlnet(c.condition)  # raises the one line that says how to get one
    _sampler_options(req)
    check_plan(model, req, width // k, height // k)
    if req.edit is not None:
        from .edit import check_edit

        check_edit(model, req)
    if req.collage is not None:
        from .compose.collage import check_collage

        check_collage(model, req, width, height)
    return width, height


def sr_factor(model: ModelBundle) -> int:
    """How many times a super-resolution model enlarges its input (per side)."""
    assert model.sr is not None
    return max(1, model.sample_size // model.sr.from_size)


def _noise_level(model: ModelBundle, req: GenerationRequest) -> int:
    assert model.sr is not None
    return req.noise_level if req.noise_level is not None else model.sr.noise_level


SR_STAGE_STREAM = 1 << 40  # a cascade's SR stage draws its noise from stream_seed(seed, this)


@dataclass
class _Stage:
    """One sampler run per image: a model, its output size, per-image seeds and its inputs."""

    model: ModelBundle
    width: int
    height: int
    seeds: list[int]
    sigmas: torch.Tensor
    inputs: list[StageInput] = field(default_factory=list)  # reach the network at every call
    noise_level: int | None = None  # recorded in the manifest (super-resolution)
    plan: Plan | None = None  # cells, guiders and hooks of the canvas (compose/plan.py)


def _run_stage(stage: _Stage, req: GenerationRequest, source, mask, progress) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Sampler states and decoded images (B, C, H, W) of one stage, image by image."""
    model, sigmas, plan = stage.model, stage.sigmas, stage.plan
    options = _sampler_options(req)
    sampler = get_sampler(req.sampler)
    f = model.space.factor
    shape = (model.space.channels, stage.height // f, stage.width // f)
    known = model.space.encode(source.to(model.device)) if source is not None else None
    keep = None
    if mask is not None:
        small = torch.nn.functional.interpolate(mask, size=shape[1:], mode="area").to(model.device)
        keep = (small > 0.01).float()
    states = []
    for i, seed in enumerate(stage.seeds):
        noise = NoiseSource([seed], shape, device=model.device)
        base = model.denoiser([inp.model_wrapper(i, noise, sigmas) for inp in stage.inputs], sigmas=sigmas)
        denoise: DenoiseFn = plan.denoiser(base)
        if req.dynamic_threshold is not None:
            denoise = dynamic_threshold(denoise, req.dynamic_threshold)
        z = noise.initial()
        if known is None:
            x = z * prior_std(float(sigmas[0]))
        else:
            if keep is not None:
                denoise = inpaint(denoise, known, keep, z)
            x = known + z * float(sigmas[0])
        on_step = _hooked(plan.hooks(noise), progress)
        states.append(sampler(denoise, x, sigmas, noise=noise, on_step=on_step, **options) if len(sigmas) > 1 else x)
    images = torch.cat([model.space.decode(s) for s in states])
    return states, images


def img2img_sigmas(model: ModelBundle, req: GenerationRequest) -> torch.Tensor:
    """The grid of img2img at ``req.strength``: the tail of the full grid (diffusers' img2img), or, for a
    sampler that keeps its steps (a consistency sampler), all ``req.steps`` steps below that level."""
    if keeps_steps(req.sampler):
        return model.schedule.sigmas_below(req.steps, req.schedule, req.strength)
    return truncate(model.schedule.sigmas_for(req.steps, req.schedule), req.strength)


def _hooked(hooks: list, progress):
    """The sampler's on_step: state hooks in order (each may replace the state), then the progress."""
    if not hooks:
        return progress

    def on_step(info):
        x = None
        for hook in hooks:
            out = hook(replace(info, x=x) if x is not None else info)
            x = out if out is not None else x
        progress(info if x is None else replace(info, x=x))
        return x

    return on_step


def _lowres_input(model: ModelBundle, pixels: list[torch.Tensor], level: int) -> LowResInput:
    return LowResInput([model.space.encode(p.to(model.device)) for p in pixels], level, model.schedule)


def generate(model: ModelBundle, request: GenerationRequest, *, on_step: StepCallback | None = None,
             patches: Sequence[Patch] = (), inputs: Sequence[StageInput] = ()) -> Result:
    """Images for ``request``; image i of a batch is bit-identical to generating it alone with seed + i.

    The request runs on a view of ``model`` with ``patches`` (and those the registered providers give
    for it) applied, and undone when it returns or fails; ``inputs`` reach the (first stage's) network at
    every call as model wrappers. The prompt encodings and input latents are
    computed once; then each image of the batch gets its own batch-1 sampler run and decode. Batched
    forwards are not bit-identical to single ones on every CPU (oneDNN and BLAS pick their blocking by
    batch size; seen on an AMD EPYC machine where an Intel one had agreed), and `dreamlab replay` must
    reproduce any image of a batch from its own manifest. Progress runs over the whole batch (steps x
    images x stages).

    A cascade (``model.upscaler``) runs its base model at 1/k of the output size, then its
    super-resolution stage on each image, with noise from ``stream_seed(seed + i, SR_STAGE_STREAM)``.
    """
    model = route(model, request)
    req = resolve(model, request)
    width, height = check_request(model, req)
    seed = req.seed if req.seed is not None else secrets.randbelow(2**31)
    req = req.model_copy(update={"seed": seed})
    seeds = [seed + i for i in range(req.batch)]
    wanted = [p for provide in PATCH_PROVIDERS for p in provide(model, req)]
    with patched(model, [*patches, *wanted]) as view:
        for name, runner in TASKS.items():  # tasks with a run of their own
            if getattr(req, name) is not None:
                return _task(runner)(view, req, width, height, on_step, seeds)
        return _generate(view, req, width, height, on_step, inputs, seeds)


# Request fields that ask for a task with its own run (a joint run, an inversion), and its runner.
TASKS: dict[str, str] = {"edit": "dreamlab.edit:run_edit", "collage": "dreamlab.compose.collage:run_collage",
                         "outpaint": "dreamlab.compose.outpaint:run_outpaint"}


def _task(target: str):
    import importlib

    module, _, fn = target.partition(":")
    return getattr(importlib.import_module(module), fn)


def _records(model: ModelBundle, req: GenerationRequest, seeds: list[int], width: int, height: int, sigmas,
             **more: Any) -> list[Manifest]:
    """The manifest of each image of a request (seed fixed, batch of one each)."""
    rec = recorded(req.model_dump())  # input images hashed once for the whole batch
    adapters = [*model.applied_adapters, *(more.pop("adapters", None) or [])]  # LoRAs, embeddings; ControlNets
    common = dict(
        dreamlab_version=__version__, torch_version=torch.__version__, platform=platform.machine(),
        model=ModelRecord(name=model.name, source=model.source, files=model.files, prediction=model.prediction.value),
        sampler=req.sampler, sigmas=[float(s) for s in sigmas], width=width, height=height,
        adapters=adapters or None, **more,
    )
    return [Manifest(**common, seed=s, batch_index=i, request={**rec, "seed": s, "batch": 1}) for i, s in enumerate(seeds)]


def _generate(model: ModelBundle, req: GenerationRequest, width: int, height: int, on_step: StepCallback | None,
              inputs: Sequence[StageInput], seeds: list[int]) -> Result:
    k = _upscale(model)
    base = _Stage(model, width // k, height // k, seeds, model.schedule.sigmas_for(req.steps, req.schedule), list(inputs))
    stages = [base]
    if model.upscaler is not None:
        sr = model.upscaler
        stages.append(_Stage(sr, width, height, [stream_seed(s, SR_STAGE_STREAM) for s in seeds],
                             sr.schedule.sigmas_for(req.steps, req.schedule), noise_level=_noise_level(sr, req)))
    source, mask = _load_inputs(req, model, width, height)
    base.plan = build_plan(model, req, width // k, height // k, decode_image)
    if len(stages) > 1:  # the composition is the base's; the SR stage enlarges what it made
        plain = req.model_copy(update={"regions": [], "window": None, "illusion": None, "ilvr": None})
        stages[1].plan = build_plan(stages[1].model, plain, width, height, decode_image)
    controls, notes = control_inputs(model, req, width // k, height // k, decode_image)
    notes = [*base.plan.notes, *notes]
    base.inputs += controls
    if source is not None:
        # SDEdit (Meng et al. 2021): noise the source to a level part-way down the schedule, denoise from there
        base.sigmas = img2img_sigmas(model, req)
        if len(base.sigmas) == 1 and req.strength > 0:
            notes.append(f"strength {req.strength:g} keeps no step of the {req.steps}-step grid: the image comes back "
                         "unchanged; raise the strength or the steps")

    total = sum(len(st.sigmas) - 1 for st in stages) * req.batch
    done = [0]

    def progress(info) -> None:  # one bar over the whole request
        done[0] += 1
        if on_step is not None:
            on_step(replace(info, i=done[0] - 1, total=total))

    with torch.inference_mode():
        if model.sr is not None:
            k_sr = sr_factor(model)
            low = _to_tensor(decode_image(req.lowres_image, "lowres_image"), model.space.image_channels, width // k_sr, height // k_sr)
            base.noise_level = _noise_level(model, req)
            base.inputs.append(_lowres_input(model, [resize(low, (height, width))], base.noise_level))  # one for all
        states, images = _run_stage(base, req, source, mask, progress)
        if mask is not None:  # keep the known pixels exactly, not only their latents
            m = mask.to(images.device)
            images = images * m + source.to(images.device) * (1 - m)
        if len(stages) > 1:
            lows = [resize(im.unsqueeze(0).float().cpu(), (height, width)) for im in images.clamp(-1, 1)]
            stages[1].inputs.append(_lowres_input(stages[1].model, lows, stages[1].noise_level))
            states, images = _run_stage(stages[1], req, None, None, progress)
        state = torch.cat(states)

    records = _records(
        model, req, seeds, width, height, base.sigmas, noise_level=base.noise_level,
        stages=[StageRecord(stage=name, width=st.width, height=st.height, sigmas=[float(s) for s in st.sigmas],
                            noise_level=st.noise_level)
                for name, st in zip(("base", "super_resolution"), stages)] if len(stages) > 1 else None,
        adapters=[AdapterRecord(kind="controlnet", name=c.condition, source=str(folder), files=files)
                  for c in req.controls for _, folder, files in [model.controlnet(c.condition)]] or None,
    )
    return Result(images=to_pil(images), manifests=[r.dump() for r in records], latents=state,
                  pixels=images.clamp(-1, 1), records=records, notes=notes)
