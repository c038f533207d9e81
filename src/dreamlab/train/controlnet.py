"""Train a ControlNet (Zhang et al. 2023) on the frozen default model, for a condition computed from the
training images themselves (Canny edges, the alpha silhouette).

The base model stays frozen; the ControlNet starts as a copy of its encoder and middle block with zero
convolutions, so the first step is exactly the base model. The loss is the base model's own (v-prediction,
Min-SNR-5) through ``Denoiser.loss`` with the ControlNet as a model wrapper: the network is called
exactly as at sampling. Half of the prompts are dropped to the empty prompt (the paper's 50%), so the
ControlNet must read the structure from the map, not the caption. Latents and captions come from the
base trainer's cache (encoded once); the maps are computed once and cached beside them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..control.conditions import get_condition
from ..control.controlnet import ControlNetControl
from ..core.types import Cond
from ..data.dataset import EmojiDataset
from ..errors import DreamlabError
from ..models.controlnet import controlnet_from_unet, save_controlnet
from .common import ComputeClock, EMA, Log, init_distributed, latest_checkpoint, lr_at, save_checkpoint, save_config, update
from .unet import UNetConfig, _cache_matches, build_cache, draw_batch, sampling_weights
from ..settings import ControlNetConfig  # noqa: F401  (the configuration, kept torch-free)




def _base(cfg: ControlNetConfig):
    from ..loading.model import default_model_dir, load_model, read_spec

    root = Path(cfg.base).expanduser() if cfg.base else default_model_dir()
    model = load_model(root)
    if not (root / "vae").is_dir():
        raise DreamlabError(f"--base {root}: a ControlNet is trained here on a latent model (it has no vae/)")
    return root, model, read_spec(root)


def _maps(cfg: ControlNetConfig, cache: Path, n: int) -> torch.Tensor:
    """(N, C, 64, 64) uint8 maps of the training images, computed once."""
    file = cache / f"maps-{cfg.condition}.safetensors"
    if file.exists():
        maps = load_file(str(file))["maps"]
        if maps.shape[0] == n:
            return maps
    from ..data.dataset import to_rgba_uint8

    condition = get_condition(cfg.condition)
    ds = EmojiDataset(Path(cfg.data), split="train")
    maps = torch.stack([torch.from_numpy(condition.preprocess(to_rgba_uint8(ds[i][0]))).permute(2, 0, 1)
                        for i in range(len(ds))])
    maps = (maps * 255).round().to(torch.uint8).contiguous()
    save_file({"maps": maps}, str(file))
    return maps


def train_controlnet(cfg: ControlNetConfig) -> Path:
    condition = get_condition(cfg.condition)
    d = init_distributed(cfg.device)
    if d.world > 1:
        raise DreamlabError("train controlnet runs in one process (use --device cuda on a GPU)")
    out = Path(cfg.out).expanduser()
    save_config(out, cfg)
    root, model, spec = _base(cfg)
    te = spec.text_encoder
    ucfg = UNetConfig(data=cfg.data, vae=str(root / "vae"), out=str(out), max_length=te.max_length or 24)
    cache = out / "cache"
    if not _cache_matches(ucfg, cache):
        print("encoding latents and captions once ...")
        build_cache(ucfg, cache)
    data = load_file(str(cache / "cache.safetensors"))
    n = data["latent_mean"].shape[0]
    records = EmojiDataset(Path(cfg.data), split="train").records
    if len(records) != n:
        raise DreamlabError(f"the cache in {cache} does not match {cfg.data}: delete {cache} to rebuild it")
    maps = _maps(cfg, cache, n)
    weights = sampling_weights(records, "concept")

    torch.manual_seed(cfg.seed)
    unet = model.unet.to(d.device)
    net = controlnet_from_unet(unet, condition.channels, model.space.factor).to(d.device).train()
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    step, spent = 0, 0.0
    last = latest_checkpoint(out)
    if last is not None:
        from .common import load_training_state

        net.load_state_dict(type(net).from_pretrained(last / "model").state_dict())
        state = load_training_state(last, opt, ema)
        step, spent = state["step"], state.get("train_seconds", 0.0)
        print(f"resumed from {last} at step {step}")
    elif cfg.init:
        from ..models.controlnet import load_controlnet

        init, spec, _ = load_controlnet(Path(cfg.init).expanduser(), model.files)  # checked to fit this base
        if spec.controlnet.condition != cfg.condition:
            raise DreamlabError(f"--init {cfg.init} is a {spec.controlnet.condition} ControlNet, not {cfg.condition}")
        net.load_state_dict({k: v.float() for k, v in init.state_dict().items()})
        ema.__init__(net, ema.decay)
        step, spent = int(spec.training.get("steps", 0)), float(spec.training.get("train_hours", 0.0)) * 3600
        print(f"continuing from {cfg.init} at step {step}")
    adapter_model = model.denoiser()  # the base's adapter, schedule and prediction
    log = Log(out)
    log.rewind(step)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    print(f"ControlNet ({cfg.condition}) {sum(p.numel() for p in net.parameters()) / 1e6:.1f}M parameters, {n} images")

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=step, desc=f"controlnet-{cfg.condition}", dynamic_ncols=True)
    clock = ComputeClock(spent)
    B = cfg.batch_size
    while step < cfg.steps:
        idx, x0, tokens, mask, t, noise = draw_batch(data, weights, B, cfg.cond_dropout, model.schedule.num_train_timesteps, gen)
        hint = maps[idx].float() / 255
        x0, tokens, mask, t, noise, hint = (v.to(d.device) for v in (x0, tokens, mask, t, noise, hint))
        control = ControlNetControl(net, adapter_model.model, hint)
        denoiser = type(adapter_model)(adapter_model.model, adapter_model.schedule, adapter_model.prediction,
                                       wrappers=(control,))
        loss = denoiser.loss(x0, noise, t, Cond(tokens=tokens, mask=mask), min_snr_gamma=cfg.min_snr_gamma)
        update(loss, net, opt, ema, lr_at(step, cfg.lr, cfg.warmup, cfg.steps))
        step += 1
        bar.update(1)
        spent = clock.tick()
        if step % cfg.log_every == 0:
            log.write(step, loss=loss.item(), lr=opt.param_groups[0]["lr"], train_hours=spent / 3600)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        info = {"steps": step, "train_hours": spent / 3600, "device": str(d.device), "condition": cfg.condition,
                "batch_size": B, "lr": cfg.lr, "cond_dropout": cfg.cond_dropout}
        if step % cfg.snapshot_every == 0 or step == cfg.steps:
            _export(net, ema, out / "snapshots" / f"step-{step:07d}", cfg, model, info)
        if step % cfg.ckpt_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, net, ema, opt, {"config": "config.json", "train_seconds": spent})
            _export(net, ema, out / "controlnet", cfg, model, info, dtype=None)
            log.plot(("loss",))
        if step % cfg.snapshot_every == 0 or step % cfg.ckpt_every == 0:
            clock.skip()  # exports are not training compute
    bar.close()
    return out / "controlnet"


def _export(net, ema: EMA, dest: Path, cfg: ControlNetConfig, model, info: dict, dtype=torch.float16) -> Path:
    """The EMA weights as a ControlNet folder for ``model``."""
    import copy

    shadow = copy.deepcopy(net)
    ema.copy_to(shadow)
    return save_controlnet(shadow, dest, cfg.condition, model.files, model.name, info, dtype=dtype)


def training_curve(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
