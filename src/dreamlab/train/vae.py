"""Train the RGBA autoencoder: 64x64x4 images <-> 16x16x4 latents (factor 4), diffusers AutoencoderKL.

Loss (per pixel, mean-reduced): L1 reconstruction with the colour channels weighted by
0.1 + 0.9 * alpha (the colour of a transparent pixel is invisible, so it should cost little), plus
kl_weight * KL(q(z|x) || N(0, I)) which keeps the latent space smooth enough to diffuse in. After
training, ``scaling_factor`` is set to 1 / std of the latents so the diffusion model sees unit variance.

Metrics on the held-out split: PSNR of colour composited on white (what a viewer sees) and of alpha.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from ..data.dataset import EmojiDataset
from ..images import grid, to_pil
from .common import (
    EMA,
    Dist,
    Log,
    init_distributed,
    lr_at,
    resume,
    save_checkpoint,
    save_config,
    shutdown_distributed,
    update,
)
from ..settings import VAEConfig  # noqa: F401  (the configuration, kept torch-free)




def build_vae(cfg: VAEConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    return AutoencoderKL(
        in_channels=4,
        out_channels=4,
        latent_channels=cfg.latent_channels,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=min(32, cfg.block_out_channels[0]),
        sample_size=64,
    )


def load_images(data: str, split: str, styles) -> torch.Tensor:
    ds = EmojiDataset(Path(data), split=split, styles=styles)
    idx = [r["index"] for r in ds.records]
    arr = np.asarray(ds.images[np.sort(idx)])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    alpha = (x[:, 3:4] + 1) / 2
    w = torch.cat([(0.1 + 0.9 * alpha).expand(-1, 3, -1, -1), torch.ones_like(alpha)], dim=1)
    return ((recon - x).abs() * w).mean()


def psnr_colour_alpha(recon: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """PSNR (dB) of colour composited on white, and of alpha, for images in [-1, 1]."""

    def on_white(t: torch.Tensor) -> torch.Tensor:
        t = ((t.clamp(-1, 1) + 1) / 2).float()
        return t[:, :3] * t[:, 3:4] + (1 - t[:, 3:4])

    def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        mse = ((a - b) ** 2).mean().item()
        return 10 * math.log10(1.0 / max(mse, 1e-12))

    return psnr(on_white(recon), on_white(x)), psnr((recon[:, 3].clamp(-1, 1) + 1) / 2, (x[:, 3] + 1) / 2)


@torch.no_grad()
def evaluate(vae, images: torch.Tensor, batch: int = 128) -> dict[str, float]:
    recons = []
    for i in range(0, len(images), batch):
        x = images[i:i + batch].to(next(vae.parameters()).device)
        recons.append(vae.decode(vae.encode(x).latent_dist.mean).sample.cpu())
    colour, alpha = psnr_colour_alpha(torch.cat(recons), images)
    return {"psnr_colour": colour, "psnr_alpha": alpha}


@torch.no_grad()
def latent_std(vae, images: torch.Tensor, batch: int = 128) -> float:
    zs = [vae.encode(images[i:i + batch].to(next(vae.parameters()).device)).latent_dist.mean.cpu() for i in range(0, len(images), batch)]
    return float(torch.cat(zs).std())


def export_vae(vae, ema: EMA, train_images: torch.Tensor, dest: Path) -> float:
    """Save the EMA weights in diffusers format with scaling_factor = 1 / latent std. Returns the factor."""
    from diffusers import AutoencoderKL

    export = AutoencoderKL.from_config(vae.config)
    ema.copy_to(export)
    export.eval()
    scale = 1.0 / latent_std(export, train_images[:1024])
    export.register_to_config(scaling_factor=scale)
    tmp = dest.with_name(f".tmp-{dest.name}")
    export.save_pretrained(tmp)
    import shutil

    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return scale


class _Autoencode(torch.nn.Module):
    """One forward for DDP: encode, sample the posterior, decode."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor):
        post = self.vae.encode(x).latent_dist
        return self.vae.decode(post.sample()).sample, post.mean, post.logvar


def train_vae(cfg: VAEConfig) -> Path:
    d: Dist = init_distributed(cfg.device)
    out = Path(cfg.out).expanduser()
    if d.main:
        save_config(out, cfg)
    torch.manual_seed(cfg.seed + d.rank)
    train_images = load_images(cfg.data, "train", cfg.styles)
    test_images = load_images(cfg.data, "test", cfg.styles)

    vae = build_vae(cfg)
    ema = EMA(vae, cfg.ema_decay)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.99))
    step = resume(out, vae, opt, ema, d, cfg.init)
    vae.to(d.device).train()
    model = DDP(_Autoencode(vae)) if d.world > 1 else _Autoencode(vae)
    log = Log(out, enabled=d.main)
    log.rewind(step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank * 7919 + step)

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="vae", disable=not d.main, dynamic_ncols=True)
    t0, seen = time.time(), 0
    while step < cfg.steps:
        idx = torch.randint(len(train_images), (cfg.batch_size,), generator=gen)
        x = train_images[idx].to(d.device)
        recon, mean, logvar = model(x)
        rec = reconstruction_loss(recon, x)
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        update(rec + cfg.kl_weight * kl, vae, opt, ema, lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        step += 1
        seen += cfg.batch_size * d.world
        bar.update(1)
        if step % cfg.log_every == 0:
            rec_m, kl_m = d.mean(rec.item()), d.mean(kl.item())
            ips = seen / (time.time() - t0)
            log.write(step, loss=rec_m + cfg.kl_weight * kl_m, rec=rec_m, kl=kl_m, lr=opt.param_groups[0]["lr"], images_per_s=ips)
            bar.set_postfix(rec=f"{rec_m:.4f}", kl=f"{kl_m:.2f}", ips=f"{ips:.0f}")
        if d.main and (step % cfg.eval_every == 0 or step == cfg.steps):
            _eval_and_export(vae, ema, train_images, test_images, out, step, log)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if d.main:
                save_checkpoint(out, step, vae, ema, opt, {"config": "config.json"})
                log.plot(("rec",))
            d.barrier()
    bar.close()
    shutdown_distributed()
    return out / "vae"


def _eval_and_export(vae, ema, train_images, test_images, out: Path, step: int, log: Log) -> None:
    from diffusers import AutoencoderKL

    scale = export_vae(vae, ema, train_images, out / "vae")
    ema_vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    metrics = evaluate(ema_vae, test_images)
    log.write(step, scaling_factor=scale, **{f"test_{k}": v for k, v in metrics.items()})
    with torch.no_grad():
        x = test_images[:16]
        recon = ema_vae.decode(ema_vae.encode(x).latent_dist.mean).sample
    grid(to_pil(torch.cat([x, recon])), cols=16, scale=2).save(out / "reconstructions.png")
    (out / "metrics.json").write_text(json.dumps({"step": step, "scaling_factor": scale, **metrics}, indent=2))
