"""Attention maps (DAAM, Tang et al. 2022): where in the image each word of the prompt was attended to.

The prompt is generated with a cross-attention store on the request's view of the model; the maps of
the conditional row, averaged over heads, summed over layers and steps (each layer's map upsampled to
the latent grid first), are returned per token and drawn as a labelled grid over the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .attention import CrossAttentionStore, attention_patch
from .tokens import tokens


@dataclass
class AttentionMaps:
    image: Image.Image
    tokens: list[str]  # the prompt's tokens, start and end tokens included
    maps: torch.Tensor  # (len(tokens), H, W) at the image's size, each min-max normalised to [0, 1]
    manifest: dict


def attention_maps(model, request) -> AttentionMaps:
    """Generate ``request`` (batch 1) and return its image with the cross-attention map of every token."""
    from ..errors import InvalidRequestError
    from ..generate import generate

    if request.batch != 1 or request.edit is not None:
        raise InvalidRequestError("attention maps are drawn for one generated image: batch 1, no edit")
    if model.text_encoder is None or not hasattr(model.text_encoder, "tokenizer"):
        raise InvalidRequestError("attention maps need a model with a text encoder")
    toks = tokens(model.text_encoder, request.prompt)
    store = CrossAttentionStore(stream=None)
    result = generate(model, request, patches=[attention_patch(store)])
    maps = store.maps()
    if maps is None:
        raise InvalidRequestError("the model has no cross-attention to draw")
    image = result.images[0]
    return AttentionMaps(image, toks.text, token_maps(maps, len(toks), image.size), result.manifests[0])


def token_maps(maps: torch.Tensor, n: int, size: tuple[int, int]) -> torch.Tensor:
    """A store's (rows, K, h, w) maps -> the first row's n token maps at the image's (width, height),
    each min-max normalised (the maps of a small model have a high floor)."""
    m = torch.nn.functional.interpolate(maps[:1, :n], size=size[::-1], mode="bicubic", align_corners=False)[0]
    lo, hi = m.amin(dim=(1, 2), keepdim=True), m.amax(dim=(1, 2), keepdim=True)
    return (m - lo) / (hi - lo).clamp_min(1e-12)


def draw(result: AttentionMaps, scale: int = 3, skip_special: bool = True) -> Image.Image:
    """The image, then one heat map per token over it, labelled (matplotlib's ``inferno``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import colormaps
    from PIL import ImageDraw, ImageFont

    from ..images import on_background

    picks = [(t, m) for t, m in zip(result.tokens, result.maps)
             if not (skip_special and t.startswith("[") and t.endswith("]")) and t not in ("<|startoftext|>", "<|endoftext|>")]
    base = on_background(result.image).convert("RGB")
    w, h = base.size[0] * scale, base.size[1] * scale
    cmap = colormaps["inferno"]
    tiles = [("image", base.resize((w, h), Image.NEAREST))]
    grey = np.asarray(base.convert("L").resize((w, h), Image.BILINEAR), dtype=np.float32)[..., None] / 255
    for text, m in picks:
        heat = cmap(np.asarray(Image.fromarray((m.numpy() * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR)) / 255.0)[..., :3]
        tiles.append((text, Image.fromarray((255 * (0.65 * heat + 0.35 * grey)).astype(np.uint8))))
    font = ImageFont.load_default(size=12)
    label, pad = 16, 4
    sheet = Image.new("RGB", (len(tiles) * (w + pad) + pad, h + label + 2 * pad), "white")
    d = ImageDraw.Draw(sheet)
    for i, (text, tile) in enumerate(tiles):
        x = pad + i * (w + pad)
        sheet.paste(tile, (x, pad))
        d.text((x + 2, pad + h + 2), text, fill="black", font=font)
    return sheet

