"""Imagic (Kawar et al. 2022): edit a real image by text, through embedding optimisation and fine-tuning.

1. The target text's token states e_tgt are optimised to e_opt, the model frozen, until e_opt
   reconstructs the image (the denoising loss on its latents).
2. The UNet is fine-tuned on the image with e_opt fixed; here a LoRA (the issue's choice, and peft's), so
   the result is a small adapter rather than a copy of the model.
3. Generation from noise with the fine-tuned model at e = eta * e_tgt + (1 - eta) * e_opt: eta = 0 gives
   the image back, larger eta moves it toward the text (about 0.6-0.8 in the paper).

Steps 1-2 are cached per (image, target, model, settings) in ``~/.cache/dreamlab/imagic/<key>``: more
edits of the same image (other etas, seeds) cost only sampling. Step 3 is a request
(``GenerationRequest.imagic``), so outputs carry manifests and replay.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .core.types import Cond
from .errors import DreamlabError
from .manifest import AdapterRecord
from .models.patches import Undo, WeightDelta

CACHE = Path("~/.cache/dreamlab/imagic")
EMBED_FILE = "imagic_embeddings.safetensors"


@dataclass(frozen=True)
class ImagicSettings:
    # measured on the default model (docs/personalization.md): e_opt moves ~18% from e_tgt; a longer or
    # stronger fine-tune (200 steps at 1e-3) memorises the image at e_tgt too, and no eta edits it
    embed_steps: int = 200
    embed_lr: float = 5e-3
    tune_steps: int = 100
    tune_lr: float = 5e-4
    rank: int = 8
    batch_size: int = 4
    seed: int = 0


def _key(image: bytes, target: str, model, settings: ImagicSettings) -> str:
    h = hashlib.sha256(image)
    h.update(json.dumps([target, sorted(model.files.items()), asdict(settings)]).encode())
    return h.hexdigest()[:20]


def prepare(model, image_bytes: bytes, target: str, settings: ImagicSettings = ImagicSettings(),
            cache: str | Path | None = None, on_progress=None) -> Path:
    """Steps 1 and 2 for ``image_bytes`` and ``target``: the folder of e_tgt, e_opt and the LoRA (cached)."""
    from safetensors.torch import save_file

    from .adapters.lora import save_lora
    from .request import open_image
    from .train.lora import peft_to_lora, peft_view

    folder = Path(cache or CACHE).expanduser() / _key(image_bytes, target, model, settings)
    if (folder / "imagic.json").is_file():
        return folder
    image = open_image(image_bytes, "the image")
    from .generate import _to_tensor

    size = model.sample_size
    x0 = model.space.encode(_to_tensor(image, model.space.image_channels, size, size).to(model.device)).float()
    target_cond = model.encode_prompts([target])
    if target_cond is None or target_cond.tokens is None:
        raise DreamlabError("Imagic needs a text-conditional model")
    gen = torch.Generator().manual_seed(settings.seed)
    torch.manual_seed(settings.seed)
    B, T = settings.batch_size, model.schedule.num_train_timesteps
    dev = model.device

    def batch():
        t = torch.randint(T, (B,), generator=gen).to(dev)
        return x0.expand(B, -1, -1, -1), torch.randn((B, *x0.shape[1:]), generator=gen).to(dev), t

    def cond_of(tokens: Tensor) -> Cond:
        pooled = _pooled(tokens, target_cond) if target_cond.pooled is not None else None
        return Cond(tokens=tokens.expand(B, -1, -1), mask=target_cond.mask.expand(B, -1),
                    pooled=pooled.expand(B, -1) if pooled is not None else None)

    total = settings.embed_steps + settings.tune_steps
    losses: dict[str, list[float]] = {"embed": [], "tune": []}

    def fit(denoiser, opt, steps: int, tokens: Tensor, key: str, done: int) -> None:
        for i in range(steps):
            xb, noise, t = batch()
            loss = denoiser.loss(xb, noise, t, cond_of(tokens), min_snr_gamma=5.0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses[key].append(loss.item())
            if on_progress:
                on_progress(done + i + 1, total)

    # 1. e_opt: the target's token states, optimised to reconstruct the image (the model frozen)
    e_tgt = target_cond.tokens.detach()
    e_opt = torch.nn.Parameter(e_tgt.clone())
    fit(model.denoiser(), torch.optim.Adam([e_opt], lr=settings.embed_lr), settings.embed_steps, e_opt, "embed", 0)
    e_opt = e_opt.detach()

    # 2. the UNet fine-tuned (a LoRA) on the image at e_opt
    from peft.utils import get_peft_model_state_dict

    view, params = peft_view(model, settings.rank, float(settings.rank), ("to_q", "to_k", "to_v", "to_out.0"))
    view.unet.train()
    fit(view.denoiser(), torch.optim.AdamW(params, lr=settings.tune_lr, weight_decay=1e-2), settings.tune_steps, e_opt,
        "tune", settings.embed_steps)
    lora = peft_to_lora(get_peft_model_state_dict(view.unet), float(settings.rank))
    del view

    folder.mkdir(parents=True, exist_ok=True)
    save_file({"target": e_tgt.float().cpu().contiguous(), "optimized": e_opt.float().cpu().contiguous()}, str(folder / EMBED_FILE))
    save_lora(lora, folder / "lora", {"imagic": True, "target": target})
    info = {"target": target, "settings": asdict(settings), "model": model.files,
            "image_sha256": hashlib.sha256(image_bytes).hexdigest(),
            "loss": {k: [round(v, 5) for v in vs[:: max(1, len(vs) // 50)]] for k, vs in losses.items()}}
    (folder / "imagic.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def _pooled(tokens: Tensor, like: Cond) -> Tensor:
    from .models.text import masked_mean

    return masked_mean(tokens, like.mask.to(tokens.device))


class _Interpolated:
    """A text encoder that encodes ``prompt`` as eta * e_tgt + (1 - eta) * e_opt, every other prompt as the
    model's encoder does."""

    def __init__(self, inner, prompt: str, tokens: Tensor):
        self.inner, self.prompt, self.tokens = inner, prompt, tokens

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def encode(self, prompts: list[str]) -> Cond:
        base = self.inner.encode(prompts)
        if self.prompt not in prompts:
            return base
        rows = torch.tensor([p == self.prompt for p in prompts])
        tokens = torch.where(rows[:, None, None], self.tokens.to(base.tokens.device, base.tokens.dtype), base.tokens)
        pooled = base.pooled
        if pooled is not None:
            pooled = torch.where(rows[:, None], _pooled(tokens, base), pooled)
        return Cond(tokens=tokens, mask=base.mask, pooled=pooled)


