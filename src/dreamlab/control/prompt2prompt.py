"""Prompt-to-prompt (Hertz et al. 2022): edit an image by editing its prompt, with the attention of the
source's generation injected into the edit's.

The source (stream 0) and the edit (stream 1) are sampled side by side from the same noise. At every
attention layer the controller keeps the probabilities of the source's conditional row and, in the
edit's conditional row:
- cross-attention, for the first ``cross_replace`` of the steps (per word if asked): the source's maps,
  token for token (*replace*, a word swap) or through the token alignment (*refine*, words added: new
  tokens keep their own maps), mixed per token as prompt-to-prompt's ``alpha_words``;
- *reweight*: the maps of named words scaled (``--reweight red=2``), at every step;
- self-attention, for the first ``self_replace`` of the steps: the source's, so the layout stays.
*Local blend*: after each step, the edit's latents outside a mask are set to the source's; the mask
comes from the named words' cross-attention (source and edit, summed over the steps so far), dilated,
min-max normalised and thresholded.

The source's rows are only read (computed by the model's own processor), so the source is exactly the
image plain generation gives for its prompt and seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor

from ..core.types import Role, StepInfo
from .attention import CrossAttentionStore, Site

SOURCE, EDIT = 0, 1  # streams


@dataclass(eq=False)
class PromptToPrompt:
    steps: int  # of the sampling run
    index: Tensor  # (K,) source key position for each edit key position
    weight: Tensor  # (K,) 1: take the source's map there (mapped); 0: keep the edit's own (new tokens)
    cross_until: Tensor  # (K,) per key position: replace cross-attention while step < this
    self_until: int  # replace self-attention while step < this
    equalizer: Tensor | None = None  # (K,) scale of each key position's attention in the edit
    _kept: dict[str, Tensor] = field(default_factory=dict)

    def _edit_rows(self, site: Site) -> list[int]:
        return site.rows(Role.COND, EDIT)

    def _active(self, site: Site) -> bool:
        step = site.step or 0
        if site.cross:
            return bool((step < self.cross_until).any()) or self.equalizer is not None
        return step < self.self_until

    def wants(self, site: Site) -> bool:
        return self._active(site) and bool(site.rows(Role.COND, SOURCE) or self._edit_rows(site))

    def changes(self, site: Site) -> bool:
        return bool(self._edit_rows(site))

    def edit(self, probs: Tensor, site: Site) -> Tensor:
        key = f"{site.layer.name}:{'cross' if site.cross else 'self'}"
        source = site.rows(Role.COND, SOURCE)
        if source:
            self._kept[key] = probs[source].detach().clone()
            return probs
        rows = self._edit_rows(site)
        if not rows or key not in self._kept:
            return probs
        base, own = self._kept[key], probs[rows]
        step = site.step or 0
        if site.cross:
            k = own.shape[-1]
            mapped = base.index_select(-1, self.index[:k].to(base.device))
            w = self.weight[:k].to(own)
            new = mapped * w + own * (1 - w)
            a = (step < self.cross_until[:k]).to(own)  # per token: inside its replacement window
            new = new * a + own * (1 - a)
            if self.equalizer is not None:
                new = new * self.equalizer[:k].to(own)
        else:
            new = base.expand_as(own) if step < self.self_until else own
        probs = probs.clone()
        probs[rows] = new
        return probs


@dataclass(eq=False)
class LocalBlend:
    """A state hook (``on_step``) and the two cross-attention stores it reads. Row 0 of the state is the
    source, row 1 the edit; ``source_words`` / ``edit_words``: key positions of the named words."""

    source_words: list[int]
    edit_words: list[int]
    threshold: float = 0.3
    dilate: int = 1  # max-pool radius, in latent pixels
    stores: tuple[CrossAttentionStore, CrossAttentionStore] = field(
        default_factory=lambda: (CrossAttentionStore(SOURCE), CrossAttentionStore(EDIT)))
    masks: list[Tensor] = field(default_factory=list)  # the mask of every step, for tests and figures

    def mask(self) -> Tensor | None:
        parts = []
        for store, words in zip(self.stores, (self.source_words, self.edit_words)):
            maps = store.maps()
            if maps is None or not words:
                continue
            m = maps[:, words].sum(1, keepdim=True)  # (1, 1, H, W)
            m = F.max_pool2d(m, 2 * self.dilate + 1, 1, padding=self.dilate)
            lo, hi = m.amin(dim=(2, 3), keepdim=True), m.amax(dim=(2, 3), keepdim=True)
            m = (m - lo) / (hi - lo).clamp_min(1e-12)  # min-max (prompt-to-prompt divides by the max: our
            # maps are diffuse, with a floor near their max, and a max-normalised mask would be everything)
            parts.append(m > self.threshold)
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = out | p
        return out.float()

    def __call__(self, info: StepInfo) -> Tensor | None:
        m = self.mask()
        if m is None:
            return None
        m = m.to(info.x)
        self.masks.append(m[0, 0].cpu())
        x = info.x.clone()
        x[1:] = x[:1] + m * (x[1:] - x[:1])
        return x
