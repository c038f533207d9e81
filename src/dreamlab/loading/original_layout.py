"""diffusers' names -> the original single-file names: the inverse of diffusers' single-file conversion.

Used to write checkpoints in the layout that the model sharing sites use (tiny test models, and the
real architectures on the meta device), so the loader is tested on that layout and not on ours. The
mapping follows diffusers' ``loaders/single_file_utils.py`` backwards (its ``convert_ldm_*`` functions
and ``DIFFUSERS_TO_LDM_MAPPING``), for any number of levels and layers per block.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from .detect import UNET, VAE, Architecture

_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _rename(state: Mapping[str, Tensor], prefixes: list[tuple[str, str, dict[str, str]]], what: str) -> dict[str, Tensor]:
    """Each key's longest matching diffusers prefix replaced by its original one, and the first name after
    it renamed by that prefix's table."""
    prefixes = sorted(prefixes, key=lambda p: -len(p[0]))
    out = {}
    for key, value in state.items():
        match = next((p for p in prefixes if key.startswith(p[0])), None)
        if match is None:
            raise KeyError(f"{what}: no original name for {key}")
        new, inner = match[1], key[len(match[0]):]
        for a, b in match[2].items():
            if inner.startswith(a + "."):
                inner = b + inner[len(a):]
                break
        out[new + inner] = value
    return out


def unet_to_original(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    levels, per = len(config["block_out_channels"]), int(config["layers_per_block"])
    p: list[tuple[str, str, dict[str, str]]] = [
        ("time_embedding.linear_1.", "time_embed.0.", {}), ("time_embedding.linear_2.", "time_embed.2.", {}),
        ("add_embedding.linear_1.", "label_emb.0.0.", {}), ("add_embedding.linear_2.", "label_emb.0.2.", {}),
        ("conv_in.", "input_blocks.0.0.", {}), ("conv_norm_out.", "out.0.", {}), ("conv_out.", "out.2.", {}),
        ("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET), ("mid_block.attentions.0.", "middle_block.1.", {}),
        ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET),
    ]
    for i in range(levels):
        for j in range(per):
            n = 1 + i * (per + 1) + j
            p += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0.", _UNET_RESNET),
                  (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.", {})]
        p.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (per + 1)}.0.op.", {}))
        attention = "CrossAttn" in config["up_block_types"][i]
        for j in range(per + 1):
            n = i * (per + 1) + j
            p += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0.", _UNET_RESNET),
                  (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.", {})]
        p.append((f"up_blocks.{i}.upsamplers.0.conv.", f"output_blocks.{i * (per + 1) + per}.{2 if attention else 1}.conv.", {}))
    return {UNET + k: v for k, v in _rename(state, p, "UNet").items()}


def vae_to_original(state: Mapping[str, Tensor], config: Mapping) -> dict[str, Tensor]:
    levels = len(config["block_out_channels"])
    resnet = {"conv_shortcut": "nin_shortcut"}
    p: list[tuple[str, str, dict[str, str]]] = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        p += [(f"{part}.conv_in.", f"{part}.conv_in.", {}), (f"{part}.conv_out.", f"{part}.conv_out.", {}),
              (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
              (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", _VAE_ATTENTION)]
        p += [(f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", resnet) for k in range(2)]
    for i in range(levels):
        up = levels - 1 - i  # the decoder's blocks count up from the lowest resolution in the original
        p += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block.", {}),
              (f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}),
              (f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{up}.block.", {}),
              (f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{up}.upsample.conv.", {})]
    out = {}
    for key, value in _rename(state, p, "VAE").items():
        key = key.replace(".conv_shortcut.", ".nin_shortcut.")
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # the original's attention projections are 1x1 convolutions
        out[VAE + key] = value
    return out


def clip_to_original(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """transformers' CLIPTextModel names, under the checkpoint's prefix and ``text_model.``."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def openclip_to_original(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """transformers' CLIPTextModel(WithProjection) names -> open_clip's: one fused in_proj per attention, the
    projection stored transposed (``x @ text_projection``)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out: dict[str, Tensor] = {}
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    for key, value in state.items():
        if key in fixed:
            out[fixed[key]] = value
        elif key == "text_projection.weight":
            out["text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            i, rest = key.removeprefix("encoder.layers.").split(".", 1)
            block = f"transformer.resblocks.{i}."
            if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
                if rest.startswith("self_attn.q_proj"):
                    kind = rest.rsplit(".", 1)[1]
                    qkv = [state[f"encoder.layers.{i}.self_attn.{x}_proj.{kind}"] for x in "qkv"]
                    out[block + f"attn.in_proj_{kind}"] = torch.cat(qkv)
                continue
            name, kind = rest.rsplit(".", 1)
            out[block + _OPENCLIP_LAYER[name] + "." + kind] = value
        elif key != "embeddings.position_ids":
            raise KeyError(f"OpenCLIP: no original name for {key}")
    return {prefix + k: v for k, v in out.items()}


def to_original(arch: Architecture, unet, vae, encoders) -> dict[str, Tensor]:
    """A whole checkpoint in the original layout from diffusers / transformers modules."""
    state = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    for spec, model in zip(arch.encoders, encoders, strict=True):
        convert = clip_to_original if spec.layout == "clip" else openclip_to_original
        state.update(convert(model.state_dict(), spec.prefix))
    return state
