"""LoRA fine-tuning of the UNet through peft, and DreamBooth (Ruiz et al. 2022) with it.

peft adds the low-rank branches to the UNet's attention projections (``LoraConfig.target_modules``);
only they train. With ``--class``, DreamBooth's prior preservation: the base model first draws
``class_images`` images of the class prompt (kept in OUT/class_images, reused), and every step adds their
denoising loss, weighted by ``prior_weight``, to the instance loss, so the class keeps its look while the
rare identifier ("a sks cat face") takes the subject. The loss is the base model's own through
``Denoiser.loss``. Saved as a diffusers/peft folder and as a kohya/A1111 file (docs/personalization.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..adapters.lora import LoraLayer, LoraWeights, save_kohya, save_lora
from ..errors import DreamlabError
from ..settings import LoraTrainConfig  # noqa: F401  (the configuration, kept torch-free)
from .personal import Loop, Shots, base_model, batch_noise, load_shots, sample_grid

KOHYA_FILE = "lora.safetensors"


def class_images(model, prompt: str, n: int, folder: Path, steps: int = 20, captions: list[str] | None = None) -> Shots:
    """``n`` images of ``prompt`` from the base model (seeds 0..n-1), generated once and kept; a prompt
    with {caption} cycles through ``captions`` (a style's class: the same emoji drawn by the base model)."""
    prompts = [prompt.replace("{caption}", c) for c in (captions or [""])] if "{caption}" in prompt else [prompt]
    from PIL import Image

    from ..generate import generate
    from ..metadata import save_png
    from ..request import make_request

    folder.mkdir(parents=True, exist_ok=True)
    recipe = {"prompts": prompts, "steps": steps, "model": model.files}
    made = folder / "recipe.json"
    if not (made.is_file() and json.loads(made.read_text()) == recipe and len(list(folder.glob("*.png"))) >= n):
        for old in folder.glob("*.png"):
            old.unlink()
        for i in range(n):
            res = generate(model, make_request(prompt=prompts[i % len(prompts)], seed=i, steps=steps))
            save_png(res.images[0], folder / f"class-{i:03d}.png", res.manifests[0])
        made.write_text(json.dumps(recipe, sort_keys=True))
    files = sorted(folder.glob("*.png"))[:n]
    px = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGBA" if model.space.image_channels == 4 else "RGB"),
                                                  dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1 for f in files])
    lat = model.space.encode(px.to(model.device)).float()
    return Shots(px, lat, [prompts[i % len(prompts)] for i in range(len(files))], {})


def peft_to_lora(state: dict[str, torch.Tensor], alpha: float) -> LoraWeights:
    layers: dict[str, LoraLayer] = {}
    for key in state:
        if key.endswith(".lora_A.weight"):
            module = key.removesuffix(".lora_A.weight")
            layers[module] = LoraLayer(state[key].detach().float().cpu(), state[f"{module}.lora_B.weight"].detach().float().cpu(), alpha)
    return LoraWeights({"unet": layers})


def peft_view(model, rank: int, alpha: float, targets) -> tuple:
    """A view of ``model`` whose UNet is a copy with peft's LoRA layers on ``targets`` (the model itself stays
    the base), and the LoRA parameters to train."""
    import copy

    from peft import LoraConfig

    view = model.clone()
    view.unet = unet = copy.deepcopy(model.unet)
    unet.requires_grad_(False)
    try:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights="gaussian"))
    except ValueError as e:
        raise DreamlabError(f"--targets {','.join(targets)}: {str(e).splitlines()[0]}") from None
    return view, [p for p in unet.parameters() if p.requires_grad]


def train_lora(cfg: LoraTrainConfig) -> Path:
    from peft.utils import get_peft_model_state_dict

    if not 1 <= cfg.rank <= 256:
        raise DreamlabError("--rank: 1 to 256")
    model = base_model(cfg.base, cfg.device)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    shots = load_shots(cfg.images, model)
    prior = (class_images(model, cfg.class_prompt, cfg.class_images, out / "class_images", captions=shots.captions)
             if cfg.class_prompt else None)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    alpha = float(cfg.alpha if cfg.alpha is not None else cfg.rank)

    view, params = peft_view(model, cfg.rank, alpha, cfg.targets)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=1e-2)
    denoiser = view.denoiser()
    dev = model.device
    prompts_of = lambda s, idx: [cfg.instance.replace("{caption}", s.captions[int(i)]) for i in idx]  # noqa: E731
    loop = Loop(out, cfg.steps, f"lora {Path(cfg.out).name}", cfg.log_every)
    view.unet.train()
    T = model.schedule.num_train_timesteps
    for step in range(1, cfg.steps + 1):
        idx, x0, t, noise = batch_noise(shots, cfg.batch_size, T, gen, cfg.flip)
        cond = model.encode_prompts(prompts_of(shots, idx))
        loss = inst = denoiser.loss(x0.to(dev), noise.to(dev), t.to(dev), cond, min_snr_gamma=cfg.min_snr_gamma)
        metrics = {}
        if prior is not None:
            pidx, px0, pt, pnoise = batch_noise(prior, cfg.batch_size, T, gen, False)
            pl = denoiser.loss(px0.to(dev), pnoise.to(dev), pt.to(dev), model.encode_prompts([prior.captions[int(i)] for i in pidx]),
                               min_snr_gamma=cfg.min_snr_gamma)
            loss = inst + cfg.prior_weight * pl
            metrics = {"instance": inst.item(), "prior": pl.item()}
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loop.step(step, loss=loss.item(), **metrics)
        if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
            save_lora(peft_to_lora(get_peft_model_state_dict(view.unet), alpha), out / "snapshots" / f"step-{step:05d}",
                      {"steps": step})
    view.unet.eval()
    seconds = loop.close(("loss", "instance", "prior") if prior is not None else ("loss",))
    lora = peft_to_lora(get_peft_model_state_dict(view.unet), alpha)
    del view
    lora.meta = {"instance": cfg.instance, "class_prompt": cfg.class_prompt, "class_images": cfg.class_images if prior else 0,
                 "prior_weight": cfg.prior_weight, "rank": cfg.rank, "alpha": alpha, "targets": list(cfg.targets),
                 "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr, "train_seconds": round(seconds, 1),
                 "images": shots.files, "base_model": model.name, "base_files": model.files}
    save_lora(lora, out)
    save_kohya(lora, out / KOHYA_FILE)
    if cfg.samples:
        from ..adapters.lora import lora_deltas
        from ..models.patches import WeightDelta

        patch = WeightDelta(lora_deltas(lora, model)["unet"], 1.0)
        prompts = [cfg.instance.replace("{caption}", shots.captions[0])]
        if cfg.class_prompt:
            prompts.append(cfg.class_prompt)
        sample_grid(model, prompts, out, patches=[patch])
    return out
