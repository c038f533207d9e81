"""Adapter from a diffusers UNet2DConditionModel to the engine's network function (a ModelCall -> output).

The one place where a :class:`~dreamlab.core.types.Cond` becomes UNet arguments, for sampling and for
training alike (the trainers call the UNet through this adapter and ``Denoiser.loss``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..core.types import ModelCall
from ..errors import DreamlabError


class UNetModelFn:
    """Calls a diffusers ``UNet2DConditionModel`` (or a DDP wrapping one) with the fields of a ModelCall.

    use_mask: pass the text attention mask to cross-attention (our models, trained with it); Stable
    Diffusion was trained attending to padding, so it is called without one.

    class_labels: a super-resolution stage gets the noise level of its concatenated low-res input
    (``class_embed_type="timestep"``); a UNet with ``class_embed_type="projection"`` gets the pooled
    prompt embedding, projected and added to the timestep embedding, so it reaches every resolution,
    including those without cross-attention.

    pass_call: give attention processors the ModelCall (``cross_attention_kwargs={"call": call}``), so
    they know the step, sigma and the role of every row; set by the attention-processor patch.

    added_cond_kwargs: a UNet with ``addition_embed_type="text_time"`` (SDXL) gets the pooled prompt
    embedding as ``text_embeds`` and the size conditioning as ``time_ids`` (:func:`size_ids`) of the image
    being made, which is the state's size times ``pixel_factor`` (the space's).

    timestep_cond: a UNet with ``time_cond_proj_dim`` (a distilled student with guidance folded in) gets
    each row's guidance scale (``Cond.guidance``) as :func:`guidance_embedding`, projected and added to
    its timestep embedding, as diffusers' LatentConsistencyModelPipeline calls it.
    """

    def __init__(self, unet, *, use_mask: bool = False, pass_call: bool = False, pixel_factor: int | None = None):
        self.unet = unet
        self.use_mask = use_mask
        self.pass_call = pass_call
        self.pixel_factor = pixel_factor
        config = getattr(unet, "module", unet).config  # DDP(unet) in training
        self.takes_pooled = getattr(config, "class_embed_type", None) == "projection"
        self.takes_text_time = getattr(config, "addition_embed_type", None) == "text_time"
        self.guidance_dim = getattr(config, "time_cond_proj_dim", None)
        if self.takes_text_time and pixel_factor is None:
            raise ValueError("a UNet with size conditioning (SDXL) needs pixel_factor: image size / state size")

    def inputs(self, call: ModelCall) -> tuple[Tensor, Tensor, Tensor | None, dict]:
        """(sample, timestep, encoder_hidden_states, keyword arguments) of the UNet for ``call``, without
        residuals: what a ControlNet made from this UNet is called with too."""
        x_t, cond = call.x_t, call.cond
        kwargs = {}
        tokens = None
        if cond is not None:
            tokens = cond.tokens
            if cond.concat is not None:
                x_t = torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)
            if self.use_mask and cond.mask is not None:
                kwargs["encoder_attention_mask"] = cond.mask
            if cond.noise_level is not None:  # a super-resolution stage: the augmentation of its low-res input
                kwargs["class_labels"] = cond.noise_level.to(x_t.device)
            if self.takes_pooled:
                if cond.pooled is None:
                    raise ValueError("this UNet adds the pooled prompt embedding to its timestep embedding: the "
                                     "conditioning has no pooled embedding (a text encoder with pooling 'none'?)")
                kwargs["class_labels"] = cond.pooled.to(x_t.dtype)
            if self.takes_text_time:
                if cond.pooled is None:
                    raise ValueError("this UNet (SDXL) takes the pooled prompt embedding: the conditioning has none")
                ids = size_ids(x_t.shape[0], x_t.shape[-2] * self.pixel_factor, x_t.shape[-1] * self.pixel_factor)
                kwargs["added_cond_kwargs"] = {"text_embeds": cond.pooled.to(x_t.dtype), "time_ids": ids.to(x_t)}
        if self.guidance_dim:
            if cond is None or cond.guidance is None:
                raise DreamlabError("this UNet takes the guidance scale as an input (a distilled student: "
                                    "time_cond_proj_dim), and the conditioning has none")
            kwargs["timestep_cond"] = guidance_embedding(cond.guidance, self.guidance_dim).to(x_t)
        elif cond is not None and cond.guidance is not None:
            raise DreamlabError("the conditioning carries a guidance scale for a student, but this UNet takes none")
        if tokens is not None:
            tokens = tokens.to(x_t.dtype)
        t = call.t if call.sigma is None else call.t.float()  # training keeps its integer timesteps
        return x_t, t, tokens, kwargs

    def __call__(self, call: ModelCall) -> Tensor:
        x_t, t, tokens, kwargs = self.inputs(call)
        if call.residuals is not None:
            kwargs["down_block_additional_residuals"] = tuple(r.to(x_t.dtype) for r in call.residuals.down)
            kwargs["mid_block_additional_residual"] = call.residuals.mid.to(x_t.dtype)
        if self.pass_call:
            kwargs["cross_attention_kwargs"] = {"call": call}
        return self.unet(x_t, t, encoder_hidden_states=tokens, return_dict=False, **kwargs)[0]


def guidance_embedding(scale: Tensor, dim: int) -> Tensor:
    """(B,) guidance scales -> (B, dim): LCM's embedding of w = scale - 1 (diffusers'
    ``get_guidance_scale_embedding``, after VDM): sines and cosines of 1000 w at geometric frequencies.
    The student's w is diffusers' ``guidance_scale - 1``, so scale 1 (no guidance) embeds w = 0."""
    w = (scale.float() - 1.0) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=1)
    return torch.nn.functional.pad(emb, (0, dim % 2))


def size_ids(rows: int, height: int, width: int) -> Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, sec. 2.2): (original height, width, crop top, crop
    left, target height, width) per row, with diffusers' defaults: the image made, at its size, uncropped."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).expand(rows, 6)
