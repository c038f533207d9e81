"""Adapter from a diffusers UNet2DConditionModel to the engine's model function (x_t, t, cond) -> out."""

from __future__ import annotations

import torch
from torch import Tensor

from ..core.types import Cond


class UNetModelFn:
    """Calls a diffusers ``UNet2DConditionModel`` with the fields of a :class:`Cond`.

    use_mask: pass the text attention mask to cross-attention (our models, trained with it); Stable
    Diffusion was trained attending to padding, so it is called without one.

    A UNet with ``class_embed_type="projection"`` also takes the pooled prompt embedding: projected and
    added to the timestep embedding, it reaches every resolution, including those without cross-attention.
    """

    def __init__(self, unet, *, use_mask: bool = False):
        self.unet = unet
        self.use_mask = use_mask
        self.takes_pooled = getattr(unet.config, "class_embed_type", None) == "projection"

    def __call__(self, x_t: Tensor, t: Tensor, cond: Cond | None) -> Tensor:
        kwargs = {}
        tokens = None
        if cond is not None:
            tokens = cond.tokens
            if cond.concat is not None:
                x_t = torch.cat([x_t, cond.concat.to(x_t.dtype)], dim=1)
            if self.use_mask and cond.mask is not None:
                kwargs["encoder_attention_mask"] = cond.mask
            if "noise_level" in cond.extra:  # a super-resolution stage: the augmentation of its low-res input
                kwargs["class_labels"] = torch.full((x_t.shape[0],), float(cond.extra["noise_level"]), device=x_t.device)
            if self.takes_pooled:
                if cond.pooled is None:
                    raise ValueError("this UNet adds the pooled prompt embedding to its timestep embedding: the "
                                     "conditioning has no pooled embedding (a text encoder with pooling 'none'?)")
                kwargs["class_labels"] = cond.pooled.to(x_t.dtype)
            if cond.control is not None:
                *down, mid = cond.control
                kwargs["down_block_additional_residuals"] = tuple(down)
                kwargs["mid_block_additional_residual"] = mid
        if tokens is not None:
            tokens = tokens.to(x_t.dtype)
        return self.unet(x_t, t.float(), encoder_hidden_states=tokens, return_dict=False, **kwargs)[0]

