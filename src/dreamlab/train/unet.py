"""Train the latent text-conditional UNet (diffusers UNet2DConditionModel with cross-attention).

Recipe chosen to learn quickly on little compute: latents and caption embeddings are encoded once and
cached; v-prediction (Salimans & Ho 2022) with Min-SNR-5 weighting (Hang et al. 2023); AdamW with warm-up
and cosine decay; EMA weights; 10% of captions dropped to the empty prompt so the model also learns the
unconditional score that classifier-free guidance needs (Ho & Salimans 2022). Attention only at the two
lowest resolutions, where it is cheap.

The same trainer makes the two stages of a cascade (Ho et al. 2021, "Cascaded Diffusion Models"):
``resolution=32`` trains a base model on 32x32 images (8x8x4 latents), and ``sr_from=32`` a 2x
super-resolution stage: a UNet that also sees the latents of the bicubically upsampled low-resolution
image (concatenated to its input) and, through its class embedding, the level of Gaussian noise added to
those latents during training (conditioning augmentation, so it tolerates the base model's flaws).
"""

from __future__ import annotations

import json
import random
from collections import Counter
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP

from ..core.objectives import q_sample
from ..core.prediction import Denoiser, Prediction
from ..core.schedules import DiscreteSchedule
from ..data.captions import caption
from ..data.dataset import EmojiDataset
from ..errors import DreamlabError, ModelNotFoundError
from ..images import grid, resize
from ..core.types import Cond
from ..models.text import masked_mean
from ..models.unet import UNetModelFn
from .common import (
    EMA,
    Dist,
    Log,
    init_distributed,
    latest_checkpoint,
    lr_at,
    resume,
    save_checkpoint,
    save_config,
    shutdown_distributed,
    update,
)
from ..settings import UNetConfig  # noqa: F401  (the configuration, kept torch-free)

SAMPLE_PROMPTS = [
    "red apple", "grinning face", "red heart", "cat face", "pizza", "rocket", "sun", "star",
    "dog face", "thumbs up, google style", "thumbs up, twitter style", "waving hand, dark skin tone",
    "green apple", "birthday cake", "snowman", "fire",
]




LATENT_FACTOR = 4  # the emoji autoencoder's downsampling
SAMPLING = ("concept", "image")
MIXED_PRECISION = ("no", "bf16")
DEFAULT_SR_NOISE = 50  # conditioning augmentation an exported SR stage samples with (a timestep)


