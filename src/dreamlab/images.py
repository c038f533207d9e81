"""Conversions between tensors in [-1, 1] and images, and contact sheets."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, C, H, W) in [-1, 1] -> PIL images (RGBA for 4 channels, straight alpha)."""
    arr = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    mode = {1: "L", 3: "RGB", 4: "RGBA"}[arr.shape[-1]]
    return [Image.fromarray(np.ascontiguousarray(a.squeeze(-1) if mode == "L" else a), mode) for a in arr]


def from_pil(images) -> torch.Tensor:
    """PIL images of one size -> (B, 4, H, W) RGBA in [-1, 1]: the inverse of :func:`to_pil` (what the judge reads)."""
    return torch.from_numpy(np.stack([np.asarray(im.convert("RGBA")) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def on_background(image: Image.Image, color: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Composite an RGBA image over a solid colour (what a viewer sees)."""
    if image.mode != "RGBA":
        return image.convert("RGB")
    bg = Image.new("RGBA", image.size, color + (255,))
    return Image.alpha_composite(bg, image).convert("RGB")


def grid(images: list[Image.Image], cols: int | None = None, scale: int = 1, pad: int = 2) -> Image.Image:
    """A contact sheet on white; RGBA images are composited first."""
    if not images:
        raise ValueError("no images to put in a grid")
    cols = cols or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        im = on_background(im).resize((w, h), Image.NEAREST)
        sheet.paste(im, (pad + (i % cols) * (w + pad), pad + (i // cols) * (h + pad)))
    return sheet


def labelled_grid(images: list[Image.Image], labels: list[str], cols: int = 4, scale: int = 2, pad: int = 6) -> Image.Image:
    """A contact sheet with each image's label (e.g. its prompt) written under it."""
    from PIL import ImageDraw, ImageFont

    if len(images) != len(labels) or not images:
        raise ValueError("labelled_grid needs one label per image, and at least one image")
    font = ImageFont.load_default(size=11)
    w, h = images[0].size[0] * scale, images[0].size[1] * scale
    cell_w, text_h = max(w, 150), 16
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (h + text_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for i, (im, label) in enumerate(zip(images, labels)):
        x0, y0 = pad + (i % cols) * (cell_w + pad), pad + (i // cols) * (h + text_h + pad)
        sheet.paste(on_background(im).resize((w, h), Image.NEAREST), (x0 + (cell_w - w) // 2, y0))
        text = label if draw.textlength(label, font=font) <= cell_w else label[: max(1, len(label) - 3)] + "..."
        while draw.textlength(text, font=font) > cell_w and len(text) > 4:
            text = text[:-4] + "..."
        draw.text((x0 + cell_w / 2, y0 + h + 2), text, fill=(40, 40, 40), font=font, anchor="ma")
    return sheet


def resize(images: torch.Tensor, size: tuple[int, int] | int) -> torch.Tensor:
    """Resize (B, C, H, W) images in [-1, 1] to ``size`` (height, width): area averaging to shrink,
    bicubic to enlarge (clamped to [-1, 1]).

    RGBA (C = 4, straight alpha) is resized premultiplied, so the colour under transparent pixels
    (arbitrary in straight alpha) never bleeds into the edges of the visible ones; fully transparent
    results get black colour, as the emoji data has.
    """
    h, w = (size, size) if isinstance(size, int) else size
    if images.shape[-2:] == (h, w):
        return images
    shrink = h <= images.shape[-2] and w <= images.shape[-1]

    def _resize(x: torch.Tensor) -> torch.Tensor:
        if shrink:
            return torch.nn.functional.interpolate(x, size=(h, w), mode="area")
        return torch.nn.functional.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)

    x = images.float()
    if x.shape[1] != 4:
        return _resize(x).clamp(-1, 1)
    alpha = (x[:, 3:] + 1) / 2
    colour = (x[:, :3] + 1) / 2 * alpha
    out = _resize(torch.cat([colour, alpha], dim=1))
    alpha = out[:, 3:].clamp(0, 1)
    colour = torch.where(alpha > 1e-4, out[:, :3] / alpha.clamp_min(1e-4), torch.zeros_like(out[:, :3])).clamp(0, 1)
    return torch.cat([colour, alpha], dim=1) * 2 - 1
