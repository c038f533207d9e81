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
    """W <- W + scale * delta for named parameters of the UNet (or, ``target="text_encoder"``, of the text
    encoder): a merged LoRA, delta = up @ down * alpha / rank. Undone by restoring a copy of the original
    tensors, so the weights come back bit for bit; at scale 0 nothing is touched."""

    deltas: Mapping[str, Tensor]
    scale: float = 1.0
    target: str = "unet"

    def apply(self, view: ModelBundle) -> Undo:
        from ..adapters.lora import target_module

        params = dict(target_module(view, self.target).named_parameters())
        missing = [name for name in self.deltas if name not in params]
        if missing:
            raise InvalidRequestError(f"the patch names a parameter the {self.target} does not have: {missing[0]}")
        saved: dict[str, Tensor] = {}
        if self.scale == 0.0:  # the base model, untouched
            return lambda: None
        with torch.no_grad():
            for name, delta in self.deltas.items():
                p = params[name]
                if delta.shape != p.shape:
                    raise InvalidRequestError(f"the patch for {name} has shape {tuple(delta.shape)}, the {self.target}'s is {tuple(p.shape)}")
                saved[name] = p.detach().clone()
                p.add_(delta.to(p.device, p.dtype), alpha=self.scale)

        def undo() -> None:
            with torch.no_grad():
                for name, original in saved.items():
                    params[name].copy_(original)

        return undo


# --- text encoder tokens -----------------------------------------------------------------------------


class TokenTable(torch.nn.Module):
    """An input embedding table with rows for new token ids ``first .. first + n - 1`` (the ids a tokenizer
    gives tokens added to it): those ids read ``rows``, every other id reads ``base`` unchanged (so prompts
    without the new tokens embed bit for bit as before). The new ids may lie inside the base table, which is
    often larger than its tokenizer's vocabulary. ``rows`` may be a trainable Parameter (textual inversion).
    Tables nest: a second table's base is the first."""

    def __init__(self, base: torch.nn.Module, first: int, rows: Tensor):
        super().__init__()
        self.base, self.first = base, int(first)
        self.rows = rows if isinstance(rows, torch.nn.Parameter) else torch.nn.Parameter(rows, requires_grad=False)

    @property
    def embedding_dim(self) -> int:
        return int(self.rows.shape[-1])

    def forward(self, ids: Tensor) -> Tensor:
        pos = ids - self.first
        new = (pos >= 0) & (pos < self.rows.shape[0])
        out = self.base(torch.where(new, torch.zeros_like(ids), ids))
        if not bool(new.any()):
            return out
        return torch.where(new.unsqueeze(-1), self.rows[pos.clamp(0, self.rows.shape[0] - 1)].to(out.dtype), out)


def add_tokens(encoder, vectors: Mapping[str, Tensor], rows: Tensor | None = None):
    """A copy of ``encoder`` (sharing its model) whose tokenizer knows the new tokens, and the TokenTable
    that embeds them over the model's current table (``rows``: the vectors as given, e.g. a Parameter).
    A token of n vectors is written as one word and expanded to ``<t> <t>_1 ... <t>_{n-1}``."""
    tokenizer = copy.deepcopy(encoder.tokenizer)
    vocab = tokenizer.get_vocab()
    names: list[str] = []
    expand = dict(getattr(encoder, "expansions", {}))
    for token, v in vectors.items():
        if token in vocab or token.lower() in vocab:
            raise InvalidRequestError(f"token {token!r} already exists in the text encoder's vocabulary; choose another")
        n = v.reshape(-1, v.shape[-1]).shape[0]
        parts = [token] + [f"{token}_{i}" for i in range(1, n)]
        names += parts
        if n > 1:
            expand[token] = " ".join(parts)
    first = len(tokenizer)
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(first, first + len(names))):
        raise InvalidRequestError("the tokenizer did not give the new tokens consecutive ids")
    old = encoder.model.get_input_embeddings()
    if rows is None:
        rows = torch.cat([v.reshape(-1, v.shape[-1]) for v in vectors.values()])
    dim = old.weight.shape[1] if hasattr(old, "weight") else old.embedding_dim
    if rows.shape[-1] != dim:
        raise InvalidRequestError(f"the embeddings are {rows.shape[-1]}-d; this text encoder's are {dim}-d")
    device = next(old.parameters()).device
    table = TokenTable(old, first, rows if isinstance(rows, torch.nn.Parameter) else rows.to(device))
    view = copy.copy(encoder)
    view.tokenizer = tokenizer
    view.expansions = expand
    return view, table


@dataclass(frozen=True)
class TokenEmbeddings:
    """New tokens with their input embeddings (textual inversion, Gal et al. 2022) for one request.

    ``vectors`` maps a token to its (D,) embedding, or to (n, D) for a token learned as n vectors (see
    :func:`add_tokens`). The view gets its own copy of the tokenizer with the tokens added; the shared
    encoder's input embedding module is wrapped in a :class:`TokenTable` (other ids embed exactly as
    before) and unwrapped afterwards."""

    vectors: Mapping[str, Tensor]  # token -> (D,) or (n, D)

    def apply(self, view: ModelBundle) -> Undo:
        encoder = view.text_encoder
        if encoder is None or not hasattr(encoder, "tokenizer"):
            raise InvalidRequestError("new token embeddings need a model with a transformers text encoder")
        model = encoder.model
        old = model.get_input_embeddings()
        view.text_encoder, table = add_tokens(encoder, self.vectors)
        model.set_input_embeddings(table)

        def undo() -> None:
            model.set_input_embeddings(old)

        return undo
