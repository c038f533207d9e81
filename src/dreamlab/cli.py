"""Command line: parse, build a GenerationRequest, call generate. No sampling logic here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing reaches a model hub at run time

from . import __version__
from .errors import DreamlabError


def _output_paths(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix or '.png'}") for i in range(n)]


def _generate_remote(args: argparse.Namespace) -> int:
    """`dreamlab generate --server URL`: the request run by a warm `dreamlab serve` (stdlib client, no torch)."""
    from .client import file_b64, generate_remote
    from .inputs import INPUTS

    local = [flag for flag, on in (("--embedding", getattr(args, "embedding", None)), ("--controlnet", getattr(args, "controlnet", None)),
                                   ("--region", getattr(args, "region", None)), ("--region-mask", getattr(args, "region_mask", None)),
                                   ("--reference", getattr(args, "reference", None)), ("--model", args.model),
                                   ("--prediction", args.prediction), ("--preprocess", getattr(args, "preprocess", False))) if on]
    if local:
        raise DreamlabError(f"{local[0]} is not available with --server (the server runs its own model and files); "
                            "use the HTTP API's JSON fields, or run without --server")
    fields: dict = {"prompt": args.prompt, "negative_prompt": args.negative, "seed": args.seed, "steps": args.steps,
                    "sampler": args.sampler, "schedule": args.schedule, "cfg_scale": args.cfg, "guidance_rescale": args.rescale,
                    "eta": args.eta, "dynamic_threshold": args.dynamic_threshold, "width": args.width, "height": args.height,
                    "batch": args.batch, "strength": args.strength, "noise_level": getattr(args, "noise_level", None),
                    "image_cfg_scale": getattr(args, "image_cfg", None), "window": getattr(args, "window", None),
                    "window_stride": getattr(args, "window_stride", None)}
    for inp in INPUTS:
        if path := getattr(args, inp.dest, None):
            fields[inp.field] = file_b64(path, inp.what)
    specs = getattr(args, "control", None) or []
    scales, starts, ends = (_per_control(getattr(args, k), len(specs), flag) for k, flag in
                            (("control_scale", "--control-scale"), ("control_start", "--control-start"), ("control_end", "--control-end")))
    controls = []
    for spec, scale, start, end in zip(specs, scales, starts, ends):
        condition, sep, path = spec.partition(":")
        if not sep or not path:
            raise DreamlabError(f"--control {spec!r}: write CONDITION:IMAGE, e.g. canny:edges.png")
        c = {"condition": condition, "image": file_b64(path, "control image"), "scale": scale, "start": start, "end": end}
        controls.append({k: v for k, v in c.items() if v is not None})
    loras = []
    for spec in getattr(args, "lora", None) or []:
        name, _, scale = spec.partition(":")
        if "/" in name or name.endswith(".safetensors"):
            raise DreamlabError(f"--lora {spec}: with --server, name a LoRA of the server's library (GET /api/adapters), not a file")
        try:
            loras.append({"name": name, "scale": float(scale) if scale else 1.0})
        except ValueError:
            raise DreamlabError(f"--lora {spec}: the scale must be a number") from None
    body = {k: v for k, v in fields.items() if v is not None}
    body.update({k: v for k, v in (("controls", controls), ("loras", loras)) if v})
    outputs = _output_paths(Path(args.output), args.batch or 1)
    for path, seed in generate_remote(args.server, body, outputs):
        print(f"{path}  seed {seed}")
    return 0


def cmd_generate(args: argparse.Namespace, model=None) -> int:
    if getattr(args, "server", None) and model is None:
        return _generate_remote(args)
    # the request is checked before the sampling engine and the model's libraries are imported: a bad
    # value or a missing file fails in a fraction of the start-up (docs/benchmarks.md, Start-up)
    from .adapters_cli import lora_fields, register_adapters
    from .compose_cli import composition_fields
    from .request import INPUTS, encode_image, make_request

    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative,
        "seed": args.seed,
        "steps": args.steps,
        "sampler": args.sampler,
        "schedule": args.schedule,
        "cfg_scale": args.cfg,
        "guidance_rescale": args.rescale,
        "eta": args.eta,
        "dynamic_threshold": args.dynamic_threshold,
        "width": args.width,
        "height": args.height,
        "batch": args.batch,
        "strength": args.strength,
        "noise_level": getattr(args, "noise_level", None),
        "image_cfg_scale": getattr(args, "image_cfg", None),
        **{i.field: encode_image(path) for i in INPUTS if (path := getattr(args, i.dest, None))},
    }
    fields["controls"] = _controls(args)
    fields["loras"] = lora_fields(args)
    fields.update(composition_fields(args))
    request = make_request(**{k: v for k, v in fields.items() if v is not None})
    import torch

    from .generate import generate
    from .loading.model import load_model
    from .metadata import save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    model = model or load_model(args.model, device=args.device, allow_pickle=args.allow_pickle, prediction=args.prediction)
    for folder in getattr(args, "controlnet", None) or []:
        model.use_controlnet(folder)
    register_adapters(args, model)

    progress = None
    if not args.quiet:
        from tqdm import tqdm

        bars: list[tqdm] = []

        def progress(info) -> None:
            if not bars:
                bars.append(tqdm(total=info.total, desc="sampling", unit="step", leave=False))
            bars[0].update(1)

    result = generate(model, request, on_step=progress)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    for image, manifest, path in zip(result.images, result.manifests, _output_paths(Path(args.output), request.batch)):
        save_png(image, path, manifest)
        print(f"{path}  seed {manifest['seed']}")
    return 0


def _per_control(values: list[float] | None, n: int, flag: str) -> list[float | None]:
    """One value for every control, or one each."""
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise DreamlabError(f"{flag} is given {len(values)} times for {n} --control; give it once (for all) or once per control")
    return values


def _controls(args: argparse.Namespace) -> list[dict] | None:
    """--control COND:FILE (repeatable) with --control-scale/--control-start/--control-end -> request controls."""
    from .request import encode_image

    specs = getattr(args, "control", None) or []
    if not specs:
        return None
    n = len(specs)
    scales = _per_control(args.control_scale, n, "--control-scale")
    starts = _per_control(args.control_start, n, "--control-start")
    ends = _per_control(args.control_end, n, "--control-end")
    out = []
    for spec, scale, start, end in zip(specs, scales, starts, ends):
        condition, sep, path = spec.partition(":")
        if not sep or not path:
            raise DreamlabError(f"--control {spec!r}: write CONDITION:IMAGE, e.g. canny:edges.png")
        c = {"condition": condition, "image": encode_image(path), "preprocess": args.preprocess,
             "scale": scale, "start": start, "end": end}
        out.append({k: v for k, v in c.items() if v is not None})
    return out


def cmd_upscale(args: argparse.Namespace) -> int:
    """`dreamlab upscale IMAGE --model SR`: generate with the image as a super-resolution model's input."""
    from .loading.model import load_model, super_resolution_dir

    # a cascade enlarges with its second stage; its base is not loaded
    model = load_model(super_resolution_dir(args.model), device=args.device, allow_pickle=args.allow_pickle)
    if model.sr is None:
        raise DreamlabError(f"{args.model} is not a super-resolution model or a cascade; train one with "
                            "`dreamlab train unet --sr-from SIZE`")
    return cmd_generate(args, model=model)


