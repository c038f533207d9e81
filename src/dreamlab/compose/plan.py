"""How a request's canvas is denoised: its cells (windows, views), the guider of each cell (plain or
composed CFG, regional prompts) and its state hooks (ILVR). Plain generation is the plan with one cell
and the request's CFG: the sampling loop sees no difference."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..control.instruct import check_instruct, takes_source
from ..core.guiders import CFG, FoldedCFG, guide
from ..core.types import Cond, DenoiseFn
from ..errors import InvalidRequestError
from .cells import Cell, average
from .ilvr import ILVR
from .regions import RegionalCFG, box_mask, to_latent
from .views import get_view
from .windows import Windows

ILVR_STREAM = 1 << 43  # the reference's noise: stream_seed(seed, this)


@dataclass
class Plan:
    cells: list[Cell]
    conds: list[Cond | None]  # per prompt index (an illusion's views), the rows its guider is given
    guiders: list  # per cell: a guider factory () -> Guider | None
    ilvr: tuple[torch.Tensor, int] | None = None  # reference latents, latent factor
    notes: list[str] = field(default_factory=list)

    def denoiser(self, base: DenoiseFn) -> DenoiseFn:
        def make(index: int) -> DenoiseFn:
            cell, g = self.cells[index], self.guiders[index]()
            guided = guide(base, g) if g is not None else base
            cond = self.conds[cell.prompt]
            return lambda x, sigma, _cond: guided(x, sigma, cond)

        made = {id(c): make(i) for i, c in enumerate(self.cells)}
        return average(self.cells, lambda c: made[id(c)])

    def hooks(self, noise) -> list:
        if self.ilvr is None:
            return []
        reference, factor = self.ilvr
        return [ILVR(reference, factor, noise.draw(ILVR_STREAM)[:1])]


def folds_guidance(model, req) -> bool:
    """Whether the plan folds guidance into the model (:class:`FoldedCFG`, one row per prompt part): a
    student that takes the scale as an input, with no negative prompt, regions or illusion. Those run
    :class:`CFG` on the student's scale-1 rows instead (its plain conditional prediction)."""
    return bool(getattr(model, "takes_guidance", False)) and not req.negative_prompt and not req.regions \
        and req.illusion is None


def _check_folded(model, req) -> None:
    student = getattr(model, "student", None)
    low, high = student.guidance if student is not None and student.guidance else (None, None)
    if folds_guidance(model, req):
        if req.guidance_rescale:
            raise InvalidRequestError(f"guidance_rescale needs the conditional prediction beside the guided one, and "
                                      f"{model.name} has guidance folded in (one row per step): leave it at 0")
        if low is not None and not low <= req.cfg_scale <= high:
            raise InvalidRequestError(f"{model.name} was distilled for cfg_scale in [{low:g}, {high:g}]; got {req.cfg_scale:g}")
    elif low is not None and not low <= 1.0 <= high:
        why = "a negative prompt" if req.negative_prompt else "regional prompts" if req.regions else "an illusion"
        raise InvalidRequestError(f"{why} needs classifier-free guidance on top of {model.name}'s plain conditional "
                                  f"prediction (scale 1), and it was distilled for scales in [{low:g}, {high:g}] only")


def check(model, req, width: int, height: int) -> None:
    """What a composition request can get wrong, in one line (no image decoded, no network run)."""
    f = model.space.factor
    check_instruct(model, req)
    if getattr(model, "takes_guidance", False):
        _check_folded(model, req)
    for k, r in enumerate(req.regions):
        if (r.box is None) == (r.mask is None):
            raise InvalidRequestError(f"regions.{k}: give a box or a mask, one of them")
        if r.box is not None and (r.box[2] > width or r.box[3] > height):
            raise InvalidRequestError(f"regions.{k}.box {list(r.box)} reaches outside the {width}x{height} canvas")
    if req.window is not None:
        if req.window % f or (req.window_stride or f) % f:
            raise InvalidRequestError(f"window and window_stride must be multiples of the model's factor {f}")
        if req.illusion is not None:
            raise InvalidRequestError("an illusion is one canvas seen through its views: no windows")
    if req.illusion is not None:
        if len(req.illusion.prompts) != len(req.illusion.views):
            raise InvalidRequestError("illusion: one prompt per view")
        if any(v == "rotate90" for v in req.illusion.views) and width != height:
            raise InvalidRequestError("illusion: rotate90 needs a square canvas")
        if req.regions:
            raise InvalidRequestError("illusion: no regional prompts (each view has its own prompt)")
    if req.ilvr is not None and (req.ilvr.factor % f or req.ilvr.factor < f):
        raise InvalidRequestError(f"ilvr.factor {req.ilvr.factor}: must be a multiple of the model's factor {f}")
    if (req.regions or req.illusion is not None) and len(_split(req.prompt)) > 1:
        raise InvalidRequestError("regional prompts and illusions take a plain global prompt, not one composed with AND")


