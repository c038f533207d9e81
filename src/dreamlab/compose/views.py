"""Views for illusions (visual anagrams, Geng et al. 2024): orthogonal transforms of the image under
which it should read as another prompt. A view acts on the sampler state; the denoised estimate made
under it is mapped back with its inverse and averaged with the others' at every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..errors import UnknownNameError


@dataclass(frozen=True)
class View:
    name: str
    apply: Callable[[Tensor], Tensor]
    invert: Callable[[Tensor], Tensor]


VIEWS: dict[str, View] = {v.name: v for v in (
    View("identity", lambda x: x, lambda x: x),
    View("flip", lambda x: torch.flip(x, dims=(-2,)), lambda x: torch.flip(x, dims=(-2,))),  # upside down
    View("mirror", lambda x: torch.flip(x, dims=(-1,)), lambda x: torch.flip(x, dims=(-1,))),
    View("rotate180", lambda x: torch.rot90(x, 2, dims=(-2, -1)), lambda x: torch.rot90(x, -2, dims=(-2, -1))),
    View("rotate90", lambda x: torch.rot90(x, 1, dims=(-2, -1)), lambda x: torch.rot90(x, -1, dims=(-2, -1))),
)}


def get_view(name: str) -> View:
    try:
        return VIEWS[name]
    except KeyError:
        raise UnknownNameError(f"unknown view '{name}'; known: {', '.join(sorted(VIEWS))}") from None