def cmd_instruct(args: argparse.Namespace) -> int:
    """`dreamlab instruct IMAGE "make it green"`: generate with the image as an instruction model's source."""
    args.source_image, args.prompt = args.image, args.instruction
    return cmd_generate(args)


def cmd_cascade(args: argparse.Namespace) -> int:
    from .train.ship import assemble_cascade

    out = assemble_cascade(args.base, args.sr, args.output, name=args.name)
    print(f"cascade: {out}")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from .core.samplers import SAMPLERS, STOCHASTIC

    for name in sorted(SAMPLERS):
        doc = (SAMPLERS[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:16s} {'stochastic ' if name in STOCHASTIC else 'deterministic'}  {doc}")
    return 0


def add_dataclass_args(parser: argparse.ArgumentParser, cls, required: tuple[str, ...] = ()) -> None:
    """One --option per field of a config dataclass; tuples are comma-separated."""
    import dataclasses

    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is dataclasses.MISSING else f.default
        kind = str(f.type)
        if kind == "bool":  # --name / --no-name
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=f"default: {'on' if default else 'off'}")
            continue
        if "tuple[int" in kind:
            conv = lambda v: tuple(int(p) for p in v.split(","))  # noqa: E731
        elif "tuple[str" in kind:
            conv = lambda v: tuple(p for p in v.split(",") if p)  # noqa: E731
        elif "float" in kind:
            conv = float
        elif "int" in kind:
            conv = int
        else:
            conv = str
        parser.add_argument(flag, dest=f.name, type=conv, default=default, required=f.name in required,
                            help=f"default: {default}" if default is not None else None)


