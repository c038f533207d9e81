"""Types shared by samplers, wrappers and models."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Mapping, Protocol

import torch
from torch import Tensor


@dataclass(frozen=True)
class Cond:
    """Conditioning for one batch. Every tensor field has the batch as its first dimension.

    tokens:  (B, L, D) per-token text states for cross-attention
    mask:    (B, L) attention mask of the tokens, 1 = real token
    pooled:  (B, D') one vector per prompt
    concat:  (B, C, H, W) channels concatenated to the model input (inpainting, instruction editing)
    control: tuple of residual tensors added by a ControlNet, or None
    extra:   anything a particular model needs beside these (not batched by ``cat``)
    """

    tokens: Tensor | None = None
    mask: Tensor | None = None
    pooled: Tensor | None = None
    concat: Tensor | None = None
    control: tuple[Tensor, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    _BATCHED = ("tokens", "mask", "pooled", "concat")

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch (used by CFG to run cond and uncond in one forward)."""
        first = conds[0]
        out: dict[str, Any] = {}
        for name in Cond._BATCHED:
            values = [getattr(c, name) for c in conds]
            present = [v is not None for v in values]
            if any(present) and not all(present):
                raise ValueError(f"cannot batch conditionings: '{name}' is missing in some of them")
            out[name] = torch.cat(values) if all(present) else None
        controls = [c.control for c in conds]
        if any(c is not None for c in controls):
            if not all(c is not None for c in controls):
                raise ValueError("cannot batch conditionings: 'control' is missing in some of them")
            out["control"] = tuple(torch.cat(parts) for parts in zip(*controls))
        return replace(first, **out)

    def chunk(self, n: int) -> list["Cond"]:
        """Inverse of ``cat`` for n equal parts."""
        parts: list[dict[str, Any]] = [{} for _ in range(n)]
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in Cond._BATCHED and value is not None:
                for p, v in zip(parts, value.chunk(n)):
                    p[f.name] = v
            elif f.name == "control" and value is not None:
                split = [t.chunk(n) for t in value]
                for k, p in enumerate(parts):
                    p["control"] = tuple(s[k] for s in split)
        return [replace(self, **p) for p in parts]


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
    def __call__(self, info: StepInfo) -> None: ...