def _split(prompt: str):
    from ..request import split_prompt

    return split_prompt(prompt)


def build(model, req, width: int, height: int, decode) -> Plan:
    """The plan of ``req`` on ``model`` for a canvas of width x height pixels."""
    f = model.space.factor
    h, w = height // f, width // f
    parts = _split(req.prompt)
    if takes_source(model):  # instruction editing: the source in every row's concat, image and text guidance
        return _instruct(model, req, width, height, decode)
    guided = model.text_encoder is not None and (req.cfg_scale != 1.0 or len(parts) > 1)
    uncond = model.encode_prompts([req.negative_prompt]) if guided else None
    tiles: list = [None]
    if req.window is not None:
        win, stride = req.window // f, (req.window_stride or req.window // 2) // f
        tiles = Windows(h, w, win, stride).tiles()
        if len(tiles) == 1 and tiles[0][0] == slice(0, h) and tiles[0][1] == slice(0, w):
            tiles = [None]  # one window covering the canvas: plain generation
    if req.illusion is not None:
        conds = [model.encode_prompts([p]) for p in req.illusion.prompts]
        cells = [Cell(None, get_view(v), i) for i, v in enumerate(req.illusion.views)]
        guiders = [(lambda: CFG(uncond, req.cfg_scale)) if guided else (lambda: None) for _ in cells]
        return Plan(cells, conds, guiders, _ilvr(model, req, width, height, decode))
    cond = model.encode_prompts([text for text, _ in parts])
    cells = [Cell(t) for t in tiles]
    notes = []
    if guided and getattr(model, "takes_guidance", False) and req.negative_prompt and not req.regions:
        notes.append(f"negative prompt: {model.name} has guidance folded in for the empty prompt only; with a negative "
                     "prompt it runs classifier-free guidance on top of its plain conditional prediction (two rows per step)")
    if req.regions:
        masks = torch.cat([to_latent(_region_mask(r, width, height, decode), f) for r in req.regions]).to(model.device)
        conds_r = [cond] + [model.encode_prompts([r.prompt]) for r in req.regions]
        guiders = [_regional(uncond or model.encode_prompts([""]), conds_r, masks, c.tile, req.cfg_scale) for c in cells]
    elif guided and folds_guidance(model, req):  # a student: the scale is its input, no unconditional row
        weights = [wt for _, wt in parts]
        guiders = [lambda: FoldedCFG(req.cfg_scale, weights, uncond) for _ in cells]
    elif guided:
        weights = [wt for _, wt in parts]
        guiders = [lambda: CFG(uncond, req.cfg_scale, weights, req.guidance_rescale, _composed=len(parts) > 1) for _ in cells]
    else:
        guiders = [lambda: None for _ in cells]
    return Plan(cells, [cond], guiders, _ilvr(model, req, width, height, decode), notes)


def _instruct(model, req, width: int, height: int, decode) -> Plan:
    from ..control.instruct import image_scale, instruct_cond, instruct_guider, source_latents

    latents, notes = source_latents(model, req, width, height, decode)
    cond = instruct_cond(model.encode_prompts([req.prompt]), latents)
    guided = model.text_encoder is not None and (req.cfg_scale != 1.0 or image_scale(model, req) != 1.0)
    uncond = model.encode_prompts([req.negative_prompt]) if guided else None
    return Plan([Cell(None)], [cond], [instruct_guider(model, req, uncond)], notes=notes)


def _regional(uncond, conds, masks, tile, scale):
    cropped = masks if tile is None else masks[..., tile[0], tile[1]]
    return lambda: RegionalCFG(uncond, conds, cropped, scale)


def _region_mask(region, width: int, height: int, decode) -> torch.Tensor:
    if region.box is not None:
        return box_mask(region.box, width, height)
    image = decode(region.mask, "regions.mask").convert("L").resize((width, height), Image.NEAREST)
    return torch.from_numpy((np.asarray(image) > 127).astype(np.float32))[None, None]


def _ilvr(model, req, width: int, height: int, decode):
    if req.ilvr is None:
        return None
    from ..generate import _to_tensor

    ref = _to_tensor(decode(req.ilvr.reference, "ilvr.reference"), model.space.image_channels, width, height)
    with torch.no_grad():
        latents = model.space.encode(ref.to(model.device))
    return latents, req.ilvr.factor // model.space.factor
