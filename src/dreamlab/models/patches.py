"""Patches scoped to one request: attention processors, weight deltas (LoRA), new token embeddings.

A request runs on a *view* of the loaded model (``ModelBundle.clone()``, ComfyUI's ``ModelPatcher.clone()``):
it shares the networks, so nothing is copied. A patch changes the view's own fields (which nobody else
sees), or changes a shared network and returns how to undo it exactly (the original processors, the
original weights bit for bit, the original embedding module). :func:`patched` applies patches in order
and undoes them in reverse when the request ends, also when it fails or is cancelled, so a job on the
server's shared model never leaks into the next. The server runs one job at a time per model, which
is what makes undoing changes to a shared network safe.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from ..errors import InvalidRequestError
from .bundle import ModelBundle

Undo = Callable[[], None]


class Patch(Protocol):
    def apply(self, view: ModelBundle) -> Undo:
        """Change ``view`` (a request's clone of a model) and return what undoes the change."""
        ...


@contextmanager
def patched(model: ModelBundle, patches: Sequence[Patch] = ()) -> Iterator[ModelBundle]:
    """A view of ``model`` with ``patches`` applied, undone in reverse order on exit."""
    view = model.clone()
    undo: list[Undo] = []
    try:
        for p in patches:
            undo.append(p.apply(view))
        yield view
    finally:
        for u in reversed(undo):
            u()


# --- attention processors ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One attention layer of a UNet, as a processor factory sees it."""

    name: str  # e.g. "down_blocks.1.attentions.0.transformer_blocks.0.attn2"
    module: Any  # diffusers' Attention
    cross: bool  # cross-attention (attends to the text) rather than self-attention
    place: str  # "down", "mid" or "up"


# A factory gives the processor for a layer, or None to keep the model's own there.
ProcessorFactory = Callable[[Layer], Any]


def attention_layers(unet) -> list[Layer]:
    """The UNet's attention layers, in the order of ``unet.attn_processors``."""
    layers = []
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        module = unet.get_submodule(name)
        place = "mid" if name.startswith("mid_block") else name.split("_", 1)[0]
        layers.append(Layer(name, module, bool(getattr(module, "is_cross_attention", False)), place))
    return layers


@dataclass(frozen=True)
class AttentionProcessors:
    """Install processors from ``factory`` for one request; the model's own return afterwards.

    Processors installed this way get the current :class:`~dreamlab.core.types.ModelCall` as a ``call``
    keyword (the step index, sigma and every row's role), passed explicitly by the UNet adapter: a
    processor never counts calls to find the step. A processor's ``__call__`` must name ``call`` among
    its parameters (diffusers passes on only the keywords a processor names)."""

    factory: ProcessorFactory

    def apply(self, view: ModelBundle) -> Undo:
        unet = view.unet
        saved = dict(unet.attn_processors)
        chosen = {f"{layer.name}.processor": self.factory(layer) for layer in attention_layers(unet)}
        unet.set_attn_processor({k: p if p is not None else saved[k] for k, p in chosen.items()})
        was = view.pass_call
        view.pass_call = True

        def undo() -> None:
            unet.set_attn_processor(saved)
            view.pass_call = was

        return undo


class CallProcessor:
    """A processor that runs the model's own processor unchanged and lets ``observe`` see each call
    (the layer, the ModelCall); the base for controllers that only read. The default processor's
    output is bit-identical to what it gives without this wrapper."""

    def __init__(self, inner: Any, layer: Layer, observe: Callable[[Layer, Any], None] | None = None):
        self.inner, self.layer, self.observe = inner, layer, observe

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, call=None):
        if self.observe is not None:
            self.observe(self.layer, call)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


# --- weights -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightDelta:
    """W <- W + scale * delta for named UNet parameters (a merged LoRA: delta = up @ down * alpha / rank).
    Undone by restoring a copy of the original tensors, so the weights come back bit for bit."""

    deltas: Mapping[str, Tensor]
    scale: float = 1.0

    def apply(self, view: ModelBundle) -> Undo:
        params = dict(view.unet.named_parameters())
        missing = [name for name in self.deltas if name not in params]
        if missing:
            raise InvalidRequestError(f"the patch names a parameter the UNet does not have: {missing[0]}")
        saved: dict[str, Tensor] = {}
        with torch.no_grad():
            for name, delta in self.deltas.items():
                p = params[name]
                if delta.shape != p.shape:
                    raise InvalidRequestError(f"the patch for {name} has shape {tuple(delta.shape)}, the UNet's is {tuple(p.shape)}")
                saved[name] = p.detach().clone()
                if self.scale != 0.0:
                    p.add_(delta.to(p.device, p.dtype), alpha=self.scale)

        def undo() -> None:
            with torch.no_grad():
                for name, original in saved.items():
                    params[name].copy_(original)

        return undo


# --- text encoder tokens -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEmbeddings:
    """New tokens with their input embeddings (textual inversion, Gal et al. 2022) for one request.

    The view gets its own copy of the tokenizer with the tokens added; the shared encoder's input
    embedding module is swapped for one with the new rows appended (the old rows are the same tensor
    values, so prompts without the new tokens encode exactly as before) and swapped back afterwards."""

    vectors: Mapping[str, Tensor]  # token -> (D,) embedding

    def apply(self, view: ModelBundle) -> Undo:
        encoder = view.text_encoder
        if encoder is None or not hasattr(encoder, "tokenizer"):
            raise InvalidRequestError("new token embeddings need a model with a transformers text encoder")
        tokenizer = copy.deepcopy(encoder.tokenizer)
        vocab = tokenizer.get_vocab()
        for token in self.vectors:
            if token in vocab or token.lower() in vocab:
                raise InvalidRequestError(f"token {token!r} already exists in the text encoder's vocabulary; choose another")
        tokenizer.add_tokens(list(self.vectors))
        model = encoder.model
        old = model.get_input_embeddings()
        rows = torch.stack([v.to(old.weight.dtype) for v in self.vectors.values()]).to(old.weight.device)
        if rows.shape[-1] != old.weight.shape[1]:
            raise InvalidRequestError(f"the embeddings are {rows.shape[-1]}-d; this text encoder's are {old.weight.shape[1]}-d")
        new = torch.nn.Embedding(old.num_embeddings + rows.shape[0], old.embedding_dim, padding_idx=old.padding_idx)
        with torch.no_grad():
            new.weight.copy_(torch.cat([old.weight, rows]))
        new.requires_grad_(False).to(old.weight.device)
        model.set_input_embeddings(new)
        view.text_encoder = copy.copy(encoder)
        view.text_encoder.tokenizer = tokenizer

        def undo() -> None:
            model.set_input_embeddings(old)

        return undo