def _config(cls, args: argparse.Namespace):
    """The config dataclass ``cls`` from the parsed options; sets torch's threads if asked."""
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return cls(**{k: v for k, v in vars(args).items() if k in cls.__dataclass_fields__})


def _train(what: str, module: str, config: str, fn: str):
    """A `dreamlab train WHAT` command: build the config, train, say where the result is (rank 0)."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        mod = importlib.import_module(module, __package__)
        out = getattr(mod, fn)(_config(getattr(mod, config), args))
        if os.environ.get("RANK", "0") == "0":
            print(f"{what}: {out}")
        return 0

    return run


cmd_train_vae = _train("exported VAE", ".train.vae", "VAEConfig", "train_vae")
cmd_train_unet = _train("exported model", ".train.unet", "UNetConfig", "train_unet")
cmd_train_judge = _train("judge", ".eval.judge", "JudgeConfig", "train_judge")
cmd_train_controlnet = _train("exported ControlNet", ".train.controlnet", "ControlNetConfig", "train_controlnet")
cmd_train_distill = _train("exported student", ".train.distill", "DistillConfig", "train_distill")
cmd_train_instruct = _train("exported instruction model", ".train.instruct", "InstructConfig", "train_instruct")


def cmd_eval(args: argparse.Namespace) -> int:
    from .eval.evaluate import EvalConfig, curve_file, evaluate, evaluate_run, format_table, save_result

    cfg = _config(EvalConfig, args)
    from .loading.model import named_model, read_spec

    if cfg.model and not cfg.run and (root := named_model(cfg.model)).is_dir() and "source_image" in read_spec(root).inputs:
        return _eval_instruct(cfg, root, args)
    if cfg.controlnet:
        return _eval_controlnet(cfg, args)
    if cfg.run:
        points = evaluate_run(cfg, cfg.run)
        print(f"{len(points)} snapshots scored; curve written to {curve_file(cfg, cfg.run).with_suffix('.png')}")
        return 0
    result = evaluate(cfg)
    print(format_table(result))
    print(f"{result['n_generated']} generated images, {result['n_real_held_out']} held-out real; "
          f"{result['seconds_per_image']:.2f} s per generated image")
    if args.json:
        save_result(result, Path(args.json))
    return 0


def _eval_instruct(cfg, root: Path, args: argparse.Namespace) -> int:
    """`dreamlab eval --model INSTRUCTION_MODEL`: held-out edits at the model's own guidance (docs/control.md)."""
    import json

    from .eval.instruct import evaluate_instruct
    from .loading.model import load_model

    result = evaluate_instruct(load_model(root), cfg.data, n=cfg.prompts, steps=cfg.steps, judge_dir=cfg.judge, seed=cfg.seed)
    achieved = ("no edit that changes the emoji" if result["edit_top5"] is None else
                f"edit achieved (judge top-5 of the target, {result['n_changing']} edits that change the emoji) "
                f"{result['edit_top5']:.3f}, the unedited sources {result['sources']['edit_top5']:.3f}")
    print(f"{result['n']} held-out edits at s_I {result['image_scale']:g}, s_T {result['text_scale']:g}: {achieved}; "
          f"source kept: judge-feature cosine {result['cos']:.3f}, alpha IoU {result['iou']:.3f}; "
          f"{result['seconds_per_edit']:.2f} s per edit")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


