"""A loaded model: everything ``generate`` needs, independent of where it came from."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from torch import Tensor, nn

from ..core.prediction import Denoiser, Prediction
from ..core.schedules import DiscreteSchedule
from ..core.types import Cond, ModelWrapper
from ..adapters.library import AdapterSet
from .space import Space
from .text import TextEncoder
from .unet import UNetModelFn


@dataclass(frozen=True)
class SuperResolution:
    """What makes a model a super-resolution stage: it denoises images of ``sample_size`` conditioned on
    a low-resolution image (``from_size`` by default), whose latents it sees concatenated to its input
    after noise of level ``noise_level`` (a training timestep) is added: conditioning augmentation."""

    from_size: int
    noise_level: int


# Extra inputs a model may take beside the prompt (its spec declares them; the loader checks its UNet):
#   lowres_image  a super-resolution stage: latents of the enlarged low-res image, concatenated
#   source_image  an image-conditioned editor (InstructPix2Pix): latents of the source, concatenated
#   control       control images for ControlNets (no extra UNet channels)
ModelInput = Literal["lowres_image", "source_image", "control"]
CONCAT_INPUTS: tuple[ModelInput, ...] = ("lowres_image", "source_image")  # those that add UNet input channels


@dataclass(frozen=True)
class Defaults:
    """What a model samples with when a request does not say (a 4-step student differs from its teacher)."""

    sampler: str = "dpmpp_2m"
    steps: int = 30
    cfg_scale: float = 5.0
    schedule: str = "karras"
    image_cfg_scale: float = 1.5  # instruction-editing models only: the image guidance scale s_I


@dataclass(frozen=True)
class Student:
    """A few-step student distilled from a teacher (docs/distillation.md), as its ``dreamlab.json`` says.

    method:       "consistency" (its network is a consistency function: the Denoiser applies LCM's
                  boundary condition; sampled with ``lcm``) or "progressive" (an x0 predictor for the
                  DDIM grid it was halved to)
    teacher:      the teacher's name
    teacher_unet: sha256 of the teacher's UNet weights: ControlNets made for the teacher are offered to it
    guidance:     (min, max) of the guidance scales folded into its guidance input, or None if unknown
    """

    method: Literal["consistency", "progressive"]
    teacher: str = ""
    teacher_unet: str | None = None
    guidance: tuple[float, float] | None = None


@dataclass(eq=False)
class ModelBundle:
    unet: nn.Module  # a diffusers UNet2DConditionModel
    text_encoder: TextEncoder | None
    space: Space
    schedule: DiscreteSchedule
    prediction: Prediction
    sample_size: int  # default image height and width, pixels
    use_mask: bool = False  # pass the text attention mask to cross-attention
    name: str = "model"
    source: str = ""  # folder it was loaded from
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256, for manifests
    sr: SuperResolution | None = None  # set for a super-resolution stage
    upscaler: "ModelBundle | None" = None  # a cascade: this base model's images are enlarged by this SR stage
    defaults: Defaults = Defaults()
    inputs: tuple[ModelInput, ...] = ()  # extra inputs it takes beside the prompt
    student: Student | None = None  # set for a distilled student
    pass_call: bool = False  # attention processors of this view want each ModelCall (set by a patch)
    controlnet_dirs: dict[str, Path] = field(default_factory=dict)  # condition -> folder, given explicitly
    adapters: AdapterSet = field(default_factory=AdapterSet)  # LoRAs and embeddings it can use (shared by views)
    applied_adapters: list = field(default_factory=list)  # a view's: AdapterRecords of what its patches applied
    _controlnets: dict[str, tuple] = field(default_factory=dict, repr=False)  # loaded ones, shared by the views
    instruct_dir: Path | None = None  # the instruction-editing model made from this one, given explicitly
    _editor: list = field(default_factory=list, repr=False)  # [ModelBundle | None] once looked up, shared by the views

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def takes_guidance(self) -> bool:
        """Whether the UNet takes the guidance scale as an input (guidance folded in: ``Cond.guidance``)."""
        return getattr(self.unet.config, "time_cond_proj_dim", None) is not None

    @property
    def _teacher_unets(self) -> tuple[str, ...]:
        """UNets besides its own whose ControlNets this model takes: a student's teacher's."""
        return (self.student.teacher_unet,) if self.student is not None and self.student.teacher_unet else ()

    def denoiser(self, wrappers: Sequence[ModelWrapper] = (), *, sigmas: Tensor | None = None) -> Denoiser:
        """The model as a denoiser; ``wrappers`` see every network call (ControlNet residuals, concatenated
        inputs), ``sigmas`` (the sampler's grid) gives each call its step index."""
        return Denoiser(
            UNetModelFn(self.unet, use_mask=self.use_mask, pass_call=self.pass_call, pixel_factor=self.space.factor),
            self.schedule, self.prediction,
            model_dtype=self.dtype, wrappers=tuple(wrappers), sigmas=sigmas,
            consistency=self.student is not None and self.student.method == "consistency",
        )

    def controlnets(self) -> dict[str, Path]:
        """condition -> folder of every ControlNet this model can use: given ones first, then installed."""
        from .controlnet import installed_controlnets

        return {**installed_controlnets(self.files, also=self._teacher_unets), **self.controlnet_dirs}

    def use_controlnet(self, folder: str | Path) -> str:
        """Make the ControlNet in ``folder`` this model's for its condition (checked to fit); the condition."""
        from .controlnet import load_controlnet

        folder = Path(folder).expanduser()
        net, spec, files = load_controlnet(folder, self.files, device=self.device, dtype=self.dtype,
                                           also=self._teacher_unets)
        condition = spec.controlnet.condition
        self.controlnet_dirs[condition] = folder
        self._controlnets[condition] = (net, folder, files)
        return condition

    def controlnet(self, condition: str):
        """(network, folder, file hashes) of the ControlNet for ``condition``, loaded once."""
        if condition not in self._controlnets:
            from ..errors import InvalidRequestError
            from .controlnet import load_controlnet

            folder = self.controlnets().get(condition)
            if folder is None:
                raise InvalidRequestError(
                    f"no ControlNet for '{condition}' is installed for {self.name}; train one with `dreamlab train "
                    f"controlnet --condition {condition}` or pass its folder with --controlnet"
                )
            net, _, files = load_controlnet(folder, self.files, device=self.device, dtype=self.dtype,
                                            also=self._teacher_unets)
            self._controlnets[condition] = (net, folder, files)
        return self._controlnets[condition]

    def instruction_model(self) -> "ModelBundle | None":
        """The instruction-editing model (InstructPix2Pix) made from this one, loaded once and shared by the
        views: ``instruct_dir``, else an installed one whose dreamlab.json names this UNet's sha256 as its
        base (``instruct.base_unet``, found as ControlNets are). A request with a source image for a model
        that takes none goes to it (``generate.route``); None if there is none."""
        if not self._editor:
            from ..loading.model import installed_instruct_models, load_model
            from .controlnet import base_hash

            folder = self.instruct_dir or next(iter(installed_instruct_models(base_hash(self.files))), None)
            self._editor.append(load_model(folder, device=self.device, dtype=self.dtype) if folder else None)
        return self._editor[0]

    def clone(self) -> "ModelBundle":
        """A view of this model for one request: it shares the networks (no weights are copied); patches
        change the view's fields or, undoably, the shared networks (see :mod:`dreamlab.models.patches`)."""
        view = copy.copy(self)
        view.applied_adapters = list(self.applied_adapters)
        return view

    def encode_prompts(self, prompts: list[str], *, grad: bool = False) -> Cond | None:
        """The prompts' conditioning on this model's device; ``grad``: with autograd through the encoder
        (textual inversion and Imagic optimise its inputs). A model that takes the guidance scale as an
        input gets scale 1 in every row: its plain conditional prediction (its teacher's CFG at scale 1),
        which any guider may use as a model without guidance; :class:`~dreamlab.core.guiders.FoldedCFG`
        replaces it with the request's scale."""
        if self.text_encoder is None:
            return None
        cond = self.text_encoder.encode_with_grad(prompts) if grad else self.text_encoder.encode(prompts)
        return Cond(
            tokens=cond.tokens.to(self.device) if cond.tokens is not None else None,
            mask=cond.mask.to(self.device) if cond.mask is not None else None,
            pooled=cond.pooled.to(self.device) if cond.pooled is not None else None,
            guidance=torch.ones(len(prompts), device=self.device) if self.takes_guidance else None,
        )
