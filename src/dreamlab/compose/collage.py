"""Layered collages (after Collage Diffusion, Sarukkai et al. 2023): a scene from ordered RGBA layers,
each with a prompt, a box or an image, and a strength (how freely it may change).

1. Layers given as boxes are generated at the model's size with their own prompt and seed (the default
   model is RGBA-native: they come out as real transparent layers) and placed in their boxes; layers
   given as images are placed as they are. Composited in order, they make the collage.
2. Harmonisation: the collage is re-noised and denoised once through the one sampling loop, with each
   layer's prompt in its own region (the regional guider) and each pixel's strength that of the topmost
   layer there (pixels are re-imposed from the collage until the sampler's sigma falls below their
   strength's: differential strength, the per-layer noise levels of Collage Diffusion); the background's
   strength is the layout's ``background_strength``.
3. Output: the harmonised scene, and every layer as its own RGBA image (transparent outside it) plus
   the layout, so an image editor can restack them; restacked, they are the collage before harmonisation
   exactly, and the harmonisation's change is reported.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

def _ordered(v):
    if v is not None and not (0 <= v[0] < v[2] and 0 <= v[1] < v[3]):
        raise ValueError("a box is x0, y0, x1, y1 with x0 < x1 and y0 < y1, all at least 0")
    return v


Box = Annotated[tuple[int, int, int, int], AfterValidator(_ordered)]  # x0, y0, x1, y1 in pixels

MAX_LAYERS = 8
MAX_LAYER_IMAGE_CHARS = 12_000_000


class LayerSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=2000)
    box: Box | None = Field(None, description="x0, y0, x1, y1 in pixels")
    image: str | None = Field(None, max_length=MAX_LAYER_IMAGE_CHARS,
                              description="the layer's RGBA image: base64 over HTTP, a path in a layout file")
    strength: float = Field(0.25, ge=0.0, le=1.0, description="how freely harmonisation may change it (0: kept)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="a generated layer's own seed")

class CollageSpec(BaseModel):
    """A layout; the request's prompt is the scene's global prompt, its width and height the canvas."""

    model_config = ConfigDict(extra="forbid")

    layers: list[LayerSpec] = Field(min_length=1, max_length=MAX_LAYERS, description="the first is the bottom one")
    background_strength: float = Field(0.0, ge=0.0, le=1.0, description="strength where no layer is (0: stays transparent)")
    harmonize: float = Field(1.0, ge=0.0, le=1.0, description="scales every strength (0: no harmonisation pass)")


class Layout(BaseModel):
    """The layout file: canvas, global prompt and ordered layers."""

    model_config = ConfigDict(extra="forbid")

    width: int = Field(ge=8, le=2048)
    height: int = Field(ge=8, le=2048)
    prompt: str = Field("", max_length=2000)
    negative_prompt: str = Field("", max_length=2000)
    layers: list[LayerSpec] = Field(min_length=1, max_length=MAX_LAYERS)
    background_strength: float = Field(0.0, ge=0.0, le=1.0)
    harmonize: float = Field(1.0, ge=0.0, le=1.0)


LAYER_STREAM = 1 << 44  # a generated layer without its own seed: stream_seed(seed, LAYER_STREAM + k)


def check_collage(model, req, width: int, height: int) -> None:
    """One line per problem, naming the field."""
    from ..errors import InvalidRequestError

    spec = req.collage
    for k, layer in enumerate(spec.layers):
        if layer.box is None and layer.image is None:
            raise InvalidRequestError(f"collage.layers.{k}: give a box, an image, or both")
        if layer.box is not None and (layer.box[2] > width or layer.box[3] > height):
            raise InvalidRequestError(f"collage.layers.{k}.box {list(layer.box)} reaches outside the {width}x{height} canvas")
    if req.batch != 1 and any(layer.seed is not None for layer in spec.layers):
        raise InvalidRequestError("collage: layers with fixed seeds make every image of a batch alike; use batch 1")
    if req.init_image is not None or req.edit is not None or req.illusion is not None or req.regions:
        raise InvalidRequestError("collage: no init_image, edit, illusion or regions (the layers are the regions)")


def _layer_image(model, req, layer: LayerSpec, k: int, seed: int, decode, progress):
    from PIL import Image

    from ..core.noise import stream_seed
    from ..generate import generate

    if layer.image is not None:
        im = decode(layer.image, f"collage.layers.{k}.image").convert("RGBA")
    else:
        sub = req.model_copy(update={"prompt": layer.prompt, "seed": layer.seed if layer.seed is not None else
                                     stream_seed(seed, LAYER_STREAM + k), "batch": 1, "width": None, "height": None,
                                     "collage": None})
        im = generate(model, sub).images[0]
        progress()
    box = layer.box or (0, 0, req.width or model.sample_size, req.height or model.sample_size)
    size = (box[2] - box[0], box[3] - box[1])
    if im.size != size:
        im = im.resize(size, Image.LANCZOS)
    return im, box


def run_collage(model, req, width: int, height: int, on_step, seeds: list[int]):
    import numpy as np
    import torch
    from PIL import Image

    from ..core.noise import NoiseSource
    from ..core.samplers import get_sampler
    from ..core.schedules import truncate
    from ..generate import Result, _records, _to_tensor, encode_image
    from ..images import to_pil
    from ..request import RegionRequest, decode_image
    from .plan import build
    from .strength import StrengthMap

    check_collage(model, req, width, height)
    spec = req.collage
    f = model.space.factor
    full = model.schedule.sigmas_for(req.steps, req.schedule)
    top = max([layer.strength for layer in spec.layers] + [spec.background_strength]) * spec.harmonize
    grid = truncate(full, top) if top > 0 else full[-1:]
    done = [0]

    def progress(info=None) -> None:
        done[0] += 1
        if on_step is not None and info is not None:
            on_step(info)

    scenes, raws, all_layers, latents = [], [], [], []
    for seed in seeds:
        layers, masks, strengths = [], [], np.full((height, width), spec.background_strength * spec.harmonize, np.float32)
        canvas = Image.new("RGBA", (width, height), (0, 0, 0, 0))
        for k, layer in enumerate(spec.layers):
            im, box = _layer_image(model, req, layer, k, seed, decode_image, progress)
            own = Image.new("RGBA", (width, height), (0, 0, 0, 0))
            own.paste(im, box[:2])
            alpha = np.asarray(own)[..., 3] > 127
            strengths[alpha] = layer.strength * spec.harmonize
            layers.append(own)
            masks.append(Image.fromarray((alpha * 255).astype(np.uint8), "L"))
            canvas = Image.alpha_composite(canvas, own)
        raws.append(canvas)
        all_layers.append(layers)
        if top == 0 or len(grid) < 2:
            scenes.append(canvas)
            latents.append(None)
            continue
        big = width > model.sample_size or height > model.sample_size  # windows of the model's own size
        regional = req.model_copy(update={"collage": None, "window": model.sample_size if big else None, "regions": [
            RegionRequest(prompt=layer.prompt, mask=encode_image(m)) for layer, m in zip(spec.layers, masks)]})
        plan = build(model, regional, width, height, decode_image)
        shape = (model.space.channels, height // f, width // f)
        noise = NoiseSource([seed], shape, device=model.device)
        with torch.inference_mode():
            known = model.space.encode(_to_tensor(canvas, model.space.image_channels, width, height).to(model.device))
            s_lat = torch.nn.functional.max_pool2d(torch.from_numpy(strengths)[None, None], f).to(model.device)  # as free as its freest pixel
            denoise = StrengthMap(plan.denoiser(model.denoiser(sigmas=grid)), known, s_lat, full, noise.initial())
            x = known + noise.initial() * float(grid[0])
            options = {"eta": req.eta} if req.eta is not None else {}
            state = get_sampler(req.sampler)(denoise.wrapped(), x, grid, noise=noise, on_step=progress, **options)
            scenes.append(to_pil(model.space.decode(state))[0])
        latents.append(state)
    records = _records(model, req, seeds, width, height, grid)
    pixels = torch.cat([_to_tensor(im, model.space.image_channels, width, height) for im in scenes])
    return Result(images=scenes, manifests=[r.dump() for r in records],
                  latents=torch.cat([lat for lat in latents if lat is not None]) if any(lat is not None for lat in latents) else pixels,
                  pixels=pixels, records=records, layers=all_layers, sources=raws,
                  source_manifests=[r.model_copy(update={"artifact": "collage"}).dump() for r in records])
