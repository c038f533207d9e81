"""Few-step students of a frozen teacher: guided consistency distillation and guided progressive
distillation (docs/distillation.md).

Both fold classifier-free guidance into the student (Meng et al. 2023, "On Distillation of Guided
Diffusion Models"): the student is a copy of the teacher's UNet with a guidance-scale input
(``time_cond_proj_dim``; its projection zero-initialised, so the student starts as the teacher exactly)
and learns, for w drawn from [guidance_min, guidance_max], what the teacher does under CFG at scale w.
Teacher and student are both called through the sampling adapter (a ``Denoiser`` around ``UNetModelFn``),
the student with w in ``Cond.guidance``: it is trained exactly as it is sampled. Notation: the sampler's
form x = x0 + sigma * eps; sigma_t the sigma of training step t; D the teacher, CFG_w(D) = D_u + w (D_c - D_u)
with u the empty prompt; G(x, sigma, c, w) the student.

consistency (latent consistency distillation, Luo et al. 2023, Algorithm 1, as diffusers'
examples/consistency_distillation/train_lcm_distill_sd_wds.py):
    t ~ U{1, ..., T-1},  t_n = max(t - k, 0),  k = T // solver_steps (the skipping step)
    x    = x0 + sigma_t eps
    x_n  = one DDIM step of CFG_w(D) from sigma_t to sigma_{t_n}                          (no grad)
    loss = pseudo-Huber(f(x, sigma_t, w) - f~(x_n, sigma_{t_n}, w); c)
  f is the student through LCM's boundary condition (``Denoiser(consistency=True)``), f~ the target
  network, an EMA of the student (decay ``target_decay``). Unlike LCM's 50 grid points, t is drawn from
  every training step, so the student is trained at every level and any sampling grid visits known ones.

progressive (Meng et al. 2023 sec. 4: guided, then progressive distillation, Salimans & Ho 2022, Algorithm 2):
    stage 0 ("guided"):   G(x, sigma_t, c, w) -> CFG_w(D)(x, sigma_t, c), t ~ U{0, ..., T-1}
    round 2N -> N:        the last stage's model P is the teacher, on the 2N-step trailing grid s_0 > ... >
                          s_2N = 0, which nests the student's N-step grid s_0, s_2, ...; at s = s_2i
                          x' = DDIM(x, P(x, s)) to s_2i+1,  x'' = DDIM(x', P(x', s_2i+1)) to s_2i+2,
                          target x~ = the x0 whose one DDIM step takes x to x''
    both weighted by max(SNR, 1) (Salimans & Ho's truncated SNR); each round starts from the last stage's
    EMA weights (which are also its teacher), with a fresh optimiser and EMA.

Latents and captions come from the UNet trainer's cache (``build_cache`` / ``draw_batch``), as the
ControlNet trainer's do. Each stage ends in a model folder (the teacher's, with the student's UNet and
a ``dreamlab.json`` naming its sampler, steps, guidance range and teacher).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..core.objectives import ddim_step, ddim_x0_target, pseudo_huber, truncated_snr_weight
from ..core.prediction import Denoiser, _b
from ..core.types import Cond
from ..data.dataset import EmojiDataset
from ..errors import DreamlabError
from ..models.controlnet import base_hash
from ..models.unet import UNetModelFn
from .common import (
    ComputeClock, EMA, Log, init_distributed, latest_checkpoint, load_states, load_training_state, lr_at, save_checkpoint,
    save_config, update, write_model_folder,
)
from .unet import UNetConfig, _cache_matches, build_cache, draw_batch, sample_grid, sampling_weights
from ..settings import DistillConfig  # noqa: F401  (the configuration, kept torch-free)

METHODS = ("consistency", "progressive")


@dataclass(frozen=True)
class Stage:
    """One stage of a run: its name (and folder under stages/), and the steps its student samples with
    (None: the guided stage, which keeps its teacher's sampler and steps)."""

    name: str
    steps: int | None


def stages(cfg: DistillConfig) -> list[Stage]:
    if cfg.method == "consistency":
        return [Stage("consistency", cfg.student_steps)]
    out, n = [Stage("guided", None)], cfg.progressive_from
    while n > cfg.progressive_to:
        n //= 2
        out.append(Stage(f"{n}step", n))
    return out


def check_config(cfg: DistillConfig) -> None:
    """Settings that cannot work, named before anything is loaded."""
    if cfg.method not in METHODS:
        raise DreamlabError(f"--method {cfg.method!r}: must be one of {', '.join(METHODS)}")
    if not 0.0 <= cfg.guidance_min <= cfg.guidance_max:
        raise DreamlabError(f"--guidance-min {cfg.guidance_min} and --guidance-max {cfg.guidance_max}: need 0 <= min <= max")
    if cfg.cfg_scale is not None and not cfg.guidance_min <= cfg.cfg_scale <= cfg.guidance_max:
        raise DreamlabError(f"--cfg-scale {cfg.cfg_scale}: the default must lie in the guidance range "
                            f"[{cfg.guidance_min}, {cfg.guidance_max}]")
    ratio = cfg.progressive_from // max(cfg.progressive_to, 1)
    if cfg.progressive_to < 1 or ratio < 2 or ratio & (ratio - 1) or ratio * cfg.progressive_to != cfg.progressive_from:
        raise DreamlabError(f"--progressive-from {cfg.progressive_from} must be --progressive-to {cfg.progressive_to} "
                            "times a power of 2 (each round halves the steps)")
    if cfg.huber_c <= 0 or not 0.0 <= cfg.target_decay < 1.0:
        raise DreamlabError("--huber-c must be > 0 and --target-decay within [0, 1)")
    if cfg.init and cfg.method != "consistency":
        raise DreamlabError("--init continues a consistency student; a progressive run starts each round from the last")
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.student_steps < 1 or cfg.solver_steps < 1 or cfg.guidance_dim < 2:
        raise DreamlabError("--steps, --batch-size, --student-steps and --solver-steps must be positive, --guidance-dim >= 2")


# --------------------------------------------------------------------------------------------- the maths


def student_from(teacher_unet, guidance_dim: int):
    """The teacher's UNet with a guidance-scale input (``time_cond_proj_dim``) whose projection starts at
    zero: the student computes exactly what the teacher does, whatever the scale, until it is trained."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_config(teacher_unet.config, time_cond_proj_dim=guidance_dim)
    missing, unexpected = unet.load_state_dict(teacher_unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise DreamlabError(f"cannot make a student of this UNet (missing {missing[:3]}, unexpected {unexpected[:3]})")
    torch.nn.init.zeros_(unet.time_embedding.cond_proj.weight)
    return unet


def _init_student(init: str, model):
    """``--init``: the UNet of a consistency student of this teacher (a run's model or snapshot, the shipped
    fast), checked by its dreamlab.json to be one before anything is trained; only its UNet is loaded."""
    from diffusers import UNet2DConditionModel

    from ..loading.model import named_model, read_spec

    folder = named_model(init)
    if not (folder / "unet").is_dir():
        raise DreamlabError(f"--init {init}: no model at {folder} (expected a student's model folder with unet/)")
    try:
        spec = read_spec(folder)
    except DreamlabError as e:
        raise DreamlabError(f"--init {init}: {e}") from None
    if spec.student is None or spec.student.method != "consistency":
        raise DreamlabError(f"--init {init} is not a consistency student (its dreamlab.json names no consistency teacher)")
    if spec.student.teacher_unet != base_hash(model.files):
        raise DreamlabError(f"--init {init} was distilled from another teacher than {model.name}")
    return UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=torch.float32)


def guided_x0(teacher: Denoiser, x, sigma, cond: Cond, uncond: Cond, w):
    """The teacher under classifier-free guidance at a scale per row, x0_u + w (x0_c - x0_u) (the CFG
    guider's combination), in one forward of 2B rows, the empty prompt's first."""
    x0_u, x0_c = teacher(torch.cat([x, x]), torch.cat([sigma, sigma]), Cond.cat([uncond, cond])).chunk(2)
    return x0_u + _b(w, x) * (x0_c - x0_u)


def consistency_loss(student: Denoiser, target: Denoiser, teacher: Denoiser, x0, noise, t, cond: Cond, uncond: Cond,
                     w, skip: int, huber_c: float):
    """Guided latent consistency distillation at training steps t (B,): see the module's notes."""
    sigmas = teacher.schedule.sigmas.to(x0.device, torch.float32)
    s, s_n = sigmas[t], sigmas[(t - skip).clamp(min=0)]
    x = x0 + _b(s, x0) * noise
    cond_w = replace(cond, guidance=w)
    with torch.no_grad():
        x_n = ddim_step(x, guided_x0(teacher, x, s, cond, uncond, w), s, s_n)
        goal = target(x_n, s_n, cond_w)
    return pseudo_huber(student(x, s, cond_w), goal, huber_c)


def _weighted_mse(pred, goal, sigma):
    per_sample = ((pred.float() - goal.float()) ** 2).flatten(1).mean(1)
    return (truncated_snr_weight(sigma) * per_sample).mean()


def guided_loss(student: Denoiser, teacher: Denoiser, x0, noise, t, cond: Cond, uncond: Cond, w):
    """Stage one of guided distillation (Meng et al. 2023): the student at w matches the teacher's CFG at w."""
    s = teacher.schedule.sigmas.to(x0.device, torch.float32)[t]
    x = x0 + _b(s, x0) * noise
    with torch.no_grad():
        goal = guided_x0(teacher, x, s, cond, uncond, w)
    return _weighted_mse(student(x, s, replace(cond, guidance=w)), goal, s)


def halving_loss(student: Denoiser, previous: Denoiser, grid, x0, noise, i, cond: Cond, w):
    """One round of progressive distillation (Salimans & Ho 2022, Algorithm 2): the N-step student at grid
    point s_2i (i: (B,) in [0, N)) matches two DDIM steps of the 2N-step ``previous`` model on ``grid``."""
    s, s1, s2 = grid[2 * i], grid[2 * i + 1], grid[2 * i + 2]
    x = x0 + _b(s, x0) * noise
    cond_w = replace(cond, guidance=w)
    with torch.no_grad():
        x1 = ddim_step(x, previous(x, s, cond_w), s, s1)
        x2 = ddim_step(x1, previous(x1, s1, cond_w), s1, s2)
        goal = ddim_x0_target(x, x2, s, s2)
    return _weighted_mse(student(x, s, cond_w), goal, s)


@torch.no_grad()
def follow(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """The consistency target network: an EMA of the student's parameters (LCM's ``update_ema``)."""
    for p_t, p in zip(target.parameters(), online.parameters()):
        p_t.lerp_(p, 1 - decay)


# ------------------------------------------------------------------------------------------- the trainer


def _teacher(cfg: DistillConfig):
    from ..loading.model import default_model_dir, load_model, read_spec

    root = Path(cfg.teacher).expanduser() if cfg.teacher else default_model_dir()
    model = load_model(root)
    spec = read_spec(root)
    if not (root / "vae").is_dir():
        raise DreamlabError(f"--teacher {root}: students are distilled here from a latent model (it has no vae/)")
    if model.student is not None or model.takes_guidance:
        raise DreamlabError(f"--teacher {root} is a student already (its UNet takes a guidance scale): distil from its teacher")
    if spec.text_encoder.source != "minilm" or model.sr is not None or model.inputs:
        raise DreamlabError(f"--teacher {root}: the trainer reads the UNet trainer's caption cache (the packaged MiniLM "
                            "encoder) and distils text-to-image models without extra inputs")
    raw = json.loads((root / "dreamlab.json").read_text()) if (root / "dreamlab.json").exists() else {}
    return root, model, spec, raw


def _data(cfg: DistillConfig, root: Path, spec, model, out: Path):
    ucfg = UNetConfig(data=cfg.data, vae=str(root / "vae"), out=str(out), max_length=spec.text_encoder.max_length or 24,
                      resolution=model.sample_size)
    cache = out / "cache"
    if not _cache_matches(ucfg, cache):
        print("encoding latents and captions once ...")
        build_cache(ucfg, cache)
    data = load_file(str(cache / "cache.safetensors"))
    records = EmojiDataset(Path(cfg.data), split="train").records
    if len(records) != data["latent_mean"].shape[0]:
        raise DreamlabError(f"the cache in {cache} does not match {cfg.data}: delete {cache} to rebuild it")
    return data, sampling_weights(records, "concept")


def _default_cfg(cfg: DistillConfig, model) -> float:
    if cfg.cfg_scale is not None:
        return cfg.cfg_scale
    return min(max(model.defaults.cfg_scale, cfg.guidance_min), cfg.guidance_max)


def export_student(unet, ema: EMA | None, root: Path, raw_spec: dict, dest: Path, cfg: DistillConfig, model, stage: Stage,
                   info: dict, dtype: torch.dtype = torch.float32, name: str | None = None) -> Path:
    """A model folder named ``name`` (default: the run's): the teacher's components, the student's (EMA)
    UNet, and a dreamlab.json with the student's defaults, guidance range and teacher. Written to a
    temporary folder and renamed."""
    if cfg.method == "consistency":
        defaults = {"sampler": "lcm", "steps": stage.steps, "schedule": "trailing"}
    elif stage.steps is None:  # the guided model samples as its teacher does, one row per step
        d = model.defaults
        defaults = {"sampler": d.sampler, "steps": d.steps, "schedule": d.schedule}
    else:  # a progressive student knows its own grid only: DDIM on it
        defaults = {"sampler": "ddim", "steps": stage.steps, "schedule": "trailing"}
    spec = {k: v for k, v in raw_spec.items() if k not in ("name", "defaults", "student", "training")}
    spec.update(
        name=name or cfg.name,
        defaults={**defaults, "cfg_scale": _default_cfg(cfg, model)},
        student={"method": cfg.method, "teacher": model.name, "teacher_unet": base_hash(model.files),
                 "guidance": [cfg.guidance_min, cfg.guidance_max]},
        training=info,
    )
    return write_model_folder(unet, ema, root, dest, spec, dtype)


def train_distill(cfg: DistillConfig) -> Path:
    check_config(cfg)
    d = init_distributed(cfg.device)
    if d.world > 1:
        raise DreamlabError("train distill runs in one process (use --device cuda on a GPU)")
    out = Path(cfg.out).expanduser()
    step, spent = 0, 0.0
    last = latest_checkpoint(out)
    if last is not None:
        state = json.loads((last / "state.json").read_text())
        if state.get("method") != cfg.method:
            raise DreamlabError(f"{out} holds a {state.get('method')} run; --method {cfg.method} needs another --out")
        step, spent = state["step"], state.get("train_seconds", 0.0)
        print(f"resuming from {last} at step {step}")
    resumed_at = step
    save_config(out, cfg)
    root, model, spec, raw = _teacher(cfg)
    data, weights = _data(cfg, root, spec, model, out)
    plan = stages(cfg)
    total = cfg.steps * len(plan)
    model.unet.to(d.device)
    teacher = model.denoiser()  # the teacher's adapter, schedule and prediction, frozen
    log = Log(out)
    log.rewind(step)
    while step < total:
        # a checkpoint inside a stage is resumed; at a stage's end the next stage starts from its export
        mid_stage = last is not None and step == resumed_at and step % cfg.steps != 0
        step, spent = _train_stage(cfg, step // cfg.steps, plan, model, teacher, root, raw, data, weights, out, log, d,
                                   step, spent, last if mid_stage else None)
    return out / "model"


def _train_stage(cfg, index: int, plan: list[Stage], model, teacher: Denoiser, root: Path, raw: dict, data, weights,
                 out: Path, log: Log, d, step: int, spent: float, ckpt: Path | None) -> tuple[int, float]:
    from diffusers import UNet2DConditionModel
    from tqdm import tqdm

    stage, end = plan[index], (index + 1) * cfg.steps
    previous = None
    if index == 0 and cfg.init and ckpt is None:
        unet = _init_student(cfg.init, model)
    elif index == 0:
        unet = student_from(model.unet, cfg.guidance_dim)
    else:  # a halving round: the last stage's student is its teacher and its starting point
        prev_dir = out / "stages" / plan[index - 1].name / "unet"
        unet = UNet2DConditionModel.from_pretrained(prev_dir)
        frozen = UNet2DConditionModel.from_pretrained(prev_dir).to(d.device).eval().requires_grad_(False)
        previous = Denoiser(UNetModelFn(frozen, use_mask=model.use_mask), model.schedule, model.prediction)
    consistency = cfg.method == "consistency"
    unet.to(d.device).train()
    ema = EMA(unet, cfg.ema_decay)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    target_net = copy.deepcopy(unet).eval().requires_grad_(False) if consistency else None
    if ckpt is not None:
        unet.load_state_dict(UNet2DConditionModel.from_pretrained(ckpt / "model").state_dict())
        load_training_state(ckpt, opt, ema)
        if target_net is not None:
            target_net.load_state_dict(load_states(ckpt)["target"])
    student = Denoiser(UNetModelFn(unet, use_mask=model.use_mask), model.schedule, model.prediction, consistency=consistency)
    target = (Denoiser(UNetModelFn(target_net, use_mask=model.use_mask), model.schedule, model.prediction, consistency=True)
              if target_net is not None else None)
    T = model.schedule.num_train_timesteps
    skip = max(1, T // cfg.solver_steps)
    grid = model.schedule.sigmas_for(2 * stage.steps, "trailing").to(d.device, torch.float32) if previous is not None else None
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + step)
    B = cfg.batch_size
    empty = Cond(tokens=data["empty_tokens"].float().expand(B, -1, -1).to(d.device),
                 mask=data["empty_mask"].long().expand(B, -1).to(d.device))
    if index == 0 and ckpt is None:
        print(f"{stage.name}: student of {model.name}, {sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M parameters")
    bar = tqdm(total=end - index * cfg.steps, initial=step - index * cfg.steps, desc=f"distill-{stage.name}", dynamic_ncols=True)
    clock = ComputeClock(spent)
    while step < end:
        _, x0, tokens, mask, t, noise = draw_batch(data, weights, B, cfg.cond_dropout, T, gen)
        w = cfg.guidance_min + (cfg.guidance_max - cfg.guidance_min) * torch.rand(B, generator=gen)
        x0, tokens, mask, t, noise, w = (v.to(d.device) for v in (x0, tokens, mask, t, noise, w))
        cond = Cond(tokens=tokens, mask=mask)
        if consistency:
            t = torch.randint(1, T, (B,), generator=gen).to(d.device)
            loss = consistency_loss(student, target, teacher, x0, noise, t, cond, empty, w, skip, cfg.huber_c)
        elif previous is None:
            loss = guided_loss(student, teacher, x0, noise, t, cond, empty, w)
        else:
            i = torch.randint(stage.steps, (B,), generator=gen).to(d.device)
            loss = halving_loss(student, previous, grid, x0, noise, i, cond, w)
        update(loss, unet, opt, ema, lr_at(step - index * cfg.steps, cfg.lr, cfg.warmup, cfg.steps))
        if target_net is not None:
            follow(target_net, unet, cfg.target_decay)
        step += 1
        bar.update(1)
        spent = clock.tick()
        if step % cfg.log_every == 0:
            log.write(step, loss=loss.item(), **{f"loss_{stage.name}": loss.item()}, lr=opt.param_groups[0]["lr"],
                      train_hours=spent / 3600)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        info = {"steps": step, "stage": stage.name, "train_hours": spent / 3600, "device": str(d.device),
                "method": cfg.method, "batch_size": B, "lr": cfg.lr, **({"init": str(cfg.init)} if cfg.init else {})}
        steps = stage.steps or model.defaults.steps
        if cfg.snapshot_every and step % cfg.snapshot_every == 0:
            snap = export_student(unet, ema, root, raw, out / "snapshots" / f"step-{step:07d}", cfg, model, stage, info,
                                  torch.float16)
            if cfg.samples:
                sample_grid(snap, out / f"samples-{step:07d}.png", steps=steps, cfg_scale=_default_cfg(cfg, model))
        if step == end and not consistency:
            export_student(unet, ema, root, raw, out / "stages" / stage.name, cfg, model, stage, info,
                           name=f"{cfg.name}-{stage.name}")
        if step % cfg.ckpt_every == 0 or step == end:
            save_checkpoint(out, step, unet, ema, opt, {"config": "config.json", "train_seconds": spent,
                                                        "method": cfg.method, "stage": stage.name},
                            states={"target": target_net.state_dict()} if target_net is not None else None)
            export_student(unet, ema, root, raw, out / "model", cfg, model, stage, info)
            log.plot(tuple(f"loss_{s.name}" for s in plan))
        clock.skip()  # exports and sample grids are not training compute
    bar.close()
    if cfg.samples:
        sample_grid(out / "model", out / f"samples-{stage.name}.png", steps=stage.steps or model.defaults.steps,
                    cfg_scale=_default_cfg(cfg, model))
    return step, spent
