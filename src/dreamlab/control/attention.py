"""Attention control: read and change the attention probabilities of a UNet's self- and cross-attention.

A controller (prompt-to-prompt's ``AttentionControl``, DAAM's map store) is a small object with two
methods: ``wants(site)`` says whether it needs the probabilities of this layer at this call, and
``edit(probs, site)`` reads them (B, heads, Q, K) and returns them, changed or not. It is installed for
one request with :func:`attention_patch` (a scoped patch: the model's own processors come back after).
Where a controller wants nothing, the model's own processor runs unchanged (bit-identical output);
where it does, the probabilities are computed explicitly with the layer's own projections, mask
handling and scaling (diffusers' ``Attention.get_attention_scores``), which equals the fused kernel to
float rounding. The site tells a controller everything: the layer, its resolution, self or cross, the
role of every row (from the guider) and the step (from the sigma grid), never by counting calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from ..core.types import ModelCall, Role, Row
from ..models.patches import AttentionProcessors, Layer


@dataclass(frozen=True)
class Site:
    """Where and when an attention evaluation happens."""

    layer: Layer
    resolution: tuple[int, int]  # (h, w) of the layer's image grid (the queries)
    call: ModelCall | None

    @property
    def cross(self) -> bool:
        return self.layer.cross

    @property
    def step(self) -> int | None:
        return None if self.call is None else self.call.step

    @property
    def roles(self) -> tuple[Row, ...] | None:
        return None if self.call is None or self.call.cond is None else self.call.cond.roles

    def rows(self, role: Role, stream: int | None = None) -> list[int]:
        """Indices of the rows with this role (and stream)."""
        roles = self.roles or ()
        return [i for i, r in enumerate(roles) if r.role == role and (stream is None or r.stream == stream)]


class Controller(Protocol):
    def wants(self, site: Site) -> bool:
        """Whether it needs this layer's probabilities at this call."""
        ...

    def changes(self, site: Site) -> bool:
        """Whether it may change them here; if not, the model's own processor computes the output (bit
        for bit as without the controller) and the probabilities are computed beside it to be read."""
        ...

    def edit(self, probs: Tensor, site: Site) -> Tensor:
        """probs: (B, heads, Q, K) softmax attention of every row -> the probabilities to use."""
        ...


def _resolution(call: ModelCall | None, queries: int) -> tuple[int, int]:
    if call is None:
        side = int(math.isqrt(queries))
        return side, queries // max(1, side)
    h, w = call.x_t.shape[-2:]
    f = math.sqrt(h * w / queries)
    return max(1, round(h / f)), max(1, round(w / f))


class ControlledProcessor:
    """The processor installed on every attention layer: delegates to the model's own unless the
    controller wants the probabilities here."""

    def __init__(self, inner, layer: Layer, controller: Controller):
        self.inner, self.layer, self.controller = inner, layer, controller

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, call=None):
        queries = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        site = Site(self.layer, _resolution(call, queries), call)
        if not self.controller.wants(site):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if not self.controller.changes(site):
            self.controller.edit(attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask), site)
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask,
                                  lambda probs: self.controller.edit(probs, site))


def _projections(attn, hidden_states, encoder_hidden_states, attention_mask):
    """(query, key, value) split into heads, the prepared mask, and what is needed to undo the 4-D
    layout: diffusers' plain ``AttnProcessor`` up to the scores, through the layer's own methods."""
    if attn.spatial_norm is not None:
        raise NotImplementedError("attention control does not support spatially normalised attention")
    shape = hidden_states.shape
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.view(shape[0], shape[1], shape[2] * shape[3]).transpose(1, 2)
    batch, seq = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
    attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    query, key, value = (attn.head_to_batch_dim(t) for t in (query, key, value))
    return query, key, value, attention_mask, batch, shape


def attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask) -> Tensor:
    """(B, heads, Q, K) attention probabilities of a layer, computed beside its own processor."""
    query, key, _, mask, batch, _ = _projections(attn, hidden_states, encoder_hidden_states, attention_mask)
    probs = attn.get_attention_scores(query, key, mask)
    return probs.view(batch, attn.heads, *probs.shape[1:])


def explicit_attention(attn, hidden_states, encoder_hidden_states, attention_mask, edit) -> Tensor:
    """Attention with the probabilities materialised, each row's (B, heads, Q, K) passed through
    ``edit``: diffusers' plain ``AttnProcessor`` computation, through the layer's own methods."""
    residual = hidden_states
    query, key, value, mask, batch, shape = _projections(attn, hidden_states, encoder_hidden_states, attention_mask)
    ndim = len(shape)
    probs = attn.get_attention_scores(query, key, mask)  # (B * heads, Q, K)
    heads = attn.heads
    probs = edit(probs.view(batch, heads, *probs.shape[1:])).reshape(batch * heads, *probs.shape[1:])
    hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    if ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(*shape)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def attention_patch(controller: Controller) -> AttentionProcessors:
    """A patch that puts ``controller`` on every attention layer of a request's view of the model."""
    return AttentionProcessors(lambda layer: ControlledProcessor(layer.module.processor, layer, controller))


class Observe:
    """A controller that wants every layer and (with ``materialise``) claims to change it but returns
    the probabilities as they are: the output then equals the model's to float rounding."""

    def __init__(self, materialise: bool = True):
        self.materialise = materialise

    def wants(self, site: Site) -> bool:
        return True

    def changes(self, site: Site) -> bool:
        return self.materialise

    def edit(self, probs: Tensor, site: Site) -> Tensor:
        return probs


class Chain:
    """Several controllers in order: each sees what the previous one returned."""

    def __init__(self, *controllers: Controller):
        self.controllers = controllers

    def wants(self, site: Site) -> bool:
        return any(c.wants(site) for c in self.controllers)

    def changes(self, site: Site) -> bool:
        return any(c.wants(site) and c.changes(site) for c in self.controllers)

    def edit(self, probs: Tensor, site: Site) -> Tensor:
        for c in self.controllers:
            if c.wants(site):
                probs = c.edit(probs, site)
        return probs


class CrossAttentionStore:
    """DAAM-style maps (Tang et al. 2022): the cross-attention of the conditional rows of ``stream``,
    averaged over heads, upsampled to the latent grid and summed over layers and calls. ``maps()``
    gives (rows, K tokens, H, W), normalised per token by the number of layers x calls summed."""

    def __init__(self, stream: int | None = None, min_side: int = 1):
        self.stream, self.min_side = stream, min_side
        self.sum: Tensor | None = None
        self.count = 0
        self.grid: tuple[int, int] | None = None

    def wants(self, site: Site) -> bool:
        return site.cross and min(site.resolution) >= self.min_side and bool(self._rows(site))

    def changes(self, site: Site) -> bool:
        return False

    def _rows(self, site: Site) -> list[int]:
        if site.roles is None:
            return []
        return site.rows(Role.COND, self.stream)

    def edit(self, probs: Tensor, site: Site) -> Tensor:
        rows = self._rows(site)
        h, w = site.resolution
        maps = probs[rows].mean(1).transpose(1, 2).reshape(len(rows), -1, h, w).float()  # (rows, K, h, w)
        grid = tuple(site.call.x_t.shape[-2:])
        maps = torch.nn.functional.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
        self.sum = maps if self.sum is None or self.sum.shape != maps.shape else self.sum + maps
        self.count += 1
        self.grid = grid
        return probs

    def maps(self) -> Tensor | None:
        return None if self.sum is None else self.sum / max(1, self.count)
