"""SVG art for the personalization sets (``dreamlab.data.personal``): icon bodies and files as SVG
documents, framed to the drawing's extent and rasterised with resvg to 64x64 straight-alpha RGBA."""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from dreamlab.data.catalog import IMAGE_SIZE, hex_key
from dreamlab.data.emoji import decode_png
from dreamlab.errors import DreamlabError

MARGIN_PX = 1  # transparent border around the art: the training images' median (Noto's 62 of 64 px)
PROBE_SIZE = 256  # the resolution the art's extent is measured at, to 1/4 of an output pixel


_SVG_TAG = re.compile(r"<svg\b[^>]*>")
_VIEWPORT_ATTR = re.compile(r"""\s(?:viewBox|width|height)\s*=\s*(?:"[^"]*"|'[^']*')""")
_VIEW_BOX = re.compile(r"""\sviewBox\s*=\s*["']([^"']*)["']""")

Box = tuple[float, float, float, float]  # x, y, width, height in SVG user units


@dataclass(frozen=True)
class Art:
    """One drawing: an SVG document, and where in its package it came from (an icon name or a file)."""

    origin: str
    svg: str


def iconify_svg(icon_set: Mapping[str, Any], name: str) -> str:
    """The SVG document of icon ``name`` of an IconifyJSON icon set (``icons.json``).

    Per-icon ``left``/``top``/``width``/``height`` override the set's (IconifyJSON's defaults: 0, 0, 16, 16).
    Rotations and flips are refused rather than drawn unflipped: the pinned sets' icons have none (only their
    aliases do, and aliases are not used).
    """
    icon = icon_set["icons"][name]
    if transforms := sorted({"rotate", "hFlip", "vFlip"} & icon.keys()):
        raise ValueError(f"icon {name!r} has {', '.join(transforms)}, which this reader does not apply")
    box = [
        icon.get(k, icon_set.get(k, default)) for k, default in (("left", 0), ("top", 0), ("width", 16), ("height", 16))
    ]
    view_box = " ".join(str(v) for v in box)
    return f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{view_box}">{icon["body"]}</svg>'


def fluent_art(icon_set: Mapping[str, Any], chars: Mapping[str, str]) -> dict[str, Art]:
    """Art by ``hex_key`` from an Iconify emoji set: ``chars.json`` maps code points ("1f431") to icon names."""
    icons = icon_set["icons"]
    return {
        hex_key(code): Art(name, iconify_svg(icon_set, name))
        for code, name in sorted(chars.items())
        if name in icons and not icons[name].get("hidden")
    }


def openmoji_art(files: Mapping[str, bytes]) -> dict[str, Art]:
    """Art by ``hex_key`` from OpenMoji's ``package/color/svg/<HEXCODE>.svg`` tarball members."""
    prefix = "package/color/svg/"
    return {
        hex_key(name.removeprefix(prefix).removesuffix(".svg")): Art(
            name.removeprefix("package/"), data.decode("utf-8")
        )
        for name, data in sorted(files.items())
        if name.startswith(prefix) and name.endswith(".svg")
    }


def _view_box(svg: str) -> Box:
    tag = _SVG_TAG.search(svg)
    found = _VIEW_BOX.search(tag.group(0)) if tag else None
    if found is None:
        raise ValueError("not an SVG document with a viewBox")
    x, y, w, h = (float(v) for v in found.group(1).replace(",", " ").split())
    return x, y, w, h


def _with_viewport(svg: str, box: Box, size: int) -> str:
    """``svg`` with its root's viewBox set to ``box`` (square) and drawn ``size`` pixels wide and high."""
    tag = _SVG_TAG.search(svg)
    if tag is None:
        raise ValueError("not an SVG document")
    x, y, w, h = box
    root = _VIEWPORT_ATTR.sub("", tag.group(0))[:-1].rstrip()
    root += f' viewBox="{x:.4f} {y:.4f} {w:.4f} {h:.4f}" width="{size}" height="{size}">'
    return svg[: tag.start()] + root + svg[tag.end() :]


def _render(svg: str, box: Box, size: int) -> bytes:
    """The PNG resvg draws of ``box`` of ``svg`` at ``size`` x ``size`` pixels, transparent where nothing is drawn."""
    try:
        import resvg_py  # the Rust resvg in the wheel: no system libraries, the same pixels on every machine
    except ImportError:
        raise DreamlabError("resvg-py is not installed; run `pip install -e .` in the dreamlab checkout") from None
    # No text in emoji art: skipping the system font scan saves time and keeps output independent of the machine.
    return bytes(resvg_py.svg_to_bytes(svg_string=_with_viewport(svg, box, size), skip_system_fonts=True))


def rasterize_svg(svg: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """(size, size, 4) uint8 straight-alpha RGBA of ``svg``, framed like the training images.

    The training art fills its square (Noto's median extent is 62 of 64 px, Twemoji's 64), while icon sets
    pad theirs (Fluent's cat face spans 28 of its 32 units). So the extent of what is drawn is measured in a
    ``PROBE_SIZE`` render, and the final render's viewBox is the square around it, centred, with
    ``MARGIN_PX`` pixels of transparent border: resvg antialiases at the output size, with no resampling.
    Fully transparent pixels get colour 0, as in the training set (``emoji.decode_png``). ``ValueError`` if
    the SVG cannot be read or draws nothing.
    """
    x, y, w, h = _view_box(svg)
    side = max(w, h)
    probe_box = (x + (w - side) / 2, y + (h - side) / 2, side, side)
    probe = decode_png(_render(svg, probe_box, PROBE_SIZE), size=PROBE_SIZE)
    rows, cols = np.nonzero(probe[..., 3])
    if not len(rows):
        raise ValueError("the SVG draws nothing")
    unit = side / PROBE_SIZE
    x0, x1 = probe_box[0] + cols.min() * unit, probe_box[0] + (cols.max() + 1) * unit
    y0, y1 = probe_box[1] + rows.min() * unit, probe_box[1] + (rows.max() + 1) * unit
    fit = max(x1 - x0, y1 - y0) * size / (size - 2 * MARGIN_PX)
    box = ((x0 + x1 - fit) / 2, (y0 + y1 - fit) / 2, fit, fit)
    return decode_png(_render(svg, box, size), size=size)


def encode_png(image: Image.Image) -> bytes:
    """PNG bytes of ``image``; no metadata chunks, so the same pixels give the same bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
