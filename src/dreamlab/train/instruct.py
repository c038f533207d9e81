"""Train an instruction-editing model (InstructPix2Pix, Brooks et al. 2023) from the frozen default model,
on the pairs of ``dreamlab data instruct``.

The model is the base's UNet with 8 input channels: the noisy latents and the source image's latents,
concatenated. The 4 new input channels of ``conv_in`` start at zero and the rest is copied, so the
untrained model is the base model exactly (it ignores the source). It learns (source latents, instruction)
-> edited latents with the base's own loss (v-prediction, Min-SNR-5) through ``Denoiser.loss``: the source
rides in ``Cond.concat``, as at sampling with :class:`~dreamlab.core.guiders.ImageTextCFG`. Conditioning
dropout as in the paper: 5% of the examples lose the instruction (the empty prompt), 5% the image (zeros
in its channels) and 5% both, so that the two-conditioning guidance has all three predictions to combine.

Each pair is encoded once, flipped and not (the paper's random flips), source and edit alike; the edited
latents are drawn from the autoencoder's posterior at every step (as the UNet trainer does), the source's
are its posterior mean (what ``VAESpace.encode`` gives at sampling).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..core.types import Cond
from ..errors import DreamlabError
from ..models.controlnet import base_hash
from .common import (
    ComputeClock, EMA, Log, init_distributed, latest_checkpoint, lr_at, save_checkpoint, save_config, update, write_model_folder,
)
from ..settings import InstructConfig  # noqa: F401  (the configuration, kept torch-free)


def instruct_unet_from(unet, extra_channels: int | None = None):
    """A copy of ``unet`` whose ``conv_in`` also takes ``extra_channels`` (default: as many again) more input
    channels, their weights zero: the copy computes exactly what ``unet`` does whatever those channels hold."""
    from diffusers import UNet2DConditionModel

    old = int(unet.config.in_channels)
    extra = old if extra_channels is None else extra_channels
    config = dict(unet.config)
    config["in_channels"] = old + extra
    new = UNet2DConditionModel.from_config(config).to(device=unet.device, dtype=unet.dtype)
    state = unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], extra, *w.shape[2:], dtype=w.dtype, device=w.device)], 1)
    new.load_state_dict(state)
    return new


def _base(cfg: InstructConfig):
    from ..loading.model import default_model_dir, load_model, read_spec

    root = Path(cfg.base).expanduser() if cfg.base else default_model_dir()
    model = load_model(root)
    if not (root / "vae").is_dir():
        raise DreamlabError(f"--base {root}: the instruction model is trained here from a latent model (it has no vae/)")
    if model.inputs or model.sr is not None or model.student is not None:
        raise DreamlabError(f"--base {root}: train from a plain text-to-image model (it takes {model.inputs or 'a student'})")
    raw = json.loads((root / "dreamlab.json").read_text()) if (root / "dreamlab.json").exists() else {}
    return root, model, read_spec(root), raw


def _pairs_key(folder: Path) -> str:
    """sha256 of the kept pairs' records (all shards' files, in id order)."""
    from ..data.instruct import read_pairs

    return hashlib.sha256("".join(json.dumps(r, sort_keys=True) + "\n" for r in read_pairs(folder)).encode()).hexdigest()


def _load_rgba(path: Path) -> torch.Tensor:
    a = np.asarray(Image.open(path).convert("RGBA"), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(a).permute(2, 0, 1)


def build_cache(cfg: InstructConfig, model, cache: Path) -> dict[str, torch.Tensor]:
    """Latents of every kept pair (both flips) and the encoded instructions, once per pairs file."""
    from ..data.instruct import read_pairs

    folder = Path(cfg.data).expanduser()
    if not any(folder.glob("pairs*.jsonl")):
        raise DreamlabError(f"no instruction pairs in {folder}: make them with `dreamlab data instruct --out {folder}`")
    key = {"pairs": _pairs_key(folder), "unet": base_hash(model.files), "holdout": cfg.holdout, "version": 2}
    file, meta = cache / "pairs.safetensors", cache / "pairs.json"
    if file.exists() and meta.exists() and json.loads(meta.read_text()) == key:
        return load_file(str(file))
    rows = read_pairs(folder)
    if cfg.holdout:
        rows = [r for r in rows if r["id"] % cfg.holdout]  # every holdout-th pair is kept out (validation)
    if not rows:
        raise DreamlabError(f"{folder} has no kept pairs to train on")
    cache.mkdir(parents=True, exist_ok=True)
    vae = model.space.vae
    src_mean, dst_mean, dst_std = [], [], []
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            chunk = rows[i:i + 64]
            s = torch.stack([_load_rgba(folder / r["source_file"]) for r in chunk])
            d = torch.stack([_load_rgba(folder / r["edited_file"]) for r in chunk])
            for flip in (False, True):
                ss, dd = (s.flip(-1), d.flip(-1)) if flip else (s, d)
                src_mean.append(model.space.encode(ss))
                post = vae.encode(dd.to(vae.dtype)).latent_dist
                dst_mean.append(((post.mean - model.space.shift) * model.space.scale).float())
                dst_std.append((post.std * model.space.scale).float())
    n = len(rows)
    order = [j for i in range(0, n, 64) for j in (list(range(i, min(i + 64, n))) * 2)]  # row of each latent
    texts = [r["instruction"] for r in rows]
    kinds = sorted({r.get("kind", "") for r in rows})
    kind = torch.tensor([kinds.index(r.get("kind", "")) for r in rows])
    toks, masks = [], []
    for i in range(0, n, 256):
        c = model.encode_prompts(texts[i:i + 256])
        toks.append(c.tokens.half())
        masks.append(c.mask.to(torch.uint8))
    empty = model.encode_prompts([""])
    data = {"source": torch.cat(src_mean).contiguous(), "edited_mean": torch.cat(dst_mean).contiguous(),
            "edited_std": torch.cat(dst_std).contiguous(), "row": torch.tensor(order),
            "tokens": torch.cat(toks).contiguous(), "mask": torch.cat(masks).contiguous(), "kind": kind,
            "empty_tokens": empty.tokens.half().contiguous(), "empty_mask": empty.mask.to(torch.uint8).contiguous()}
    save_file(data, str(file))
    meta.write_text(json.dumps(key))
    (cache / "instructions.json").write_text(json.dumps(texts, indent=0))
    return data


def pair_weights(data: dict, balance: bool) -> torch.Tensor:
    """Probability of drawing each cached latent: uniform, or (``balance``) uniform over the edit kinds, so
    that the kinds the filter keeps most often (skin tones, styles) do not crowd out the others."""
    n = data["source"].shape[0]
    if not balance or "kind" not in data:
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    kind = data["kind"][data["row"]]
    counts = torch.bincount(kind).double()
    w = 1.0 / counts[kind]
    return w / w.sum()


def draw_batch(data: dict, batch: int, dropout: float, timesteps: int, gen: torch.Generator,
               weights: torch.Tensor | None = None):
    """(x0 edited, source latents, tokens, mask, t, noise): the instruction dropped for ``dropout`` of the
    examples, the image for another ``dropout``, both for a third."""
    n = data["source"].shape[0]
    if weights is None:
        idx = torch.randint(n, (batch,), generator=gen)
    else:
        idx = torch.multinomial(weights, batch, replacement=True, generator=gen)
    x0 = data["edited_mean"][idx] + data["edited_std"][idx] * torch.randn(batch, *data["edited_mean"].shape[1:], generator=gen)
    source = data["source"][idx].clone()
    rows = data["row"][idx]
    tokens, mask = data["tokens"][rows].float(), data["mask"][rows].long()
    r = torch.rand(batch, generator=gen)
    no_text = (r < dropout) | ((r >= 2 * dropout) & (r < 3 * dropout))
    no_image = (r >= dropout) & (r < 3 * dropout)
    tokens[no_text] = data["empty_tokens"].float()
    mask[no_text] = data["empty_mask"].long()
    source[no_image] = 0.0
    t = torch.randint(timesteps, (batch,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    return x0, source, tokens, mask, t, noise


def export_instruct(unet, ema: EMA | None, root: Path, raw_spec: dict, dest: Path, cfg: InstructConfig, model,
                    info: dict, dtype: torch.dtype | None = torch.float16) -> Path:
    """A model folder: the base's components, the (EMA) 8-channel UNet and a dreamlab.json that declares
    the source image input and the editing defaults. Written beside ``dest`` and renamed."""
    spec = {k: v for k, v in raw_spec.items() if k not in ("name", "defaults", "training", "inputs")}
    spec.update(name=cfg.name, inputs=["source_image"],
                defaults={"sampler": "dpmpp_2m", "steps": 20, "schedule": "karras", "cfg_scale": 5.0,
                          "image_cfg_scale": 1.5},
                instruct={"base": model.name, "base_unet": base_hash(model.files)}, training=info)
    return write_model_folder(unet, ema, root, dest, spec, dtype)


def train_instruct(cfg: InstructConfig) -> Path:
    d = init_distributed(cfg.device)
    if d.world > 1:
        raise DreamlabError("train instruct runs in one process (use --device cuda on a GPU)")
    if not 0 <= cfg.dropout <= 1 / 3:
        raise DreamlabError(f"--dropout {cfg.dropout}: each of the three dropouts takes that share, so at most 1/3")
    out = Path(cfg.out).expanduser()
    root, model, spec, raw = _base(cfg)
    save_config(out, cfg)
    data = build_cache(cfg, model, out / "cache")
    pairs = int(data["tokens"].shape[0])
    data_sha256 = _pairs_key(Path(cfg.data).expanduser())  # the pairs trained on, recorded in every export
    weights = pair_weights(data, cfg.balance_kinds)
    torch.manual_seed(cfg.seed)
    unet = instruct_unet_from(model.unet).to(d.device).train().requires_grad_(True)
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, spent = 0, 0.0
    last = latest_checkpoint(out)
    if last is not None:
        from diffusers import UNet2DConditionModel

        from .common import load_training_state

        unet.load_state_dict(UNet2DConditionModel.from_pretrained(last / "model").state_dict())
        state = load_training_state(last, opt, ema)
        step, spent = state["step"], state.get("train_seconds", 0.0)
        print(f"resumed from {last} at step {step}")
    elif cfg.init:
        from diffusers import UNet2DConditionModel

        init = Path(cfg.init).expanduser()
        unet.load_state_dict({k: v.float() for k, v in UNet2DConditionModel.from_pretrained(init / "unet").state_dict().items()})
        ema.__init__(unet, ema.decay)
        done = json.loads((init / "dreamlab.json").read_text()).get("training", {})
        step, spent = int(done.get("steps", 0)), float(done.get("train_hours", 0.0)) * 3600
        print(f"continuing from {init} at step {step}")

    from ..models.unet import UNetModelFn
    from ..core.prediction import Denoiser

    denoiser = Denoiser(UNetModelFn(unet, use_mask=model.use_mask, pixel_factor=model.space.factor),
                        model.schedule, model.prediction)
    log = Log(out)
    log.rewind(step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    print(f"instruction model: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters, {pairs} pairs "
          f"({data['source'].shape[0]} with flips)")
    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc="instruct", dynamic_ncols=True)
    clock = ComputeClock(spent)
    while step < cfg.steps:
        x0, source, tokens, mask, t, noise = draw_batch(data, cfg.batch_size, cfg.dropout,
                                                        model.schedule.num_train_timesteps, gen, weights)
        x0, source, tokens, mask, t, noise = (v.to(d.device) for v in (x0, source, tokens, mask, t, noise))
        loss = denoiser.loss(x0, noise, t, Cond(tokens=tokens, mask=mask, concat=source), min_snr_gamma=cfg.min_snr_gamma)
        update(loss, unet, opt, ema, lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        step += 1
        bar.update(1)
        spent = clock.tick()
        if step % cfg.log_every == 0:
            log.write(step, loss=loss.item(), lr=opt.param_groups[0]["lr"], train_hours=spent / 3600)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        info = {"steps": step, "train_hours": spent / 3600, "device": str(d.device), "batch_size": cfg.batch_size,
                "lr": cfg.lr, "dropout": cfg.dropout, "pairs": pairs, "data": str(cfg.data),
                "data_sha256": data_sha256}
        if step % cfg.snapshot_every == 0 or step == cfg.steps:
            export_instruct(unet, ema, root, raw, out / "snapshots" / f"step-{step:07d}", cfg, model, info)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, unet, ema, opt, {"config": "config.json", "train_seconds": spent})
            export_instruct(unet, ema, root, raw, out / "model", cfg, model, info, dtype=None)
            log.plot(("loss",))
        if step % cfg.snapshot_every == 0 or step % cfg.ckpt_every == 0:
            clock.skip()  # exports are not training compute
    bar.close()
    return out / "model"
