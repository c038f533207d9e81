"""Outpainting: extend an image beyond its borders, the known part kept, the seam hidden
(docs/composition.md measures the seam).

The request's ``init_image`` is the image to extend; the canvas grows by ``left/top/right/bottom``
pixels and the image is placed in it. Plain replacement inpainting of the new area (the known latents
re-imposed at every step, the new ones free from the first) leaves a visible seam on the emoji model:
at high noise the known part is drowned, each window draws an object of its own, and that object ends
in a straight line where the known region is pasted over it. Three pieces hide it:

1. ``fill``: the new area starts from the image's border pixels carried outward ("edge"; or
   "transparent", an empty canvas), not from an unrelated background.
2. ``ramp``: a strength per pixel (differential diffusion, Levin & Fried 2023; the per-pixel
   strengths of ``strength.py``) rising from ``min_strength`` at the seam to 1 at ``ramp`` pixels
   from it: next to the known part the new pixels are re-imposed from the fill until the noise is
   low, so they continue the image; far from it they are free from the start. ``ramp`` 0 is
   replacement inpainting.
3. ``blend``: the known pixels pasted back with a feathered band of that many pixels on the known
   side (``feather.py``); beyond it the known region is the source exactly.

Optional, measured but not the default: ``resample`` (RePaint, ``repaint.py``) and ``harmonize``
(a second, low-strength pass over the ``HARMONIZE_BAND`` pixels of the new area next to the seam).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

MAX_PAD = 2048
HARMONIZE_BAND = 8  # pixels of the new area next to the seam that the harmonisation pass re-draws
HARMONIZE_STREAM = 1 << 46  # that pass's noise: stream_seed(seed, this)


class OutpaintSpec(BaseModel):
    """How far to extend the request's ``init_image`` on each side, and how to hide the seam."""

    model_config = ConfigDict(extra="forbid")

    left: int = Field(0, ge=0, le=MAX_PAD, description="pixels added on the left")
    top: int = Field(0, ge=0, le=MAX_PAD)
    right: int = Field(0, ge=0, le=MAX_PAD)
    bottom: int = Field(0, ge=0, le=MAX_PAD)
    fill: Literal["edge", "transparent"] = Field(
        "edge", description="what the new area starts from: the border pixels carried outward, or transparency")
    ramp: int = Field(32, ge=0, le=MAX_PAD, description="pixels over which the new area's strength rises to 1 "
                      "(0: free at once, replacement inpainting)")
    min_strength: float = Field(0.4, ge=0.0, le=1.0, description="the strength of the new pixels next to the seam")
    blend: int = Field(4, ge=0, le=64, description="feathered band in pixels on the known side; beyond it "
                       "the known pixels are kept exactly")
    resample: int = Field(0, ge=0, le=8, description="RePaint: times each step is noised back and re-taken")
    harmonize: float = Field(0.0, ge=0.0, le=1.0, description="strength of a second pass over the seam band (0: none)")


