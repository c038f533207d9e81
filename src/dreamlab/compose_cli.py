"""``dreamlab collage``, ``outpaint`` and ``illusion``, and generate's composition options (windows,
regions, ILVR). Thin: they build a GenerationRequest and call generate."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .adapters_cli import add_adapter_options, lora_fields, register_adapters
from .errors import DreamlabError


def add_generate_options(g: argparse.ArgumentParser) -> None:
    g.add_argument("--window", type=int, help="MultiDiffusion: window side in pixels (e.g. the model's 64) for a larger canvas")
    g.add_argument("--window-stride", type=int, help="pixels between windows (default: half a window)")
    g.add_argument("--region", action="append", metavar="PROMPT@X0,Y0,X1,Y1",
                   help="a regional prompt in a pixel box (repeatable); the prompt is the global one")
    g.add_argument("--region-mask", action="append", metavar="PROMPT@MASK.png", help="a regional prompt in a mask (white = in)")
    g.add_argument("--reference", help="ILVR: guide toward this image's low frequencies")
    g.add_argument("--ilvr-factor", type=int, default=16, help="ILVR's down/up-sampling factor N in pixels (default 16)")


def composition_fields(args: argparse.Namespace) -> dict:
    from .generate import encode_image

    fields: dict = {}
    if getattr(args, "window", None):
        fields["window"] = args.window
    if getattr(args, "window_stride", None):
        fields["window_stride"] = args.window_stride
    regions = []
    for spec in getattr(args, "region", None) or []:
        prompt, sep, box = spec.rpartition("@")
        try:
            coords = tuple(int(v) for v in box.split(","))
        except ValueError:
            coords = ()
        if not sep or len(coords) != 4:
            raise DreamlabError(f"--region {spec!r}: write PROMPT@X0,Y0,X1,Y1, e.g. 'a red apple@0,0,32,64'")
        regions.append({"prompt": prompt, "box": coords})
    for spec in getattr(args, "region_mask", None) or []:
        prompt, sep, path = spec.rpartition("@")
        if not sep:
            raise DreamlabError(f"--region-mask {spec!r}: write PROMPT@MASK.png")
        regions.append({"prompt": prompt, "mask": encode_image(path)})
    if regions:
        fields["regions"] = regions
    if getattr(args, "reference", None):
        fields["ilvr"] = {"reference": encode_image(args.reference), "factor": args.ilvr_factor}
    return fields


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=False)
    p.add_argument("-n", "--negative", help="negative prompt")
    p.add_argument("--seed", type=int)
    for flag, kind in (("--steps", int), ("--sampler", str), ("--schedule", str), ("--cfg", float)):
        p.add_argument(flag, type=kind)
    p.add_argument("--model", help="model folder; default: the installed default model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int)
    add_adapter_options(p)


def _request(args: argparse.Namespace, **fields):
    from .generate import make_request

    base = {"negative_prompt": args.negative, "seed": args.seed, "steps": args.steps, "sampler": args.sampler,
            "schedule": args.schedule, "cfg_scale": args.cfg, "loras": lora_fields(args)}
    return make_request(**{k: v for k, v in {**base, **fields}.items() if v is not None})


def _model(args: argparse.Namespace):
    import torch

    from .loading.model import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device)
    register_adapters(args, model)
    return model


def read_layout(path: str | Path):
    """A layout file, validated; layer image paths are relative to it (read here, so the request carries bytes)."""
    from pydantic import ValidationError

    from .compose.collage import Layout
    from .generate import encode_image, format_validation_error

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise DreamlabError(f"cannot read {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise DreamlabError(f"{path} is not JSON: {e}") from None
    try:
        layout = Layout.model_validate(data)
    except ValidationError as e:
        raise DreamlabError(f"{path}: {format_validation_error(e)}") from None
    for k, layer in enumerate(layout.layers):
        if layer.image is not None:
            file = (path.parent / layer.image).resolve()
            try:
                layer.image = encode_image(file)
            except DreamlabError as e:
                raise DreamlabError(f"{path}: layers.{k}.image: {e}") from None
    return layout


def cmd_collage(args: argparse.Namespace) -> int:
    from .generate import generate
    from .metadata import save_png

    layout = read_layout(args.layout)
    req = _request(args, prompt=layout.prompt, negative_prompt=layout.negative_prompt or args.negative,
                   width=layout.width, height=layout.height,
                   collage={"layers": [layer.model_dump() for layer in layout.layers],
                            "background_strength": layout.background_strength, "harmonize": layout.harmonize})
    result = generate(_model(args), req)
    out = Path(args.output or "scene.png")
    save_png(result.images[0], out, result.manifests[0])
    print(f"{out}  (harmonised; seed {result.manifests[0]['seed']})")
    if args.layers_dir:
        d = Path(args.layers_dir)
        d.mkdir(parents=True, exist_ok=True)
        names = []
        for k, im in enumerate(result.layers[0]):
            name = f"layer-{k:02d}.png"
            im.save(d / name)
            names.append(name)
        result.sources[0].save(d / "collage.png")  # the layers restacked: the scene before harmonisation
        spec = json.loads(Path(args.layout).read_text())
        for layer, name in zip(spec["layers"], names):
            layer["rendered"] = name
        (d / "layout.json").write_text(json.dumps(spec, indent=2))
        print(f"{d}/  ({len(names)} RGBA layers, collage.png, layout.json)")
    return 0


def cmd_outpaint(args: argparse.Namespace) -> int:
    """Extend an image beyond its borders: the canvas grows, the new area is generated, the known part kept."""
    from .generate import encode_image, generate
    from .metadata import save_png

    spec = {k: getattr(args, k) for k in OUTPAINT_OPTIONS if getattr(args, k) is not None}
    req = _request(args, prompt=args.prompt, init_image=encode_image(args.image), outpaint=spec)  # the file's bytes
    result = generate(_model(args), req)
    out = Path(args.output or "outpainted.png")
    save_png(result.images[0], out, result.manifests[0])
    print(f"{out}  {result.images[0].width}x{result.images[0].height}")
    return 0


OUTPAINT_OPTIONS = ("left", "top", "right", "bottom", "fill", "ramp", "min_strength", "blend", "resample", "harmonize")


def cmd_illusion(args: argparse.Namespace) -> int:
    from .generate import generate
    from .metadata import save_png

    views = ["identity", args.view]
    req = _request(args, prompt=args.prompts[0], illusion={"prompts": list(args.prompts), "views": views})
    result = generate(_model(args), req)
    out = Path(args.output or "illusion.png")
    save_png(result.images[0], out, result.manifests[0])
    print(f"{out}  (reads as {args.prompts[0]!r}; under {args.view}: {args.prompts[1]!r})")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("collage", help="a scene from a layout of RGBA layers (docs/composition.md)")
    c.add_argument("layout", help="layout JSON: width, height, prompt, layers [{prompt, box | image, strength, seed}]")
    c.add_argument("--layers-dir", help="also write every layer as an RGBA PNG, the restacked collage and the layout")
    _common(c)
    c.set_defaults(func=cmd_collage)

    o = sub.add_parser("outpaint", help="extend an image beyond its borders")
    o.add_argument("image")
    o.add_argument("-p", "--prompt", default="", help="what the extended image shows")
    for side in ("left", "right", "top", "bottom"):
        o.add_argument(f"--{side}", type=int, help=f"pixels to add on the {side}")
    seam = o.add_argument_group("the seam (docs/composition.md; the defaults measured best)")
    seam.add_argument("--fill", choices=("edge", "transparent"), help="what the new area starts from (default edge: "
                      "the border pixels carried outward)")
    seam.add_argument("--ramp", type=int, help="pixels over which the new area's strength rises from --min-strength "
                      "to 1 (default 32; 0: replacement inpainting, the new area free at once)")
    seam.add_argument("--min-strength", type=float, help="strength of the new pixels next to the seam (default 0.4)")
    seam.add_argument("--blend", type=int, help="feathered band in pixels on the known side (default 4); beyond it "
                      "the known pixels are kept exactly")
    seam.add_argument("--resample", type=int, help="RePaint: times each step is noised back and re-taken (default 0)")
    seam.add_argument("--harmonize", type=float, help="strength of a second pass over the 8 pixels next to the seam "
                      "(default 0: none)")
    _common(o)
    o.set_defaults(func=cmd_outpaint)

    i = sub.add_parser("illusion", help="one image, two readings under a view (visual anagrams)")
    i.add_argument("prompts", nargs=2, metavar="PROMPT", help="as it is, and under the view")
    i.add_argument("--view", default="rotate180", choices=("rotate180", "flip", "mirror", "rotate90"))
    _common(i)
    i.set_defaults(func=cmd_illusion)
