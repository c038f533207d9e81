"""``dreamlab edit`` (prompt-to-prompt, inversion, DiffEdit) and ``dreamlab attention`` (attention maps)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .adapters_cli import add_adapter_options, lora_fields, register_adapters
from .errors import DreamlabError


def _pairs(values: list[str] | None, flag: str) -> dict[str, float]:
    out = {}
    for v in values or []:
        word, sep, num = v.rpartition("=")
        try:
            out[word.strip()] = float(num)
        except ValueError:
            word = ""
        if not sep or not word.strip():
            raise DreamlabError(f"{flag} {v!r}: write WORD=NUMBER, e.g. red=2")
    return out


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--negative", help="negative prompt")
    p.add_argument("--seed", type=int, help="default: random")
    for flag, kind in (("--steps", int), ("--sampler", str), ("--schedule", str), ("--cfg", float)):
        p.add_argument(flag, type=kind)
    p.add_argument("--model", help="model folder; default: the installed default model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    add_adapter_options(p)


def _fields(args: argparse.Namespace) -> dict:
    fields = {"prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed, "steps": args.steps,
              "sampler": args.sampler, "schedule": args.schedule, "cfg_scale": args.cfg, "loras": lora_fields(args)}
    return {k: v for k, v in fields.items() if v is not None}


def _load(args: argparse.Namespace):
    import torch

    from .loading.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, allow_pickle=args.allow_pickle)
    register_adapters(args, model)
    return model


def cmd_edit(args: argparse.Namespace) -> int:
    from .generate import encode_image, generate, make_request
    from .metadata import save_png

    spec = {"target": args.to, "mode": args.mode, "local_blend": args.local_blend or [],
            "reweight": _pairs(args.reweight, "--reweight"),
            "cross_replace_words": _pairs(args.cross_replace_word, "--cross-replace-word"),
            "inversion": args.inversion, "auto_mask": args.auto_mask}
    for key in ("cross_replace", "self_replace", "blend_threshold", "null_text_iters", "mask_threshold", "mask_strength"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    fields = _fields(args)
    if args.image:
        fields["init_image"] = encode_image(args.image)
    request = make_request(**fields, edit=spec)
    model = _load(args)
    result = generate(model, request)
    save_png(result.images[0], args.output, result.manifests[0])
    print(f"{args.output}  seed {result.manifests[0]['seed']}")
    if args.save_source:
        save_png(result.sources[0], args.save_source, result.source_manifests[0])
        print(f"{args.save_source}  (the source{'' if not args.image else ', reconstructed'})")
    if args.save_mask:
        if result.masks[0] is None:
            print("no mask: the edit used neither --local-blend nor --auto-mask", file=sys.stderr)
        else:
            Path(args.save_mask).parent.mkdir(parents=True, exist_ok=True)
            result.masks[0].save(args.save_mask)
            print(f"{args.save_mask}  (white: edited)")
    return 0


def cmd_attention(args: argparse.Namespace) -> int:
    from .control.daam import attention_maps, draw
    from .generate import make_request

    result = attention_maps(_load(args), make_request(**_fields(args)))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    draw(result).save(out)
    print(f"{out}  ({len(result.tokens)} tokens, seed {result.manifest['seed']})")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("edit", help="edit an image by editing its prompt (prompt-to-prompt, null-text inversion, DiffEdit)")
    e.add_argument("prompt", help="the source prompt (what the image shows)")
    e.add_argument("--to", required=True, help="the edited prompt")
    e.add_argument("--image", help="a picture to edit (inverted first); default: generate the source")
    e.add_argument("-o", "--output", default="edit.png", help="the edited image")
    e.add_argument("--save-source", help="also write the source (generated, or the picture reconstructed)")
    e.add_argument("--save-mask", help="also write the mask (local blend's or DiffEdit's)")
    e.add_argument("--mode", default="auto", choices=("auto", "replace", "refine"),
                   help="replace: swap words of equal token counts; refine: words added (default: auto)")
    e.add_argument("--local-blend", action="append", metavar="WORD", help="keep the source outside this word's attention (repeatable)")
    e.add_argument("--blend-threshold", type=float, help="local blend's threshold (default 0.3)")
    e.add_argument("--reweight", action="append", metavar="WORD=S", help="scale the attention to a word of the edit (repeatable)")
    e.add_argument("--cross-replace", type=float, help="share of the steps with the source's cross-attention (default 0.8)")
    e.add_argument("--cross-replace-word", action="append", metavar="WORD=SHARE", help="that share for one word (repeatable)")
    e.add_argument("--self-replace", type=float, help="share of the steps with the source's self-attention (default 0.4)")
    e.add_argument("--inversion", default="null-text", choices=("ddim", "null-text"), help="for --image (default: null-text)")
    e.add_argument("--null-text-iters", type=int, help="null-text inversion: optimiser steps per step (default 10)")
    e.add_argument("--auto-mask", action="store_true", help="DiffEdit: find the region to edit, then inpaint it")
    e.add_argument("--mask-threshold", type=float, help="DiffEdit's threshold (default 0.5)")
    e.add_argument("--mask-strength", type=float, help="DiffEdit: share of the schedule re-run in the mask (default 0.8)")
    _common(e)
    e.set_defaults(func=cmd_edit)

    a = sub.add_parser("attention", help="draw each word's cross-attention map over the generated image (DAAM)")
    a.add_argument("prompt")
    a.add_argument("-o", "--output", default="attention.png")
    _common(a)
    a.set_defaults(func=cmd_attention)
