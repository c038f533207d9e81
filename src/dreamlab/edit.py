"""Text-driven editing (docs/editing.md): prompt-to-prompt on a generated or an inverted source, and
DiffEdit's automatic masks. A task with its own run, composed of the engine's seams: an attention patch
for the request's view, guiders whose rows carry the stream they belong to, a state hook for local
blending, DDIM / null-text inversion, and the inpainting wrapper.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from safetensors.torch import load_file, save_file

from .control.attention import Chain, CrossAttentionStore, attention_patch
from .control.inpaint import inpaint
from .control.masks import diffedit_mask
from .control.null_text import StepUncondCFG, null_text_inversion
from .control.prompt2prompt import EDIT, SOURCE, LocalBlend, PromptToPrompt
from .control.tokens import cross_mapper, tokens, word_positions
from .core.guiders import CFG, guide
from .core.guiders import _strip
from .core.inversion import ddim_invert
from .core.noise import NoiseSource, stream_seed
from .core.samplers import get_sampler, prior_std
from .core.schedules import truncate
from .core.types import Cond, Role, Row
from .errors import InvalidRequestError
from .images import resize, to_pil
from .models.bundle import ModelBundle
from .models.patches import patched
from .request import EditSpec, GenerationRequest, decode_image, image_sha256, split_prompt

DETERMINISTIC = ("ddim", "euler")  # samplers that retrace an inversion (eta 0)
MASK_STREAM = 1 << 42  # DiffEdit's noises: stream_seed(seed, MASK_STREAM + j)


def check_edit(model: ModelBundle, req: GenerationRequest) -> None:
    """What an edit request can get wrong against a model, in one line, before anything runs."""
    spec = req.edit
    assert spec is not None
    if model.text_encoder is None or not hasattr(model.text_encoder, "tokenizer"):
        raise InvalidRequestError("editing by prompt needs a model with a text encoder")
    if model.upscaler is not None or model.sr is not None:
        raise InvalidRequestError("editing works on a single text-to-image model, not a cascade or an SR stage")
    if getattr(model, "student", None) is not None and model.student.method == "consistency":
        raise InvalidRequestError(f"editing follows the denoising path step by step (and inverts images along it); "
                                  f"{model.name} is a consistency student, whose every step jumps to its end: edit with "
                                  f"its teacher {model.student.teacher or ''}".rstrip())
    if "source_image" in model.inputs:
        raise InvalidRequestError(f"{model.name} edits by instruction (`dreamlab instruct`); prompt-to-prompt editing "
                                  "runs on text-to-image models")
    if len(split_prompt(req.prompt)) > 1 or len(split_prompt(spec.target)) > 1:
        raise InvalidRequestError("editing takes plain prompts, not prompts composed with AND")
    if req.mask_image is not None or req.controls:
        raise InvalidRequestError("editing takes no mask_image or controls (auto_mask finds the region)")
    if req.regions or req.window is not None or req.illusion is not None or req.ilvr is not None:
        raise InvalidRequestError("editing takes no regions, windows, illusion or ilvr")
    if req.init_image is not None and req.sampler not in DETERMINISTIC:
        raise InvalidRequestError(f"editing a given image inverts it: use a deterministic sampler ({', '.join(DETERMINISTIC)}), "
                                  f"not {req.sampler}")
    if req.init_image is not None and req.eta:
        raise InvalidRequestError("editing a given image inverts it: eta must be 0")
    plan(model, req.prompt, spec, req.steps)  # token counts, words, lengths


def plan(model: ModelBundle, source: str, spec: EditSpec, steps: int) -> dict[str, Any]:
    """The controller's pieces from the prompts: key mapping, per-token windows, equalizer, blend words."""
    enc = model.text_encoder
    src, tgt = tokens(enc, source), tokens(enc, spec.target)
    mode = spec.mode
    if mode == "auto":
        mode = "replace" if len(src) == len(tgt) else "refine"
    index, weight = cross_mapper(src, tgt, enc.max_length, mode)
    until = torch.full((enc.max_length,), float(round(spec.cross_replace * steps)))
    for word, share in spec.cross_replace_words.items():
        until[word_positions(enc, spec.target, word)] = float(round(share * steps))
    equalizer = None
    if spec.reweight:
        equalizer = torch.ones(enc.max_length)
        for word, scale in spec.reweight.items():
            equalizer[word_positions(enc, spec.target, word)] = scale
    blend = None
    if spec.local_blend:
        src_words, tgt_words = [], []
        for word in spec.local_blend:
            in_src = _positions_or_none(enc, source, word)
            in_tgt = _positions_or_none(enc, spec.target, word)
            if in_src is None and in_tgt is None:
                word_positions(enc, spec.target, word)  # raises, naming the target's words
            src_words += in_src or []
            tgt_words += in_tgt or []
        blend = (src_words, tgt_words)
    return {"mode": mode, "index": index, "weight": weight, "until": until, "equalizer": equalizer, "blend": blend}