def _eval_controlnet(cfg, args: argparse.Namespace) -> int:
    """`dreamlab eval --controlnet DIR`: control fidelity, FID and top-5 on held-out maps (docs/control.md)."""
    import json

    from .eval.control import evaluate_controlnet
    from .loading.model import load_model
    from .models.controlnet import read_controlnet_spec

    folder = Path(cfg.controlnet).expanduser()
    condition = read_controlnet_spec(folder).controlnet.condition
    try:
        scales = tuple(float(s) for s in cfg.control_scales.split(","))
    except ValueError:
        raise DreamlabError(f"--control-scales {cfg.control_scales!r}: comma-separated numbers, e.g. 0,0.5,1") from None
    scores = evaluate_controlnet(load_model(cfg.model), folder, condition, cfg.data, n=cfg.prompts, scales=scales,
                                 steps=cfg.steps, judge_dir=cfg.judge)
    what = "edge F1" if condition == "canny" else "silhouette IoU"
    for scale, s in scores.items():
        print(f"{condition} at scale {scale}: {what} {s['fidelity']:.3f}, FID {s['fid']:.1f}, top-5 {s['top5']:.3f} ({s['n']} held-out maps)")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=1))
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .generate import generate, make_request
    from .images import labelled_grid
    from .loading.model import load_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    model = load_model(args.model)
    images = []
    for i, prompt in enumerate(args.prompts):
        req = make_request(prompt=prompt, seed=args.seed + i, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler)
        images += generate(model, req).images
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, args.prompts, cols=args.cols).save(out)
    print(f"{len(images)} images -> {out} (image i uses seed {args.seed} + i)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamlab", description="Diffusion image generation, editing and training.")
    p.add_argument("--version", action="version", version=f"dreamlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt", help='what to draw; compose prompts with AND and weights: "a cat AND a hat :0.5"')
    g.add_argument("-o", "--output", default="out.png", help="PNG path; a batch writes NAME-0.png, NAME-1.png, ...")
    g.add_argument("-n", "--negative", help="negative prompt")
    g.add_argument("--seed", type=int, help="image i of the batch uses seed + i (default: random)")
    g.add_argument("--steps", type=int)
    g.add_argument("--sampler", help="see `dreamlab samplers`")
    g.add_argument("--schedule", help="karras, trailing, leading or linspace")
    g.add_argument("--cfg", type=float, help="classifier-free guidance scale")
    g.add_argument("--rescale", type=float, help="guidance rescale phi in [0, 1]")
    g.add_argument("--eta", type=float, help="noise of ddim / ancestral / sde samplers")
    g.add_argument("--dynamic-threshold", type=float, help="Imagen dynamic thresholding percentile, e.g. 0.995")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--batch", type=int)
    from .inputs import INPUTS

    for inp in INPUTS:
        g.add_argument(inp.flag, dest=inp.dest, help=inp.help)
    g.add_argument("--strength", type=float, help="img2img: share of the schedule re-run, 0..1 (default 0.75)")
    g.add_argument("--control", action="append", metavar="COND:IMAGE",
                   help="ControlNet control, e.g. canny:edges.png or shape:mask.png (repeatable: residuals add up)")
    g.add_argument("--control-scale", type=float, action="append", help="weight of each control (once for all, or once each)")
    g.add_argument("--control-start", type=float, action="append", help="share of the steps before a control starts (0..1)")
    g.add_argument("--control-end", type=float, action="append", help="share of the steps after which it stops (0..1)")
    g.add_argument("--preprocess", action="store_true", help="compute the control maps from pictures (Canny edges, silhouette)")
    g.add_argument("--controlnet", action="append", metavar="DIR", help="use this ControlNet folder (repeatable)")
    from .adapters_cli import add_adapter_options

    add_adapter_options(g)
    from .compose_cli import add_generate_options

    add_generate_options(g)
    g.add_argument("--noise-level", type=int, help="super-resolution: noise added to the low-res input, a timestep 0..999")
    g.add_argument("--image-cfg", type=float, help="instruction-editing models: image guidance scale s_I (default: the model's)")
    g.add_argument("--model", help="model folder (diffusers format) or single-file SD checkpoint (.safetensors); "
                   "default: the installed default model")
    g.add_argument("--prediction", choices=("epsilon", "v"),
                   help="a single-file checkpoint's prediction type, where the file does not say it right (SD 2.x: v unless it says otherwise)")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    g.add_argument("-q", "--quiet", action="store_true")
    g.add_argument("--server", metavar="URL", help="run on a warm `dreamlab serve` at URL (e.g. http://127.0.0.1:7860): "
                   "no model is loaded here, so the image comes in about a second")
    g.set_defaults(func=cmd_generate)

    u = sub.add_parser("upscale", help="enlarge an image with a super-resolution model (a cascade's second stage)")
    u.add_argument("lowres_image", metavar="IMAGE")
    u.add_argument("--model", required=True, help="a super-resolution model folder, or a cascade folder (its SR stage is used)")
    u.add_argument("-p", "--prompt", default="", help="what the image shows (SR stages are text-conditional)")
    u.add_argument("-o", "--output", default="upscaled.png")
    u.add_argument("-n", "--negative", help="negative prompt")
    for flag, kind, text in (("--seed", int, None), ("--steps", int, None), ("--sampler", str, None),
                             ("--schedule", str, None), ("--cfg", float, "classifier-free guidance scale"),
                             ("--width", int, "output width (default: the input's times the model's factor)"),
                             ("--height", int, None), ("--batch", int, None),
                             ("--noise-level", int, "noise added to the input, a timestep 0..999 (default: the model's)"),
                             ("--threads", int, None)):
        u.add_argument(flag, type=kind, help=text)
    u.add_argument("--device", default="cpu")
    u.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    u.add_argument("-q", "--quiet", action="store_true")
    u.set_defaults(func=cmd_upscale, prediction=None, rescale=None, eta=None, dynamic_threshold=None, init_image=None, strength=None, mask=None)

    ins = sub.add_parser("instruct", help="edit an image by an instruction (InstructPix2Pix): \"make it green\"")
    ins.add_argument("image", help="the image to edit")
    ins.add_argument("instruction", help='what to change, e.g. "make it green", "turn the cat into a dog"')
    ins.add_argument("-o", "--output", default="instruct.png", help="PNG path; a batch writes NAME-0.png, NAME-1.png, ...")
    ins.add_argument("--image-cfg", type=float, help="image guidance s_I: higher keeps more of the source (default: the model's, 1.5)")
    ins.add_argument("--cfg", type=float, help="text guidance s_T: higher follows the instruction more (default: the model's, 5)")
    ins.add_argument("-n", "--negative", help="negative prompt")
    for flag, kind in (("--seed", int), ("--steps", int), ("--sampler", str), ("--schedule", str), ("--width", int),
                       ("--height", int), ("--batch", int), ("--threads", int)):
        ins.add_argument(flag, type=kind)
    ins.add_argument("--model", default="instruct", help="an instruction-editing model folder (default: the shipped one)")
    ins.add_argument("--device", default="cpu")
    ins.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    ins.add_argument("-q", "--quiet", action="store_true")
    ins.set_defaults(func=cmd_instruct, prediction=None, rescale=None, eta=None, dynamic_threshold=None, strength=None)

    ca = sub.add_parser("cascade", help="assemble a cascade folder from a base model and a super-resolution stage")
    ca.add_argument("base", help="text-to-image model folder (e.g. trained with --resolution 32)")
    ca.add_argument("sr", help="super-resolution model folder (trained with --sr-from)")
    ca.add_argument("-o", "--output", required=True, help="the new cascade folder")
    ca.add_argument("--name", help="model name recorded in manifests (default: the folder's name)")
    ca.set_defaults(func=cmd_cascade)

    gr = sub.add_parser("grid", help="one image per prompt, in a labelled contact sheet")
    gr.add_argument("prompts", nargs="+")
    gr.add_argument("-o", "--output", default="grid.png")
    gr.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    gr.add_argument("--steps", type=int, default=30)
    gr.add_argument("--cfg", type=float, default=5.0)
    gr.add_argument("--sampler", default="dpmpp_2m")
    gr.add_argument("--cols", type=int, default=4)
    gr.add_argument("--model", help="model folder; default: the installed default model")
    gr.add_argument("--threads", type=int)
    gr.set_defaults(func=cmd_grid)

    s = sub.add_parser("samplers", help="list the samplers")
    s.set_defaults(func=cmd_samplers)

    from .compose_cli import add_cli as add_compose_cli
    from .eval.control import add_cli as add_control_eval_cli
    from .edit_cli import add_cli as add_edit_cli
    from .replay import add_cli as add_replay_cli

    add_edit_cli(sub)
    add_compose_cli(sub)
    add_control_eval_cli(sub)
    from .server.cli import add_cli as add_serve_cli
    from .server.worker_cli import add_cli as add_worker_cli

    add_serve_cli(sub)
    add_worker_cli(sub)
    add_replay_cli(sub)
    from .loading.convert import add_cli as add_convert_cli

    add_convert_cli(sub)
    from .train.ship import add_cli as add_ship_cli

    add_ship_cli(sub)

    from .data.emoji import add_cli as add_emoji_cli
    from .data.personal import add_cli as add_personal_cli
    from .data.instruct import add_cli as add_instruct_data_cli
    from .settings import ControlNetConfig, DistillConfig, EvalConfig, InstructConfig, JudgeConfig, UNetConfig, VAEConfig

    data = sub.add_parser("data", help="build training data").add_subparsers(dest="dataset", required=True)
    add_emoji_cli(data)
    add_personal_cli(data)
    add_instruct_data_cli(data)

    train = sub.add_parser("train", help="train models (resumes from the last checkpoint in --out)")
    tsub = train.add_subparsers(dest="model", required=True)
    tv = tsub.add_parser("vae", help="the RGBA autoencoder")
    add_dataclass_args(tv, VAEConfig, required=("data", "out"))
    tv.add_argument("--threads", type=int)
    tv.set_defaults(func=cmd_train_vae)
    tu = tsub.add_parser("unet", help="the latent text-conditional UNet")
    add_dataclass_args(tu, UNetConfig, required=("data", "vae", "out"))
    tu.add_argument("--threads", type=int)
    tu.set_defaults(func=cmd_train_unet)
    tc = tsub.add_parser("controlnet", help="a ControlNet for the (frozen) default model: canny edges or shape")
    add_dataclass_args(tc, ControlNetConfig, required=("data", "out"))
    tc.add_argument("--threads", type=int)
    tc.set_defaults(func=cmd_train_controlnet)
    td = tsub.add_parser("distill", help="a few-step student of a frozen teacher: --method consistency or progressive")
    add_dataclass_args(td, DistillConfig, required=("data", "out"))
    td.add_argument("--threads", type=int)
    td.set_defaults(func=cmd_train_distill)
    ti = tsub.add_parser("instruct", help="an instruction-editing model (InstructPix2Pix) from the default model")
    add_dataclass_args(ti, InstructConfig, required=("data", "out"))
    ti.add_argument("--threads", type=int)
    ti.set_defaults(func=cmd_train_instruct)

    from .adapters_cli import add_cli as add_adapters_cli
    from .adapters_cli import add_train_cli as add_adapter_train_cli

    add_adapter_train_cli(tsub, add_dataclass_args, _train)
    add_adapters_cli(sub)
    from .adapters_cli import add_imagic_cli

    add_imagic_cli(sub)

    tj = tsub.add_parser("judge", help="the emoji classifier used by `dreamlab eval`")
    add_dataclass_args(tj, JudgeConfig, required=("data", "out"))
    tj.add_argument("--threads", type=int)
    tj.set_defaults(func=cmd_train_judge)

    ev = sub.add_parser("eval", help="FID, KID and prompt alignment of a model, with the held-out real ceiling")
    add_dataclass_args(ev, EvalConfig)
    ev.add_argument("--json", help="also write the results here")
    ev.add_argument("--threads", type=int)
    ev.set_defaults(func=cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DreamlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
