"""Guiders: how to lay out the rows of one batched forward, and how to combine their predictions.

A guider is two small methods (as in Stability's generative-models, ``sgm/.../guiders.py``):
``prepare(x, sigma, cond)`` returns the rows to run, each with its :class:`~dreamlab.core.types.Row`
role in ``cond.roles`` (so attention processors can tell the unconditional rows from the conditional
ones, and the source from an edit), and ``combine(x, sigma, x0_rows)`` mixes the network's predictions
of those rows into one x0. :func:`guide` turns a denoiser and a guider into a denoiser.

All guidance here acts on x0; at a fixed x and sigma, x0, eps and v are affine in each other, so the
same combination holds for every parameterisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, Sequence

import torch
from torch import Tensor

from .prediction import _b
from .types import Cond, DenoiseFn, Role, Row


class Guider(Protocol):
    def prepare(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor, Cond | None]:
        """The inputs of one batched forward (rows), each row's role in the returned cond."""
        ...

    def combine(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        """The predictions of those rows -> the guided x0 of the batch of ``x``."""
        ...


def guide(denoise: DenoiseFn, guider: Guider) -> DenoiseFn:
    """``denoise`` with the rows ``guider`` lays out, combined as it says."""

    def guided(x: Tensor, sigma: Tensor, cond: Cond | None) -> Tensor:
        xs, sigmas, conds = guider.prepare(x, sigma, cond)
        return guider.combine(x, sigma, denoise(xs, sigmas, conds))

    return guided


def streams(cond: Cond | None, batch: int) -> list[int]:
    """The stream of each of the batch's rows, from the roles the caller gave them (0 when none)."""
    if cond is None or cond.roles is None:
        return [0] * batch
    return [r.stream for r in cond.roles[:batch]]


def _broadcast(cond: Cond, batch: int) -> Cond:
    """A one-row conditioning repeated for a batch (the same negative prompt for every image)."""
    return cond.repeat(batch) if cond.rows == 1 and batch > 1 else cond


def _strip(cond: Cond) -> Cond:
    return cond if cond.roles is None else replace(cond, roles=None)


def rescale_guidance(x: Tensor, sigma: Tensor, x0: Tensor, x0_ref: Tensor, phi: float) -> Tensor:
    """Guidance rescale (Lin et al. 2023, eq. 15-16): pull the std of the guided eps back towards that of
    the reference (the conditional prediction), as diffusers' ``guidance_rescale``."""
    s = _b(sigma, x)
    eps_c, eps_cfg = (x - x0_ref) / s, (x - x0) / s
    dims = tuple(range(1, x.ndim))
    ratio = eps_c.std(dim=dims, keepdim=True) / eps_cfg.std(dim=dims, keepdim=True)
    eps = eps_cfg * (phi * ratio + (1 - phi))
    return x - s * eps


@dataclass(eq=False)
class CFG:
    """Classifier-free guidance (Ho & Salimans 2022), composed over k prompt parts (Liu et al. 2022,
    "Compositional Visual Generation with Composable Diffusion Models", eq. 9-10):

        x0 = x0_u + scale * sum_i w_i (x0_i - x0_u)

    Plain CFG is one part of weight 1. ``uncond`` is the conditioning of the empty or negative prompt
    (one row is repeated for every image of the batch). The cond given at each call holds the k parts
    stacked along the batch, part-major (rows i*B..(i+1)*B-1 are part i for a batch of B); all k + 1
    predictions run in one forward, the uncond rows first. ``rescale``: phi of :func:`rescale_guidance`,
    whose reference is the composed prediction at scale 1. At scale 0 only the uncond rows run.
    """

    uncond: Cond | None
    scale: float
    weights: Sequence[float] = (1.0,)
    rescale: float = 0.0
    _composed: bool = False  # say "composed guidance" in errors (the caller gave weights)
    _broadcast: dict[int, Cond] = field(default_factory=dict)
    _batched: list[tuple[Cond, Cond]] = field(default_factory=list)  # (cond, its rows): repeats every step

    def __post_init__(self) -> None:
        self.weights = tuple(self.weights)
        if not self.weights:
            raise ValueError("weights must name at least one conditioning")
        if self.uncond is None:
            raise ValueError("classifier-free guidance needs an unconditional conditioning")

    def _uncond_for(self, batch: int) -> Cond:
        if batch not in self._broadcast:
            self._broadcast[batch] = _strip(_broadcast(self.uncond, batch))
        return self._broadcast[batch]

    def prepare(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor, Cond]:
        b, n = x.shape[0], len(self.weights) + 1
        if self.scale == 0.0:
            u = self._uncond_for(b)
            return x, sigma, u.with_roles(tuple(Row(Role.UNCOND, stream=s) for s in streams(cond, b)))
        if cond is None:
            raise ValueError("classifier-free guidance needs a conditioning")
        if not self._batched or self._batched[0][0] is not cond:
            both = Cond.cat([self._uncond_for(b), _strip(cond)])
            rows = both.rows
            if self._composed and rows is not None and rows != n * b:
                raise ValueError(f"composed guidance of {n - 1} parts needs {(n - 1) * b} conditioning rows "
                                 f"for a batch of {b}, got {rows - b}")
            ss = streams(cond, b)
            roles = tuple(Row(Role.UNCOND, stream=s) for s in ss)
            roles += tuple(Row(Role.COND, part=i, stream=s) for i in range(n - 1) for s in ss)
            self._batched[:] = [(cond, both.with_roles(roles) if rows == n * b else both)]
        return torch.cat([x] * n), torch.cat([sigma] * n), self._batched[0][1]

    def combine(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        if self.scale == 0.0:
            return x0
        x0_u, *x0_parts = x0.chunk(len(self.weights) + 1)
        delta = sum(w * (x0_i - x0_u) for w, x0_i in zip(self.weights, x0_parts))  # exactly x0_c - x0_u for one part
        guided = x0_u + self.scale * delta
        if self.rescale > 0:
            x0_ref = x0_parts[0] if not self._composed else x0_u + delta  # guidance at scale 1
            guided = rescale_guidance(x, sigma, guided, x0_ref, self.rescale)
        return guided


@dataclass(eq=False)
class ImageTextCFG:
    """Guidance with two conditionings, an image and a text (InstructPix2Pix, Brooks et al. 2023, eq. 3):

        x0 = x0(0, 0) + s_I [x0(I, 0) - x0(0, 0)] + s_T [x0(I, T) - x0(I, 0)]

    The image rides in ``cond.concat`` (its latents, concatenated to the network input); the "no image"
    row sees zeros there, as the model was trained with the image dropped. ``uncond`` is the empty or
    negative prompt. The rows are (0, 0), (I, 0), (I, T), in one forward. At ``image_scale`` 1 the first
    term cancels and the (0, 0) row is not run: this is then :class:`CFG` on the image-conditioned model,
    bit for bit.
    """

    uncond: Cond
    image_scale: float
    text_scale: float
    _batched: list[tuple[Cond, Cond]] = field(default_factory=list)

    def prepare(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor, Cond]:
        if cond is None or cond.concat is None:
            raise ValueError("image and text guidance needs a conditioning with the image in concat")
        b = x.shape[0]
        if not self._batched or self._batched[0][0] is not cond:
            c = _strip(cond)
            with_image = replace(_strip(_broadcast(self.uncond, b)), concat=c.concat, noise_level=c.noise_level)
            ss = streams(cond, b)
            rows = [with_image, c]
            roles = tuple(Row(Role.IMAGE, stream=s) for s in ss) + tuple(Row(Role.COND, stream=s) for s in ss)
            if self.image_scale != 1.0:
                rows.insert(0, replace(with_image, concat=torch.zeros_like(c.concat)))
                roles = tuple(Row(Role.UNCOND, stream=s) for s in ss) + roles
            self._batched[:] = [(cond, Cond.cat(rows).with_roles(roles))]
        n = 2 if self.image_scale == 1.0 else 3
        return torch.cat([x] * n), torch.cat([sigma] * n), self._batched[0][1]

    def combine(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        if self.image_scale == 1.0:
            x0_i, x0_it = x0.chunk(2)
            return x0_i + self.text_scale * (0 + 1.0 * (x0_it - x0_i))  # the very expression CFG evaluates
        x0_00, x0_i, x0_it = x0.chunk(3)
        return x0_00 + self.image_scale * (x0_i - x0_00) + self.text_scale * (x0_it - x0_i)


@dataclass(eq=False)
class FoldedCFG:
    """Classifier-free guidance folded into a student (guided distillation, Meng et al. 2023; LCM, Luo et
    al. 2023): the student takes the scale as an input (``cond.guidance``) and was distilled so that

        G(c, s) = x0_u + s (x0_c - x0_u)          (its teacher's CFG, u the empty prompt),

    so plain guidance is one row per image: no unconditional row. Composed prompts follow from G being
    affine in the teacher's terms, with x0_u = G(u, s):

        x0_u + s sum_i w_i (x0_i - x0_u) = sum_i w_i G(c_i, s) + (1 - sum_i w_i) G(u, s),

    k rows, and one row of the empty prompt ``uncond`` only when the weights do not sum to 1. The parts
    are stacked part-major, as for :class:`CFG`. A negative prompt cannot be folded in (the student's u is
    the empty prompt it was distilled with): plans run :class:`CFG` on the student's scale-1 rows then.
    """

    scale: float
    weights: Sequence[float] = (1.0,)
    uncond: Cond | None = None  # the empty prompt; needed only when the weights do not sum to 1
    _batched: list[tuple[Cond, Cond]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.weights = tuple(self.weights)
        if self.needs_uncond and self.uncond is None:
            raise ValueError(f"folded guidance with weights summing to {sum(self.weights):g} needs the empty "
                             "prompt's conditioning")

    @property
    def needs_uncond(self) -> bool:
        return abs(sum(self.weights) - 1.0) > 1e-9

    def prepare(self, x: Tensor, sigma: Tensor, cond: Cond | None) -> tuple[Tensor, Tensor, Cond]:
        if cond is None:
            raise ValueError("folded guidance needs a conditioning")
        b, k = x.shape[0], len(self.weights)
        if not self._batched or self._batched[0][0] is not cond:
            parts = [_strip(cond)]
            ss = streams(cond, b)
            roles = tuple(Row(Role.COND, part=i, stream=s) for i in range(k) for s in ss)
            if self.needs_uncond:
                parts.insert(0, _strip(_broadcast(self.uncond, b)))
                roles = tuple(Row(Role.UNCOND, stream=s) for s in ss) + roles
            rows = Cond.cat(parts)
            if rows.rows != len(roles):
                raise ValueError(f"folded guidance of {k} parts needs {k * b} conditioning rows for a batch of {b}")
            scale = torch.full((len(roles),), float(self.scale), device=x.device)
            self._batched[:] = [(cond, replace(rows, guidance=scale, roles=roles))]
        n = k + self.needs_uncond
        return torch.cat([x] * n), torch.cat([sigma] * n), self._batched[0][1]

    def combine(self, x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
        if not self.needs_uncond and len(self.weights) == 1:
            return x0
        rows = x0.chunk(len(self.weights) + self.needs_uncond)
        x0_u, parts = (rows[0], rows[1:]) if self.needs_uncond else (None, rows)
        out = sum(w * x0_i for w, x0_i in zip(self.weights, parts))
        return out if x0_u is None else out + (1 - sum(self.weights)) * x0_u