def _positions_or_none(enc, prompt: str, word: str) -> list[int] | None:
    try:
        return word_positions(enc, prompt, word)
    except InvalidRequestError:
        return None


def _streams(cond: Cond, stream: int) -> Cond:
    return cond.with_roles(tuple(Row(Role.COND, stream=stream) for _ in range(cond.rows or 1)))


def _inversion_cache() -> Path:
    return Path(os.environ.get("DREAMLAB_CACHE", "~/.cache/dreamlab")).expanduser() / "inversions"


def invert(model: ModelBundle, req: GenerationRequest, latents: Tensor, sigmas, cond: Cond, uncond: Cond,
           progress=None) -> tuple[Tensor, list[Tensor] | None]:
    """(the state at sigmas[0], the per-step null-text embeddings or None), cached per image, prompt,
    model and settings, so that several edits of one image invert once."""
    spec = req.edit
    key = json.dumps({"image": image_sha256(req.init_image), "prompt": req.prompt, "negative": req.negative_prompt,
                      "unet": model.files.get("unet/diffusion_pytorch_model.safetensors"), "steps": req.steps,
                      "schedule": req.schedule, "cfg": req.cfg_scale, "inversion": spec.inversion,
                      "iters": spec.null_text_iters, "size": list(latents.shape)}, sort_keys=True)
    file = _inversion_cache() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".safetensors")
    if file.exists():
        data = load_file(str(file))
        unconds = list(data["uncond"].unbind(0)) if "uncond" in data else None
        return data["x"].to(latents), unconds
    plain = model.denoiser(sigmas=sigmas)
    with torch.no_grad():
        path = ddim_invert(plain, latents, sigmas, cond)
    unconds = None
    if spec.inversion == "null-text" and req.cfg_scale != 1.0:
        unconds = null_text_inversion(plain, path, sigmas, cond, uncond, req.cfg_scale, iters=spec.null_text_iters,
                                      progress=progress)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".tmp-{file.name}")
    save_file({"x": path[0].contiguous().cpu(), **({"uncond": torch.stack(unconds).contiguous().cpu()} if unconds else {})},
              str(tmp))
    tmp.replace(file)
    return path[0], unconds


def _guider(uncond: Cond, req: GenerationRequest, sigmas, unconds):
    if req.cfg_scale == 1.0:
        return None
    return StepUncondCFG(uncond, unconds, sigmas, req.cfg_scale) if unconds is not None else CFG(uncond, req.cfg_scale)


