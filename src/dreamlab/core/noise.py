"""Reproducible noise: each sample has its own seed, so image i of a batch is bit-identical to the
same image generated alone, whatever the batch size.

Sample i of a request with seed s uses seed s + i (the convention of A1111 and ComfyUI), so
``--seed 7 --batch 4`` produces the images of seeds 7, 8, 9, 10. Its initial noise is
``torch.randn(shape, generator=torch.Generator().manual_seed(seed))``, the same as diffusers gives a
batch of one; the noise of ancestral step k comes from a generator keyed by (seed, k + 1). Noise is
drawn on the CPU and moved to the device, so CPU and GPU runs start from the same noise.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_MASK = (1 << 64) - 1
MAX_SEED = (1 << 63) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def stream_seed(seed: int, stream: int) -> int:
    """A well-mixed 63-bit generator seed for (seed, stream); stream 0 is the seed itself."""
    if stream == 0:
        return seed
    return _splitmix64(_splitmix64(seed) ^ _splitmix64(stream + (1 << 32))) & MAX_SEED


class NoiseSource:
    """Gaussian noise for a batch, one generator per (sample, stream).

    ``initial()`` gives the starting noise; calling the source with a step index gives that step's
    noise for ancestral samplers (it is a :data:`dreamlab.core.types.NoiseFn`).
    """

    def __init__(
        self,
        seeds: Sequence[int],
        shape: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        for s in seeds:
            if not isinstance(s, int) or not 0 <= s <= MAX_SEED:
                raise ValueError(f"seed must be an integer in [0, 2**63 - 1], got {s!r}")
        self.seeds = list(seeds)
        self.shape = tuple(shape)
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def for_batch(cls, seed: int, batch: int, shape: Sequence[int], **kw) -> "NoiseSource":
        if seed + batch - 1 > MAX_SEED:
            raise ValueError(f"seed {seed} + batch {batch} exceeds 2**63 - 1")
        return cls([seed + i for i in range(batch)], shape, **kw)

    def draw(self, stream: int) -> Tensor:
        out = torch.empty((len(self.seeds), *self.shape), dtype=torch.float32)
        g = torch.Generator()
        for i, seed in enumerate(self.seeds):
            g.manual_seed(stream_seed(seed, stream))
            out[i] = torch.randn(self.shape, generator=g)
        return out.to(device=self.device, dtype=self.dtype)

    def initial(self) -> Tensor:
        return self.draw(0)

    def __call__(self, step: int) -> Tensor:
        return self.draw(step + 1)
