"""Text encoders behind one protocol: prompts -> per-token states for cross-attention.

A frozen pretrained language model conditions a diffusion model well (Saharia et al. 2022, Imagen):
dreamlab's default models use all-MiniLM-L6-v2 (BERT, 384-d); Stable Diffusion checkpoints use CLIP's
text transformer. Both are transformers models and go through :class:`TransformersTextEncoder`.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..core.types import Cond

Pooling = Literal["mean", "pooler", "none"]


@runtime_checkable
class TextEncoder(Protocol):
    dim: int  # width of the per-token states
    max_length: int  # prompts are padded / truncated to this many tokens

    def encode(self, prompts: list[str]) -> Cond:
        """(B,) prompts -> Cond with tokens (B, max_length, dim), mask (B, max_length), pooled (B, dim)."""
        ...


class TransformersTextEncoder:
    """A frozen transformers encoder (BertModel, CLIPTextModel, ...) with its tokenizer.

    pooling: "mean" averages the states of real tokens (sentence-transformers' pooling for MiniLM);
    "pooler" takes the model's ``pooler_output`` (CLIP's end-of-text token); "none" leaves pooled unset.
    """

    def __init__(self, tokenizer, model, *, max_length: int, pooling: Pooling = "mean", device: str | torch.device = "cpu"):
        self.tokenizer = tokenizer
        self.model = model.eval().requires_grad_(False).to(device)
        self.max_length = max_length
        self.pooling = pooling
        self.dim = int(model.config.hidden_size)
        self.device = torch.device(device)
        self.expansions: dict[str, str] = {}  # a multi-vector token -> its tokens (textual inversion)

    def expand(self, prompt: str) -> str:
        for token, tokens in self.expansions.items():
            prompt = prompt.replace(token, tokens)
        return prompt

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Cond:
        return self.encode_with_grad(prompts)

    def encode_with_grad(self, prompts: list[str]) -> Cond:
        """``encode`` with autograd on: what textual inversion and Imagic optimise through."""
        batch = self.tokenizer(
            [self.expand(p) for p in prompts], padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        ids = batch["input_ids"].to(self.device)
        mask = batch["attention_mask"].to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask)
        tokens: Tensor = out.last_hidden_state
        if self.pooling == "mean":
            pooled = masked_mean(tokens, mask)
        elif self.pooling == "pooler":
            pooled = out.pooler_output
        else:
            pooled = None
        return Cond(tokens=tokens, mask=mask, pooled=pooled)


def masked_mean(tokens: Tensor, mask: Tensor) -> Tensor:
    """(B, L, D) token states, (B, L) mask -> (B, D) mean over the real tokens: the "mean" pooling, shared
    by the encoder and the trainer (which pools the token states it cached)."""
    m = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * m).sum(1) / m.sum(1).clamp_min(1)