def _edit_one(model: ModelBundle, req: GenerationRequest, width: int, height: int, seed: int, progress) -> dict[str, Any]:
    """One (source, edit) pair: latents, and the mask of local blend or DiffEdit if any."""
    spec = req.edit
    sigmas = model.schedule.sigmas_for(req.steps, req.schedule)
    f = model.space.factor
    shape = (model.space.channels, height // f, width // f)
    noise = NoiseSource([seed, seed], shape, device=model.device)
    cond_src = _streams(model.encode_prompts([req.prompt]), SOURCE)
    cond_tgt = _streams(model.encode_prompts([spec.target]), EDIT)
    uncond = model.encode_prompts([req.negative_prompt])
    known, unconds = None, None
    if req.init_image is not None:
        from .generate import _to_tensor

        source_px = _to_tensor(decode_image(req.init_image, "init_image"), model.space.image_channels, width, height)
        with torch.no_grad():
            known = model.space.encode(source_px.to(model.device))
    if spec.auto_mask:
        return _diffedit(model, req, sigmas, known, cond_src, cond_tgt, uncond, seed, shape, progress)
    if known is not None:
        x_top, unconds = invert(model, req, known, sigmas, cond_src, uncond)
        x = torch.cat([x_top, x_top])
    else:
        x = noise.initial() * prior_std(float(sigmas[0]))
    p = plan(model, req.prompt, spec, len(sigmas) - 1)
    p2p = PromptToPrompt(len(sigmas) - 1, p["index"], p["weight"], p["until"], int(round(spec.self_replace * (len(sigmas) - 1))),
                         p["equalizer"])
    blend = LocalBlend(*p["blend"], threshold=spec.blend_threshold) if p["blend"] else None
    maps = CrossAttentionStore(EDIT)  # the edit's own attention maps, to show (read only: costs no change)
    controller = Chain(p2p, maps, *(blend.stores if blend else ()))
    with patched(model, [attention_patch(controller)]) as view, torch.no_grad():
        plain = view.denoiser(sigmas=sigmas)
        g_src, g_tgt = _guider(uncond, req, sigmas, unconds), _guider(uncond, req, sigmas, unconds)
        d_src = guide(plain, g_src) if g_src else plain
        d_tgt = guide(plain, g_tgt) if g_tgt else plain

        def joint(x, sigma, cond):  # the source first: its attention is what the edit's row takes
            return torch.cat([d_src(x[:1], sigma[:1], cond_src), d_tgt(x[1:], sigma[1:], cond_tgt)])

        def hook(info):
            out = blend(info) if blend is not None else None
            progress(info)
            return out

        options = {"eta": req.eta} if req.eta is not None else {}
        state = get_sampler(req.sampler)(joint, x, sigmas, noise=noise, on_step=hook, **options)
    mask = blend.masks[-1] if blend is not None and blend.masks else None
    return {"source": state[:1], "edit": state[1:], "mask": mask, "maps": maps.maps()}


def _diffedit(model, req, sigmas, known, cond_src, cond_tgt, uncond, seed, shape, progress) -> dict[str, Any]:
    """DiffEdit: the mask from the two prompts' predictions at half noise, then the target prompt
    inpaints inside it, starting from the source's DDIM-inverted latents."""
    spec = req.edit
    plain = model.denoiser(sigmas=sigmas)
    with torch.no_grad():
        if known is None:  # a generated source: plain generation of the source prompt
            from .generate import generate

            known = generate(model, req.model_copy(update={"edit": None, "seed": seed, "batch": 1})).latents.to(model.device)
        guided = guide(plain, CFG(uncond, req.cfg_scale)) if req.cfg_scale != 1.0 else plain
        half = float(truncate(sigmas, 0.5)[0])
        noises = [NoiseSource([stream_seed(seed, MASK_STREAM + j)], shape, device=model.device).initial()
                  for j in range(spec.mask_noises)]
        mask, _ = diffedit_mask(guided, known, _strip(cond_src), _strip(cond_tgt), half, noises, spec.mask_threshold)
        grid = truncate(sigmas, spec.mask_strength)
        x_start = ddim_invert(plain, known, grid, _strip(cond_src))[0]
        z = (x_start - known) / float(grid[0])
        denoise = inpaint(guided, known, mask, z)
        state = get_sampler(req.sampler)(denoise, x_start, grid, cond=_strip(cond_tgt), noise=NoiseSource([seed], shape, device=model.device),
                                         on_step=progress)
    return {"source": known, "edit": state, "mask": mask[0, 0].cpu(), "pixel_mask": mask}


def run_edit(model: ModelBundle, req: GenerationRequest, width: int, height: int, on_step, seeds: list[int]):
    """Result of an edit request: the edited images; the sources and masks beside them."""
    from .generate import Result, _records

    check_edit(model, req)
    steps = len(model.schedule.sigmas_for(req.steps, req.schedule)) - 1
    total = steps * len(seeds)
    done = [0]

    def progress(info) -> None:
        done[0] += 1
        if on_step is not None:
            on_step(replace(info, i=done[0] - 1, total=total, x=info.x[-1:], denoised=info.denoised[-1:]))

    edits, sources, masks, latents, sheets = [], [], [], [], []
    for seed in seeds:
        out = _edit_one(model, req, width, height, seed, progress)
        latents.append(out["edit"])
        sheets.append(out.get("maps"))
        with torch.no_grad():
            edit_px, source_px = model.space.decode(out["edit"]), model.space.decode(out["source"])
        if "pixel_mask" in out:  # DiffEdit keeps the pixels outside its mask exactly
            m = resize(out["pixel_mask"].float() * 2 - 1, (height, width)).add(1).div(2).round()
            edit_px = edit_px * m + source_px * (1 - m)
        edits.append(edit_px)
        sources.append(source_px)
        masks.append(out["mask"])
    pixels = torch.cat(edits).clamp(-1, 1)
    sigmas = model.schedule.sigmas_for(req.steps, req.schedule)
    records = _records(model, req, seeds, width, height, sigmas)
    # the source's own request: plain generation for a generated one (the very same image), else the
    # edit of the given image to its own prompt (its reconstruction)
    if req.init_image is None:
        source_req = req.model_copy(update={"edit": None})
    else:
        source_req = req.model_copy(update={"edit": req.edit.model_copy(update={"target": req.prompt, "auto_mask": False})})
    source_records = _records(model, source_req, seeds, width, height, sigmas)
    attention = [_sheet(model, req, image, m) for image, m in zip(to_pil(pixels), sheets)]
    mask_images = [Image.fromarray((m.numpy() > 0.5).astype("uint8") * 255, "L").resize((width, height), Image.NEAREST)
                   if m is not None else None for m in masks]
    return Result(images=to_pil(pixels), manifests=[r.dump() for r in records], latents=torch.cat(latents), pixels=pixels,
                  records=records, sources=to_pil(torch.cat(sources)), source_manifests=[r.dump() for r in source_records],
                  masks=mask_images, attention=attention)


def _sheet(model: ModelBundle, req: GenerationRequest, image: Image.Image, maps: Tensor | None) -> Image.Image | None:
    """The labelled attention maps of the edited image over the target prompt's tokens."""
    from .control.daam import AttentionMaps, draw, token_maps

    if maps is None:
        return None
    toks = tokens(model.text_encoder, req.edit.target)
    return draw(AttentionMaps(image, toks.text, token_maps(maps, len(toks), image.size), {}))
