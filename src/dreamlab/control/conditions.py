"""Control conditions: what a ControlNet is conditioned on, computed from images (OpenCV).

Each condition turns an RGBA picture into a control map with ``preprocess`` (the training data's maps
come from the emoji themselves this way), and reads a map a user drew or saved with ``read_map``. Maps
are float arrays (H, W, C) in [0, 1], as diffusers' ControlNet expects its conditioning image.

- ``canny``: Canny edges (Canny 1986) of the picture composited on white; a map is white edges on black.
- ``shape``: the alpha silhouette (1 inside the object); from a picture without transparency, what is
  not near-white; a map is white inside, black outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from ..errors import UnknownNameError

CANNY_LOW, CANNY_HIGH = 100, 200  # hysteresis thresholds on 8-bit grey levels


def on_white(rgba: np.ndarray) -> np.ndarray:
    """(H, W, 4) uint8 -> (H, W, 3) uint8 composited on white."""
    a = rgba[..., 3:4].astype(np.float32) / 255
    return (rgba[..., :3].astype(np.float32) * a + 255 * (1 - a)).round().astype(np.uint8)


def canny(rgba: np.ndarray) -> np.ndarray:
    import cv2

    grey = cv2.cvtColor(on_white(rgba), cv2.COLOR_RGB2GRAY)
    return (cv2.Canny(grey, CANNY_LOW, CANNY_HIGH) > 0).astype(np.float32)[..., None]


def silhouette(rgba: np.ndarray) -> np.ndarray:
    alpha = rgba[..., 3]
    if alpha.min() == 255:  # an opaque picture: the object is what is not background white
        return (on_white(rgba).min(axis=-1) < 245).astype(np.float32)[..., None]
    return (alpha > 127).astype(np.float32)[..., None]


def _binary_map(image: Image.Image) -> np.ndarray:
    grey = np.asarray(image.convert("RGBA").convert("L"), dtype=np.float32) / 255
    return (grey > 0.5).astype(np.float32)[..., None]


@dataclass(frozen=True)
class Condition:
    name: str
    channels: int
    preprocess: Callable[[np.ndarray], np.ndarray]  # (H, W, 4) uint8 RGBA picture -> (H, W, C) map
    read_map: Callable[[Image.Image], np.ndarray]  # a map image -> (H, W, C)
    description: str


CONDITIONS: dict[str, Condition] = {
    c.name: c
    for c in (
        Condition("canny", 1, canny, _binary_map, "Canny edges: white lines on black"),
        Condition("shape", 1, silhouette, _binary_map, "alpha silhouette: white inside the object, black outside"),
    )
}


def get_condition(name: str) -> Condition:
    try:
        return CONDITIONS[name]
    except KeyError:
        raise UnknownNameError(f"unknown control condition '{name}'; known: {', '.join(sorted(CONDITIONS))}") from None


def control_map(condition: Condition, image: Image.Image, size: tuple[int, int], *, preprocess: bool) -> np.ndarray:
    """The (H, W, C) map for ``image`` at ``size`` (width, height): computed from the picture
    (``preprocess``) or read as a map. Pictures are resized before the condition is computed; maps are
    resized with nearest neighbours, so they stay binary."""
    if preprocess:
        rgba = image.convert("RGBA")
        if rgba.size != size:
            rgba = rgba.resize(size, Image.LANCZOS)
        return condition.preprocess(np.asarray(rgba))
    if image.size != size:
        image = image.resize(size, Image.NEAREST)
    return condition.read_map(image)
