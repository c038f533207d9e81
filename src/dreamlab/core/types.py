"""Types shared by samplers, wrappers and models."""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Any, Callable, Protocol

import torch
from torch import Tensor


class Role(str, enum.Enum):
    """What a row of a batched forward is for (ComfyUI passes ``cond_or_uncond`` to patches for the same reason)."""

    UNCOND = "uncond"  # the empty or negative prompt
    COND = "cond"  # a prompt (part ``part`` of a composed one)
    IMAGE = "image"  # image-conditioned, no text (InstructPix2Pix's middle row)


@dataclass(frozen=True)
class Row:
    """The role of one row. ``part``: which part of a composed prompt; ``stream``: which image of a joint
    run the row belongs to (0: the source, 1, 2, ...: edits made beside it, as in prompt-to-prompt)."""

    role: Role
    part: int = 0
    stream: int = 0


@dataclass(frozen=True)
class Cond:
    """Conditioning for one batch. Every field has the batch as its first dimension (``roles`` one entry
    per row); ``cat`` and ``chunk`` batch them all.

    tokens:      (B, L, D) per-token text states for cross-attention
    mask:        (B, L) attention mask of the tokens, 1 = real token
    pooled:      (B, D') one vector per prompt
    concat:      (B, C, H, W) channels concatenated to the model input (super-resolution, instruction editing)
    noise_level: (B,) the level (a timestep) of the noise added to ``concat`` (conditioning augmentation)
    guidance:    (B,) the classifier-free guidance scale a student with guidance folded in takes as an input
                 (guided distillation, Meng et al. 2023; LCM's ``w``); None for a model without that input
    roles:       one :class:`Row` per row, set by the guider; None when nobody laid the rows out
    """

    tokens: Tensor | None = None
    mask: Tensor | None = None
    pooled: Tensor | None = None
    concat: Tensor | None = None
    noise_level: Tensor | None = None
    guidance: Tensor | None = None
    roles: tuple[Row, ...] | None = None

    _TENSORS = ("tokens", "mask", "pooled", "concat", "noise_level", "guidance")

    @property
    def rows(self) -> int | None:
        """The batch size, from the first field that has one."""
        for name in Cond._TENSORS:
            value = getattr(self, name)
            if value is not None:
                return int(value.shape[0])
        return None if self.roles is None else len(self.roles)

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch (used by guiders to run all their rows in one forward)."""
        out: dict[str, Any] = {}
        for name in (*Cond._TENSORS, "roles"):
            values = [getattr(c, name) for c in conds]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise ValueError(f"cannot batch conditionings: '{name}' is missing in some of them")
            if not all(present):
                out[name] = None
            elif name == "roles":
                out[name] = tuple(r for v in values for r in v)
            else:
                out[name] = torch.cat(values)
        return Cond(**out)

    def chunk(self, n: int) -> list["Cond"]:
        """Inverse of ``cat`` for n equal parts."""
        parts: list[dict[str, Any]] = [{} for _ in range(n)]
        for name in Cond._TENSORS:
            value = getattr(self, name)
            if value is not None:
                for p, v in zip(parts, value.chunk(n)):
                    p[name] = v
        if self.roles is not None:
            k = len(self.roles) // n
            for i, p in enumerate(parts):
                p["roles"] = self.roles[i * k:(i + 1) * k]
        return [replace(self, **p) for p in parts]

    def repeat(self, n: int) -> "Cond":
        """The same conditioning for n times the rows (row i of the result is row i % B)."""
        return self if n == 1 else Cond.cat([self] * n)

    def with_roles(self, roles: tuple[Row, ...]) -> "Cond":
        return replace(self, roles=roles)


@dataclass(frozen=True)
class Residuals:
    """Additions to a UNet's skip connections and middle block (ControlNet, Zhang et al. 2023): one tensor
    per down-block output and one for the middle, with the batch first. Several controls add up."""

    down: tuple[Tensor, ...]
    mid: Tensor

    def __add__(self, other: "Residuals") -> "Residuals":
        return Residuals(tuple(a + b for a, b in zip(self.down, other.down, strict=True)), self.mid + other.mid)


@dataclass(frozen=True)
class ModelCall:
    """One evaluation of the network, as model wrappers and attention processors see it.

    x_t:       (B, C, H, W) the network's input in the DDPM form, before any ``cond.concat`` channels
    t:         (B,) timesteps (fractional when sampling, integers in training)
    cond:      the conditioning of every row (its ``roles`` say what each row is for)
    sigma:     (B,) the sampler's sigma of each row; None in training
    step:      index of sigma in the sampler's grid (0 = the first step); None when there is no grid
    residuals: what model wrappers add to the UNet's skips (ControlNet), or None
    """

    x_t: Tensor
    t: Tensor
    cond: Cond | None = None
    sigma: Tensor | None = None
    step: int | None = None
    residuals: Residuals | None = None

    def add_residuals(self, more: Residuals) -> "ModelCall":
        return replace(self, residuals=more if self.residuals is None else self.residuals + more)


# (call) -> what the network predicts (eps, v or x0, as its schedule says)
ModelFn = Callable[[ModelCall], Tensor]

# Evaluated at every network call (between the Denoiser and the network), with the current x_t, t and
# conditioning: adds inputs (ControlNet residuals, concatenated image latents) and returns the call.
ModelWrapper = Callable[[ModelCall], ModelCall]


# (x, sigma, cond) -> x0.  x: (B, C, H, W) in the form x0 + sigma * eps; sigma: (B,)
DenoiseFn = Callable[[Tensor, Tensor, Cond | None], Tensor]

# step index -> standard normal noise shaped like the sampler's state
NoiseFn = Callable[[int], Tensor]


@dataclass(frozen=True)
class StepInfo:
    """What a sampler reports after each step. ``denoised`` is the current x0 estimate."""

    i: int
    total: int
    sigma: float
    sigma_next: float
    x: Tensor
    denoised: Tensor


class StepCallback(Protocol):
    def __call__(self, info: StepInfo) -> Tensor | None:
        """None to go on; a tensor shaped like ``info.x`` to go on from it instead (a state hook)."""
        ...
