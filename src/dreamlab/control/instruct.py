"""Instruction editing (InstructPix2Pix, Brooks et al. 2023): a model whose UNet takes the latents of a
source image beside its noisy input ("inputs": ["source_image"] in its dreamlab.json), guided by the
image and by the instruction at once (``core.guiders.ImageTextCFG``):

    x0 = x0(0, 0) + s_I [x0(I, 0) - x0(0, 0)] + s_T [x0(I, T) - x0(I, 0)]

The source's latents ride in ``Cond.concat``, so the guider can drop them (zeros) in the one row that
needs it; the request's prompt is the instruction, ``cfg_scale`` is s_T and ``image_cfg_scale`` is s_I.
This module holds what the plan needs: the checks and the conditioning.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..core.guiders import ImageTextCFG
from ..core.types import Cond
from ..errors import InvalidRequestError

DEFAULT_IMAGE_SCALE = 1.5  # the paper's default, and edit_cli.py's


def takes_source(model) -> bool:
    return "source_image" in getattr(model, "inputs", ())


def image_scale(model, req) -> float:
    if req.image_cfg_scale is not None:
        return float(req.image_cfg_scale)
    return float(getattr(model.defaults, "image_cfg_scale", None) or DEFAULT_IMAGE_SCALE)


def check_instruct(model, req) -> None:
    """What an instruction request can get wrong against ``model``, in one line (no image decoded)."""
    if takes_source(model):
        if req.source_image is None:
            raise InvalidRequestError(f"{model.name} is an instruction-editing model (its UNet takes a source image "
                                      "beside the noise): give it the image to edit (`dreamlab instruct IMAGE "
                                      "\"make it green\"`, or source_image)")
        if req.regions or req.illusion is not None or req.window is not None or req.collage is not None \
                or req.outpaint is not None or req.edit is not None:
            raise InvalidRequestError("instruction editing takes one prompt, the instruction: no regions, windows, "
                                      "illusions, collages, outpainting or prompt-to-prompt edits")
        if req.negative_prompt and req.cfg_scale == 1.0:
            raise InvalidRequestError("a negative prompt needs text guidance (cfg_scale above 1)")
    elif req.source_image is not None or req.image_cfg_scale is not None:
        what = "source_image" if req.source_image is not None else "image_cfg_scale"
        raise InvalidRequestError(f"{what} is for instruction-editing models (InstructPix2Pix), and {model.name} is not "
                                  "one: give --model an instruction model, or use init_image for img2img")


def source_latents(model, req, width: int, height: int, decode) -> tuple[torch.Tensor, list[str]]:
    """(1, C, h, w) latents of the source image at the output size, and a note if it was resized."""
    from ..generate import _to_tensor

    picture = decode(req.source_image, "source_image")
    notes = [] if picture.size == (width, height) else [
        f"source image {picture.size[0]}x{picture.size[1]} resized to {width}x{height} (the output size; set width "
        "and height to change it)"]
    image = _to_tensor(picture, model.space.image_channels, width, height)
    with torch.no_grad():
        return model.space.encode(image.to(model.device)), notes


def instruct_cond(cond: Cond, latents: torch.Tensor) -> Cond:
    return replace(cond, concat=latents.expand(cond.rows or 1, *latents.shape[1:]))


def instruct_guider(model, req, uncond: Cond | None):
    """A guider factory for the plan: both guidances, text only (s_I = 1), or none at all (both 1)."""
    s_i, s_t = image_scale(model, req), float(req.cfg_scale)
    if uncond is None or (s_i == 1.0 and s_t == 1.0):
        return lambda: None
    return lambda: ImageTextCFG(uncond, s_i, s_t)
