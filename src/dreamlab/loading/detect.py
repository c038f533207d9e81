"""Which Stable Diffusion a single-file checkpoint is, from its tensor names and shapes alone.

A checkpoint in the original layout (CompVis' latent diffusion for SD 1.x and 2.x, Stability's
generative-models for SDXL) keeps the UNet under ``model.diffusion_model.``, the autoencoder under
``first_stage_model.`` and its text encoder(s) under a prefix that names their kind:

| family | text encoder(s) | cross-attention width |
|---|---|---|
| SD 1.x | ``cond_stage_model.transformer.``: CLIP ViT-L/14 (transformers' key names) | its width (768) |
| SD 2.x | ``cond_stage_model.model.``: OpenCLIP ViT-H/14 (open_clip's key names) | its width (1024) |
| SDXL base | ``conditioner.embedders.0.transformer.`` (CLIP ViT-L) and ``.1.model.`` (OpenCLIP bigG) | the sum (2048) |

The family is the encoder layout, and the UNet's cross-attention width must equal the encoder width(s):
the same rule holds for the real models and for tiny test models. What is refused is named: inpainting
(9 input channels), SDXL refiners, LoRA, ControlNet, VAE-only and embedding files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping

from ..errors import CheckpointError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
Shape = tuple[int, ...]


@dataclass(frozen=True)
class Encoder:
    """One text encoder of a checkpoint: where its weights are and in which naming."""

    prefix: str
    layout: Literal["clip", "openclip"]  # transformers' CLIPTextModel names, or open_clip's
    folder: str  # its diffusers subfolder: text_encoder or text_encoder_2
    pad_token: str  # SD 1.x's tokenizer pads with the end-of-text token, OpenCLIP's with "!" (id 0)

    @property
    def tokenizer_folder(self) -> str:
        return self.folder.replace("text_encoder", "tokenizer")

    def width(self, shapes: Mapping[str, Shape]) -> int | None:
        names = ((f"{self.prefix}text_model.embeddings.token_embedding.weight", f"{self.prefix}embeddings.token_embedding.weight")
                 if self.layout == "clip" else (f"{self.prefix}token_embedding.weight",))
        return next((shapes[n][1] for n in names if n in shapes), None)


@dataclass(frozen=True)
class Architecture:
    name: Literal["sd1", "sd2", "sdxl"]
    title: str
    encoders: tuple[Encoder, ...]
    pipeline: str  # the diffusers pipeline class a converted folder names in model_index.json
    # SDXL conditions on the penultimate layer of both encoders (no final layer norm); SD 1.x and 2.x on
    # the last hidden state (SD 2.x's encoder config has its unused last layer removed)
    penultimate: bool = False


CLIP_L = "<|endoftext|>"
ARCHITECTURES = {
    "sd1": Architecture("sd1", "Stable Diffusion 1.x", (Encoder("cond_stage_model.transformer.", "clip", "text_encoder", CLIP_L),),
                        "StableDiffusionPipeline"),
    "sd2": Architecture("sd2", "Stable Diffusion 2.x", (Encoder("cond_stage_model.model.", "openclip", "text_encoder", "!"),),
                        "StableDiffusionPipeline"),
    "sdxl": Architecture("sdxl", "Stable Diffusion XL base",
                         (Encoder("conditioner.embedders.0.transformer.", "clip", "text_encoder", CLIP_L),
                          Encoder("conditioner.embedders.1.model.", "openclip", "text_encoder_2", "!")),
                         "StableDiffusionXLPipeline", penultimate=True),
}
SUPPORTED = "SD 1.x (CLIP ViT-L), SD 2.x (OpenCLIP ViT-H) and SDXL base (both)"


def detect(shapes: Mapping[str, Shape]) -> Architecture:
    """The architecture of a checkpoint, given the shape of every tensor; CheckpointError names what was
    found when it is none that dreamlab loads."""
    if not any(k.startswith(UNET) for k in shapes):
        raise CheckpointError(_not_a_checkpoint(shapes))
    conv_in = shapes.get(UNET + "input_blocks.0.0.weight")
    channels = conv_in[1] if conv_in and len(conv_in) == 4 else None
    if channels == 9:
        raise CheckpointError("this is an inpainting checkpoint (its UNet takes 9 input channels: latents, mask and masked "
                              "image), which dreamlab does not load; ordinary checkpoints inpaint with --mask")
    if channels != 4:
        raise CheckpointError(f"unknown architecture: a UNet with {channels} input channels (text-to-image Stable "
                              f"Diffusion has 4; dreamlab loads {SUPPORTED})")
    context = sorted({s[1] for k, s in shapes.items() if k.startswith(UNET) and k.endswith("attn2.to_k.weight")})
    if (any(k.startswith("conditioner.embedders.0.model.") for k in shapes)
            and not any(k.startswith("conditioner.embedders.1.") for k in shapes)):
        raise CheckpointError("this is an SDXL refiner checkpoint (one OpenCLIP text encoder and an aesthetic-score "
                              "conditioning); dreamlab loads SDXL base, not the refiner")
    for arch in ARCHITECTURES.values():
        widths = [e.width(shapes) for e in arch.encoders]
        if all(w is not None for w in widths) and context == [sum(widths)]:
            if not any(k.startswith(VAE) for k in shapes):
                raise CheckpointError(f"this {arch.title} checkpoint has no autoencoder (no weights under '{VAE}'); "
                                      "dreamlab needs a full checkpoint")
            if arch.name != "sdxl" and any(k.startswith(UNET + "label_emb.") for k in shapes):
                raise CheckpointError(f"unknown architecture: a {arch.title} UNet with a class embedding (label_emb), "
                                      "as unCLIP and upscaler models have; dreamlab loads text-to-image models only")
            return arch
    found = [f"{e.prefix} ({e.layout}, {e.width(shapes)}-d)" for a in ARCHITECTURES.values() for e in a.encoders
             if e.width(shapes) is not None]
    raise CheckpointError(
        f"unknown architecture: a UNet with {'/'.join(map(str, context)) or 'no'}-d cross-attention and "
        f"{'text encoder weights under ' + ', '.join(dict.fromkeys(found)) if found else 'no text encoder dreamlab knows'}; "
        f"dreamlab loads {SUPPORTED}"
    )


def _not_a_checkpoint(shapes: Mapping[str, Shape]) -> str:
    """What a file without a Stable Diffusion UNet holds instead, as far as its names tell."""
    keys = list(shapes)
    if not keys:
        return "this file holds no tensors: it is not a checkpoint"
    if any(k.startswith(("lora_unet_", "lora_te")) or ".lora_down." in k or ".lora_A." in k for k in keys):
        return "this is a LoRA file, not a checkpoint: it holds only low-rank weight updates"
    if any(k.startswith("control_model.") or k.startswith("controlnet_") for k in keys):
        return "this is a ControlNet, not a checkpoint"
    if any(k in ("emb_params", "clip_l", "clip_g") or k.startswith("string_to_param") for k in keys):
        return "this is a textual-inversion embedding, not a checkpoint"
    if "conv_in.weight" in shapes and any(k.startswith("down_blocks.") for k in keys):
        return "this is a diffusers-format network on its own, not a checkpoint: load its diffusers folder instead"
    if any(k.startswith("encoder.") for k in keys) and any(k.startswith("decoder.") for k in keys):
        return "this is an autoencoder (VAE) on its own, not a checkpoint"
    prefixes = sorted({k.split(".")[0] for k in keys})
    shown = ", ".join(prefixes[:5]) + (", ..." if len(prefixes) > 5 else "")
    return (f"not a Stable Diffusion checkpoint: no UNet weights under '{UNET}' ({len(keys)} tensors, "
            f"named {shown})")
