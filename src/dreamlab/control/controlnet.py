"""ControlNet as a model wrapper: residuals computed from the current x_t, t and conditioning at every
network call (as ComfyUI's ``get_control``), added to the UNet's skips and middle block.

Every row of a call gets the same control map, the unconditional rows too (as diffusers' ControlNet
pipeline and ComfyUI do outside "guess mode"). Several controls add their residuals, each with its
scale; a control at scale 0 is skipped and changes nothing, bit for bit. ``start`` / ``end`` restrict it
to a part of the sampling run, as diffusers' ``control_guidance_start`` / ``control_guidance_end``:
step i of n is controlled unless i / n < start or (i + 1) / n > end.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..core.types import ModelCall, Residuals
from ..models.unet import UNetModelFn


@dataclass(frozen=True)
class ControlNetControl:
    """Model wrapper. ``hint``: (1 or B, C, H, W) control map in [0, 1] at the image's size; ``steps``:
    how many steps the run has (None: every call is controlled, as in training)."""

    net: object  # diffusers ControlNetModel made from the model's UNet
    adapter: UNetModelFn  # the base's adapter: the ControlNet takes the UNet's own inputs
    hint: Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    steps: int | None = None

    def active(self, step: int | None) -> bool:
        if self.scale == 0.0:
            return False
        if step is None or not self.steps:
            return True
        return not (step / self.steps < self.start or (step + 1) / self.steps > self.end)

    def __call__(self, call: ModelCall) -> ModelCall:
        if not self.active(call.step):
            return call
        x_t, t, tokens, kwargs = self.adapter.inputs(call)
        rows = x_t.shape[0]
        hint = self.hint if self.hint.shape[0] == rows else self.hint.expand(rows, *self.hint.shape[1:])
        down, mid = self.net(
            x_t, t, encoder_hidden_states=tokens, controlnet_cond=hint.to(x_t.dtype), conditioning_scale=self.scale,
            class_labels=kwargs.get("class_labels"), return_dict=False,
        )  # (diffusers' ControlNet takes no text attention mask: it attends to the padding, in training too)
        return call.add_residuals(Residuals(tuple(down), mid))


@dataclass(frozen=True)
class ControlInput:
    """A stage input: one control of a request, a ControlNetControl for every image's run."""

    net: object
    adapter: UNetModelFn
    hint: Tensor  # (1, C, H, W)
    scale: float
    start: float
    end: float

    def model_wrapper(self, i: int, noise, sigmas: Tensor) -> ControlNetControl:
        return ControlNetControl(self.net, self.adapter, self.hint, self.scale, self.start, self.end, steps=len(sigmas) - 1)


def control_inputs(model, request, width: int, height: int, decode) -> tuple[list[ControlInput], list[str]]:
    """The request's controls as stage inputs of ``model`` at the output size, and notes for the user
    (a control image of another size is resized, and said so). ``decode(b64, what)`` reads an image."""
    import numpy as np
    import torch

    from .conditions import control_map, get_condition

    inputs, notes = [], []
    adapter = model.denoiser().model
    for k, c in enumerate(request.controls):
        condition = get_condition(c.condition)
        net, _, _ = model.controlnet(c.condition)
        image = decode(c.image, f"controls.{k}.image")
        if image.size != (width, height):
            notes.append(f"control {k + 1} ({c.condition}): its image is {image.size[0]}x{image.size[1]}, "
                         f"resized to {width}x{height}")
        hint = control_map(condition, image, (width, height), preprocess=c.preprocess)
        hint = torch.from_numpy(np.ascontiguousarray(hint)).permute(2, 0, 1).unsqueeze(0).to(model.device, model.dtype)
        inputs.append(ControlInput(net, adapter, hint, c.scale, c.start, c.end))
    return inputs, notes