def build_unet(cfg: UNetConfig, cross_dim: int = 384):
    from diffusers import UNet2DConditionModel

    n = len(cfg.block_out_channels)
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1)
    up = ("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",)
    if cfg.sr_from:
        extra = {"class_embed_type": "timestep"}  # the augmentation level, embedded like t
    elif cfg.pooled_text:
        extra = {"class_embed_type": "projection", "projection_class_embeddings_input_dim": cross_dim}
    else:
        extra = {}
    unet = UNet2DConditionModel(
        sample_size=cfg.resolution // LATENT_FACTOR,
        in_channels=8 if cfg.sr_from else 4,  # SR: noisy latents + latents of the upsampled low-res image
        out_channels=4,
        **extra,
        block_out_channels=tuple(cfg.block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=cfg.layers_per_block,
        attention_head_dim=cfg.attention_head_dim,
        cross_attention_dim=cross_dim,
        norm_num_groups=32,
    )
    if cfg.pooled_text:
        # Zero output layer: the new path starts as a no-op, so it can be added to a trained model
        # (--init from one without it) without disturbing what that model already does.
        torch.nn.init.zeros_(unet.class_embedding.linear_2.weight)
        torch.nn.init.zeros_(unet.class_embedding.linear_2.bias)
    return unet


def schedule_config(prediction: str) -> dict:
    return {
        "_class_name": "DDPMScheduler",
        "num_train_timesteps": 1000,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "prediction_type": prediction,
        "clip_sample": False,
    }


# ------------------------------------------------------------------------------------------------ cache


@torch.no_grad()
def build_cache(cfg: UNetConfig, cache: Path) -> None:
    """Encode every training image (posterior mean and std) and K captions per image, once."""
    from diffusers import AutoencoderKL

    from ..loading.text_encoders import load_minilm

    cache.mkdir(parents=True, exist_ok=True)
    ds = EmojiDataset(Path(cfg.data), split="train")
    vae = AutoencoderKL.from_pretrained(cfg.vae).eval()
    scale = float(vae.config.scaling_factor)
    means, stds, lowres = [], [], []
    for i in range(0, len(ds), 128):
        x = resize(torch.stack([ds[j][0] for j in range(i, min(i + 128, len(ds)))]), cfg.resolution)
        post = vae.encode(x).latent_dist
        means.append(post.mean * scale)
        stds.append(post.std * scale)
        if cfg.sr_from:
            lowres.append(vae.encode(upsampled_lowres(x, cfg.sr_from)).latent_dist.mean * scale)
    encoder = load_minilm(cfg.max_length)
    rng = random.Random(cfg.seed)
    texts = [caption(ds.records[i], rng) for _ in range(cfg.captions_per_image) for i in range(len(ds))]
    tokens, masks = [], []
    for i in range(0, len(texts), 256):
        c = encoder.encode(texts[i:i + 256])
        tokens.append(c.tokens.half())
        masks.append(c.mask.to(torch.uint8))
    empty = encoder.encode([""])
    save_file(
        {
            "latent_mean": torch.cat(means).contiguous(),
            "latent_std": torch.cat(stds).contiguous(),
            "tokens": torch.cat(tokens).contiguous(),
            "mask": torch.cat(masks).contiguous(),
            "empty_tokens": empty.tokens.half().contiguous(),
            "empty_mask": empty.mask.to(torch.uint8).contiguous(),
            **({"lowres_latent": torch.cat(lowres).contiguous()} if cfg.sr_from else {}),
        },
        str(cache / "cache.safetensors"),
    )
    (cache / "captions.json").write_text(json.dumps(texts[: len(ds)], indent=0))
    (cache / "cache.json").write_text(json.dumps({**_cache_key(cfg), "n": len(ds)}))


def upsampled_lowres(images: torch.Tensor, side: int) -> torch.Tensor:
    """What an SR stage is conditioned on: ``images`` shrunk to ``side`` and enlarged back to their size."""
    return resize(resize(images, side), tuple(images.shape[-2:]))


def _cache_key(cfg: UNetConfig) -> dict:
    key = {"vae": str(Path(cfg.vae).expanduser().resolve()), "k": cfg.captions_per_image, "max_length": cfg.max_length}
    if cfg.resolution != 64 or cfg.sr_from:  # (caches made before these options existed stay valid)
        key.update(resolution=cfg.resolution, sr_from=cfg.sr_from)
    return key


def check_config(cfg: UNetConfig) -> None:
    """Sizes that cannot work, named before anything is built."""
    if cfg.resolution % (LATENT_FACTOR * 2 ** (len(cfg.block_out_channels) - 1)) or not 8 <= cfg.resolution <= 64:
        raise DreamlabError(
            f"--resolution {cfg.resolution}: must be at most 64 (the data's size) and divisible by "
            f"{LATENT_FACTOR * 2 ** (len(cfg.block_out_channels) - 1)} (the autoencoder's and the UNet's downsampling)"
        )
    if cfg.sr_from is not None and not (0 < cfg.sr_from < cfg.resolution and cfg.resolution % cfg.sr_from == 0):
        raise DreamlabError(f"--sr-from {cfg.sr_from}: must be smaller than --resolution {cfg.resolution} and divide it")
    if cfg.sr_from and cfg.pooled_text:
        raise DreamlabError("--pooled-text: a super-resolution stage's class embedding already carries its noise level")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise DreamlabError(f"--mixed-precision {cfg.mixed_precision!r}: must be one of {', '.join(MIXED_PRECISION)}")
    if cfg.sampling not in SAMPLING:
        raise DreamlabError(f"--sampling {cfg.sampling!r}: must be one of {', '.join(SAMPLING)}")
    if not 0 <= cfg.sr_noise_max < 1000:
        raise DreamlabError(f"--sr-noise-max {cfg.sr_noise_max}: must be a timestep in [0, 999]")


def draw_batch(data: dict, weights: torch.Tensor, batch: int, dropout: float, timesteps: int, gen: torch.Generator):
    """One training batch from a cache (``build_cache``'s): images drawn by ``weights``, a caption variant
    each (dropped to the empty prompt with probability ``dropout``), x0 sampled from the latent posterior,
    timesteps and noise. Returns (image indices, x0, tokens, mask, t, noise)."""
    n, latent_shape = data["latent_mean"].shape[0], tuple(data["latent_mean"].shape[1:])
    idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
    variant = torch.randint(data["tokens"].shape[0] // n, (batch,), generator=gen)
    x0 = data["latent_mean"][idx] + data["latent_std"][idx] * torch.randn(batch, *latent_shape, generator=gen)
    rows = variant * n + idx
    tokens, mask = data["tokens"][rows].float(), data["mask"][rows].long()
    drop = torch.rand(batch, generator=gen) < dropout
    tokens[drop] = data["empty_tokens"].float()
    mask[drop] = data["empty_mask"].long()
    t = torch.randint(timesteps, (batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return idx, x0, tokens, mask, t, noise


def sampling_weights(records: list[dict], how: str) -> torch.Tensor:
    """Probability of drawing each training image: uniform over images, or (``concept``) uniform over
    (base emoji, style) pairs, split evenly among a pair's skin-tone variants."""
    if how == "image":
        return torch.full((len(records),), 1.0 / max(1, len(records)), dtype=torch.float64)
    group = [(r["base"], r["style"]) for r in records]
    counts = Counter(group)
    w = torch.tensor([1.0 / counts[g] for g in group], dtype=torch.float64)
    return w / w.sum()


def _cache_matches(cfg: UNetConfig, cache: Path) -> bool:
    """A cache made from another VAE or other caption settings is rebuilt, never silently reused."""
    if not (cache / "cache.safetensors").exists() or not (cache / "cache.json").exists():
        return False
    have = json.loads((cache / "cache.json").read_text())
    return all(have.get(k) == v for k, v in _cache_key(cfg).items())


# ---------------------------------------------------------------------------------------------- training


def export_model(
    unet_cfg: dict, ema: EMA, vae_dir: Path, dest: Path, cfg: UNetConfig, extra: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """A complete dreamlab model folder (diffusers format) with the EMA weights, stored in ``dtype``
    (fp16 halves the size; the loader computes in float32 either way)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(unet_cfg)
    ema.copy_to(unet)
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    unet.to(dtype).save_pretrained(tmp / "unet")
    if dtype == torch.float32:
        shutil.copytree(vae_dir, tmp / "vae", ignore=shutil.ignore_patterns(".*"))
    else:
        AutoencoderKL.from_pretrained(vae_dir).to(dtype).save_pretrained(tmp / "vae")
    (tmp / "scheduler").mkdir()
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(schedule_config(cfg.prediction), indent=2))
    spec = {
        "name": "dreamlab-emoji" + (f"-sr{cfg.sr_from}" if cfg.sr_from else "" if cfg.resolution == 64 else f"-{cfg.resolution}"),
        "sample_size": cfg.resolution,
        "use_mask": True,
        "text_encoder": {"source": "minilm", "max_length": cfg.max_length, "pooling": "mean"},
        "training": extra or {},
    }
    if cfg.sr_from:
        spec["super_resolution"] = {"from_size": cfg.sr_from, "noise_level": min(DEFAULT_SR_NOISE, cfg.sr_noise_max)}
    (tmp / "dreamlab.json").write_text(json.dumps(spec, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def init_source(init: str | None) -> tuple[str | None, dict]:
    """What ``--init`` names: a ``unet`` folder, or a whole model folder (a snapshot, an export, the
    shipped default). Returns the unet folder and, for a dreamlab model folder, its recorded training
    (steps and hours) so that training continues the count."""
    if not init:
        return None, {}
    path = Path(init).expanduser()
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    if not (unet_dir / "config.json").exists():
        raise ModelNotFoundError(f"--init {init}: no UNet weights there (expected a unet folder or a model folder with unet/)")
    spec = unet_dir.parent / "dreamlab.json"
    training = json.loads(spec.read_text()).get("training", {}) if spec.exists() else {}
    return str(unet_dir), training


def train_unet(cfg: UNetConfig) -> Path:
    check_config(cfg)
    d: Dist = init_distributed(cfg.device)
    out = Path(cfg.out).expanduser()
    cache = out / "cache"
    if d.main:
        save_config(out, cfg)
        if not _cache_matches(cfg, cache):
            print("encoding latents and captions once ...")
            build_cache(cfg, cache)
    d.barrier()
    data = load_file(str(cache / "cache.safetensors"))
    n = data["latent_mean"].shape[0]
    records = EmojiDataset(Path(cfg.data), split="train").records
    if len(records) != n:
        raise DreamlabError(f"the cache in {cache} holds {n} images but {cfg.data} has {len(records)} training images: "
                            f"delete {cache} to rebuild it")
    weights = sampling_weights(records, cfg.sampling)
    schedule = DiscreteSchedule.from_diffusers_config(schedule_config(cfg.prediction))
    prediction = Prediction(cfg.prediction)

    torch.manual_seed(cfg.seed + d.rank)
    unet = build_unet(cfg)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    init_dir, init_training = init_source(cfg.init)
    # --init from a model without the pooled-text path: that path keeps its no-op initialisation
    step = resume(out, unet, opt, ema, d, init_dir, new_modules=("class_embedding.",) if cfg.pooled_text else ())
    # Compute spent so far (wall seconds of training, summed over sessions): the x axis of the
    # alignment-vs-compute curve.
    last = latest_checkpoint(out)
    spent = json.loads((last / "state.json").read_text()).get("train_seconds", 0.0) if last else 0.0
    if last is None and init_training:
        # Continuing from exported weights (the shipped default model when the checkpoints are lost):
        # the step count and the compute carry on, so the schedule and the curve stay one run.
        step, spent = int(init_training.get("steps", 0)), float(init_training.get("train_hours", 0.0)) * 3600
        if step >= cfg.steps:
            raise DreamlabError(f"the weights in --init {cfg.init} were trained for {step} steps and --steps is the total "
                                f"schedule length: pass --steps larger than {step} to train further")
        if d.main:
            print(f"continuing the step count at {step} ({spent / 3600:.2f} training hours so far)")
    unet.to(d.device).train()
    # the sampling adapter and preconditioning (Denoiser.loss): the network is called exactly as at sampling
    denoiser = Denoiser(UNetModelFn(DDP(unet) if d.world > 1 else unet, use_mask=True), schedule, prediction)
    log = Log(out, enabled=d.main)
    log.rewind(step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + d.rank * 7919 + step)
    if d.main:
        print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {n} training images")

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="unet", disable=not d.main, dynamic_ncols=True)
    t0, seen = time.time(), 0
    t_mark = t0
    B = cfg.batch_size
    while step < cfg.steps:
        idx, x0, tokens, mask, t, noise = draw_batch(data, weights, B, cfg.cond_dropout, schedule.num_train_timesteps, gen)
        x0, tokens, mask, t, noise = (v.to(d.device) for v in (x0, tokens, mask, t, noise))
        cond = Cond(tokens=tokens, mask=mask)
        if cfg.sr_from:  # only the text is dropped for CFG; the low-res image is always seen, noised
            level = torch.randint(cfg.sr_noise_max + 1, (B,), generator=gen)  # the augmentation level
            concat = q_sample(data["lowres_latent"][idx], level, torch.randn(x0.shape, generator=gen), schedule)
            cond = replace(cond, concat=concat.to(d.device), noise_level=level.to(d.device))
        elif cfg.pooled_text:  # exactly the encoder's "mean" pooling, of the cached token states
            cond = replace(cond, pooled=masked_mean(tokens, mask))
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"):
            loss = denoiser.loss(x0, noise, t, cond, min_snr_gamma=cfg.min_snr_gamma)
        update(loss, unet, opt, ema, lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        step += 1
        seen += B * d.world
        bar.update(1)
        now = time.time()
        spent += now - t_mark
        t_mark = now
        if step % cfg.log_every == 0:
            lm = d.mean(loss.item())
            ips = seen / (now - t0)
            log.write(step, loss=lm, lr=opt.param_groups[0]["lr"], images_per_s=ips, world=d.world, train_hours=spent / 3600)
            bar.set_postfix(loss=f"{lm:.4f}", ips=f"{ips:.0f}")
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            if d.main:
                info = {"steps": step, "train_hours": spent / 3600, "world": d.world, "device": str(d.device)}
                save_checkpoint(out, step, unet, ema, opt, {"config": "config.json", "train_seconds": spent})
                export_model(unet.config, ema, Path(cfg.vae), out / "model", cfg, info)
                if step % cfg.snapshot_every == 0 or step == cfg.steps:
                    export_model(unet.config, ema, Path(cfg.vae), out / "snapshots" / f"step-{step:07d}", cfg, info, torch.float16)
                log.plot(("loss",))
            d.barrier()
        if d.main and (step % cfg.sample_every == 0 or step == cfg.steps):
            if cfg.sr_from:
                sr_sample_grid(out / "model", cfg.data, out / f"samples-{step:07d}.png")
            else:
                sample_grid(out / "model", out / f"samples-{step:07d}.png")
        t_mark = time.time()  # checkpoints and sample grids are not training compute
    bar.close()
    d.barrier()  # rank 0 may still be drawing the last sample grid: leave the process group together
    shutdown_distributed()
    return out / "model"


def sample_grid(model_dir: Path, dest: Path, prompts: list[str] = SAMPLE_PROMPTS, steps: int = 20, cfg_scale: float = 4.0) -> Path:
    """Generate one image per prompt with the engine (the same path users take) and save a grid."""
    from ..generate import generate, make_request
    from ..loading.model import load_model

    model = load_model(model_dir)
    images = []
    for i, p in enumerate(prompts):
        images += generate(model, make_request(prompt=p, seed=i, steps=steps, cfg_scale=cfg_scale)).images
    grid(images, cols=8, scale=2).save(dest)
    return dest


def sr_sample_grid(model_dir: Path, data: str, dest: Path, n: int = 8, steps: int = 20, cfg_scale: float = 4.0) -> Path:
    """Held-out images through a super-resolution stage: the original, the low-res input (enlarged) and
    the stage's output, in three rows."""
    from ..data.captions import canonical_caption
    from ..generate import encode_image, generate, make_request
    from ..images import to_pil
    from ..loading.model import load_model

    model = load_model(model_dir)
    ds = EmojiDataset(Path(data), split="test")
    picks = [ds[i * max(1, len(ds) // n)] for i in range(min(n, len(ds)))]
    real = torch.stack([x for x, _ in picks])
    low = to_pil(resize(real, model.sr.from_size))
    outputs = []
    for i, ((_, meta), image) in enumerate(zip(picks, low)):
        req = make_request(prompt=canonical_caption(meta), seed=i, steps=steps, cfg_scale=cfg_scale,
                           lowres_image=encode_image(image))
        outputs += generate(model, req).images
    side = model.sample_size
    grid(to_pil(real) + [im.resize((side, side), Image.NEAREST) for im in low] + outputs, cols=len(picks), scale=2).save(dest)
    return dest