@dataclass(frozen=True)
class ImagicPatch:
    """Step 3 as a request's patch: the LoRA merged, the target prompt encoded as the interpolation."""

    folder: Path
    eta: float

    def apply(self, view) -> Undo:
        from safetensors.torch import load_file

        from .adapters.lora import lora_deltas, read_lora
        from .adapters.provider import _files

        info = json.loads((self.folder / "imagic.json").read_text())
        emb = load_file(str(self.folder / EMBED_FILE))
        tokens = self.eta * emb["target"] + (1 - self.eta) * emb["optimized"]
        undo = WeightDelta(lora_deltas(read_lora(self.folder / "lora"), view)["unet"], 1.0).apply(view)
        view.text_encoder = _Interpolated(view.text_encoder, info["target"], tokens)
        view.applied_adapters.append(AdapterRecord(kind="imagic", name=self.folder.name, source=str(self.folder),
                                                   files={**_files(self.folder), **{f"lora/{k}": v for k, v in _files(self.folder / 'lora').items()}},
                                                   scale=self.eta))
        return undo


def imagic_patches(model, req) -> list:
    """The patch provider: a request with ``imagic`` set runs on its prepared folder at its eta."""
    if getattr(req, "imagic", None) is None:
        return []
    folder = model.adapters.registered.get("imagic", {}).get(req.imagic.name)
    if folder is None:
        raise DreamlabError(f"no prepared Imagic edit named {req.imagic.name!r}; run `dreamlab imagic` on the image first")
    info = json.loads((folder / "imagic.json").read_text())
    if info["target"] != req.prompt:
        raise DreamlabError(f"Imagic edit {req.imagic.name} was prepared for the prompt {info['target']!r}, not {req.prompt!r}")
    return [ImagicPatch(folder, req.imagic.eta)]
