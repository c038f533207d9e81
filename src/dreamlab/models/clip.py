"""Stable Diffusion's CLIP text encoders, called as the models were trained (and as diffusers calls them).

- SD 1.x: CLIP ViT-L/14's text transformer; cross-attention sees its last hidden state (after the final
  layer norm).
- SD 2.x: OpenCLIP ViT-H/14's, without its last layer: the converted encoder has 23 of the 24 layers, so
  its last hidden state is the penultimate layer's output with the final layer norm, as SD 2 used it.
- SDXL: CLIP ViT-L and OpenCLIP ViT-bigG side by side (Podell et al. 2023, sec. 2.1): each one's
  penultimate hidden state (no final norm), concatenated along the features (768 + 1280 = 2048); the
  pooled embedding is the second encoder's projected end-of-text state (``text_embeds``), which the UNet
  adds to its timestep embedding with the size conditioning (``models/unet.py``).

Prompts are padded to 77 tokens and no attention mask is passed: the models were trained attending to
the padding, and the UNet cross-attends to the padding's states too. Longer prompts are truncated.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..core.types import Cond


class ClipTextEncoder:
    """One or two (tokenizer, CLIPTextModel / CLIPTextModelWithProjection) pairs behind the TextEncoder protocol.

    penultimate: condition on the second-to-last layer's states (SDXL) instead of the last hidden state.
    """

    def __init__(self, parts: Sequence[tuple[object, torch.nn.Module]], *, penultimate: bool = False,
                 device: str | torch.device = "cpu"):
        self.parts = [(tokenizer, model.eval().requires_grad_(False).to(device)) for tokenizer, model in parts]
        self.penultimate = penultimate
        self.dim = sum(int(model.config.hidden_size) for _, model in parts)
        self.max_length = int(parts[0][1].config.max_position_embeddings)
        last = parts[-1][1]
        self.pooled_dim = int(last.config.projection_dim if hasattr(last, "text_projection") else last.config.hidden_size)
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        states, pooled, mask = [], None, None
        for tokenizer, model in self.parts:
            batch = tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt")
            out = model(input_ids=batch["input_ids"].to(self.device), output_hidden_states=self.penultimate)
            states.append(out.hidden_states[-2] if self.penultimate else out.last_hidden_state)
            pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
            mask = batch["attention_mask"].to(self.device) if mask is None else mask
        return Cond(tokens=torch.cat(states, dim=-1), mask=mask, pooled=pooled)