@dataclass(frozen=True)
class Canvas:
    """The known image (w x h) placed at (left, top) in a canvas grown by the pads."""

    w: int
    h: int
    left: int
    top: int
    right: int
    bottom: int

    @property
    def size(self) -> tuple[int, int]:
        return self.w + self.left + self.right, self.h + self.top + self.bottom

    def _grid(self):
        width, height = self.size
        return np.mgrid[0:height, 0:width]

    def outside(self) -> np.ndarray:
        """(H, W) how far each pixel lies outside the known box (Chebyshev, 1 next to it; 0 inside)."""
        ys, xs = self._grid()
        return np.maximum.reduce([self.left - xs, xs - (self.left + self.w - 1), self.top - ys,
                                  ys - (self.top + self.h - 1), np.zeros_like(xs)])

    def inside(self) -> np.ndarray:
        """(H, W) how deep each known pixel lies from the new area (1 at the seam; sides that were not
        extended are the canvas's edge, no seam); 0 in the new area."""
        ys, xs = self._grid()
        far = np.full(xs.shape, np.iinfo(np.int64).max // 2)
        depth = far.copy()
        for pad, d in ((self.left, xs - self.left + 1), (self.right, self.left + self.w - xs),
                       (self.top, ys - self.top + 1), (self.bottom, self.top + self.h - ys)):
            if pad > 0:
                depth = np.minimum(depth, d)
        return np.where(self.outside() > 0, 0, depth)

    def strength(self, ramp: int, floor: float) -> torch.Tensor:
        """(1, 1, H, W) per-pixel strength: 0 on the known image, ``floor`` next to it, 1 from ``ramp`` out."""
        d = torch.from_numpy(self.outside().astype(np.float32))
        rise = torch.ones_like(d) if ramp <= 0 else (d / ramp).clamp(max=1.0)
        return torch.where(d > 0, floor + (1 - floor) * rise, torch.zeros_like(d))[None, None]

    def place(self, image, fill: str):
        """The canvas with the image in its box and the new area filled."""
        from PIL import Image

        a = np.asarray(image.convert("RGBA"))
        pads = ((self.top, self.bottom), (self.left, self.right), (0, 0))
        if fill == "edge":
            return Image.fromarray(np.pad(a, pads, mode="edge"), "RGBA")
        return Image.fromarray(np.pad(a, pads, mode="constant"), "RGBA")


def canvas_of(req) -> Canvas:
    """The canvas of an outpainting request (the init image's header is read, not its pixels)."""
    from ..request import image_bytes, open_image

    spec = req.outpaint
    w, h = open_image(image_bytes(req.init_image, "init_image"), "init_image", load=False).size
    return Canvas(w, h, spec.left, spec.top, spec.right, spec.bottom)


def check_outpaint(model, req) -> tuple[int, int]:
    """The output size (the canvas), or one line saying what is wrong."""
    from ..errors import InvalidRequestError

    spec = req.outpaint
    if req.init_image is None:
        raise InvalidRequestError("outpaint: give the image to extend as init_image")
    if not any((spec.left, spec.top, spec.right, spec.bottom)):
        raise InvalidRequestError("outpaint: give at least one of left, top, right, bottom (pixels)")
    if req.mask_image is not None or req.edit is not None or req.collage is not None or req.illusion is not None \
            or req.controls or req.lowres_image is not None:
        raise InvalidRequestError("outpaint: no mask_image (the new area is the mask), edit, collage, illusion, "
                                  "controls or lowres_image")
    width, height = canvas_of(req).size
    if (req.width or width) != width or (req.height or height) != height:
        raise InvalidRequestError(f"outpaint: the canvas is {width}x{height} (the image grown by the pads); "
                                  "leave width and height unset")
    return width, height


def run_outpaint(model, req, width: int, height: int, on_step, seeds: list[int]):
    from dataclasses import replace

    from ..core.guidance import dynamic_threshold
    from ..core.noise import NoiseSource, stream_seed
    from ..core.samplers import get_sampler
    from ..core.schedules import truncate
    from ..generate import Result, _hooked, _records, _sampler_options, _to_tensor
    from ..images import to_pil
    from ..request import decode_image
    from .feather import feather_weight, paste
    from .plan import build
    from .repaint import RePaint
    from .strength import StrengthMap

    spec = req.outpaint
    geo = canvas_of(req)
    canvas = geo.place(decode_image(req.init_image, "init_image"), spec.fill)
    f = model.space.factor
    big = width > model.sample_size or height > model.sample_size  # windows of the model's own size
    plain = req.model_copy(update={"outpaint": None, "init_image": None, "width": width, "height": height,
                                   "window": req.window or (model.sample_size if big else None)})
    plan = build(model, plain, width, height, decode_image)
    full = model.schedule.sigmas_for(req.steps, req.schedule)
    strength = geo.strength(spec.ramp, spec.min_strength)
    grid = truncate(full, float(strength.max()))
    s_lat = torch.nn.functional.max_pool2d(strength, f).to(model.device)  # as free as its freest pixel
    outside = torch.from_numpy(geo.outside().astype(np.float32))[None, None]
    weight = feather_weight(torch.from_numpy(geo.inside().astype(np.float32))[None, None], spec.blend).to(model.device)
    # the harmonisation pass: its strength on the band next to the seam, and where its decoded pixels are
    # taken (the band, then fading over one latent cell; the known side as the first pass left it)
    band = ((outside > 0) & (outside <= HARMONIZE_BAND)).float()
    again_lat = (torch.nn.functional.max_pool2d(band, f) * spec.harmonize).to(model.device)
    again_weight = torch.where(outside > 0, ((HARMONIZE_BAND + f + 1 - outside) / (f + 1)).clamp(0, 1), 0.0).to(model.device)
    sampler, options = get_sampler(req.sampler), _sampler_options(req)
    shape = (model.space.channels, height // f, width // f)
    total = (len(grid) - 1 + (len(truncate(full, spec.harmonize)) - 1 if spec.harmonize > 0 else 0)) * len(seeds)
    done = [0]

    def progress(info) -> None:  # one bar over the whole request
        done[0] += 1
        if on_step is not None:
            on_step(replace(info, i=done[0] - 1, total=total))

    def run(known, strengths, sigmas, noise, hooks):
        denoise = plan.denoiser(model.denoiser(sigmas=sigmas))
        if req.dynamic_threshold is not None:
            denoise = dynamic_threshold(denoise, req.dynamic_threshold)
        z = noise.initial()
        denoise = StrengthMap(denoise, known, strengths, full, z).wrapped()
        on = _hooked([*plan.hooks(noise), *hooks(denoise, noise)], progress)
        return sampler(denoise, known + z * float(sigmas[0]), sigmas, noise=noise, on_step=on, **options)

    states, images = [], []
    with torch.inference_mode():
        source = _to_tensor(canvas, model.space.image_channels, width, height).to(model.device)
        known = model.space.encode(source)
        for seed in seeds:
            noise = NoiseSource([seed], shape, device=model.device)
            resample = (lambda d, n: [RePaint(d, n, spec.resample)]) if spec.resample else (lambda d, n: [])
            state = run(known, s_lat, grid, noise, resample)
            image = paste(model.space.decode(state), source, weight)
            if spec.harmonize > 0:  # re-draw the band next to the seam at a low strength, the rest kept
                again = NoiseSource([stream_seed(seed, HARMONIZE_STREAM)], shape, device=model.device)
                state = run(model.space.encode(image), again_lat, truncate(full, spec.harmonize), again, lambda d, n: [])
                image = paste(model.space.decode(state), image, again_weight)
            states.append(state)
            images.append(image)
    images = torch.cat(images)
    records = _records(model, req, seeds, width, height, grid)
    return Result(images=to_pil(images), manifests=[r.dump() for r in records], latents=torch.cat(states),
                  pixels=images.clamp(-1, 1), records=records)
