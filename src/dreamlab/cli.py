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


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate, make_request
    from .loading.model import load_model
    from .metadata import save_png

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
    }
    request = make_request(**{k: v for k, v in fields.items() if v is not None})
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, allow_pickle=args.allow_pickle)

    progress = None
    if not args.quiet:
        from tqdm import tqdm

        bars: list[tqdm] = []

        def progress(info) -> None:
            if not bars:
                bars.append(tqdm(total=info.total, desc="sampling", unit="step", leave=False))
            bars[0].update(1)

    result = generate(model, request, on_step=progress)
    for image, manifest, path in zip(result.images, result.manifests, _output_paths(Path(args.output), request.batch)):
        save_png(image, path, manifest)
        print(f"{path}  seed {manifest['seed']}")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from .core.samplers import SAMPLERS, STOCHASTIC

    for name in sorted(SAMPLERS):
        doc = (SAMPLERS[name].__doc__ or "").strip().splitlines()[0]
        print(f"{name:16s} {'stochastic ' if name in STOCHASTIC else 'deterministic'}  {doc}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dreamlab", description="Diffusion image generation, editing and training.")
    p.add_argument("--version", action="version", version=f"dreamlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="text to image")
    g.add_argument("prompt")
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
    g.add_argument("--model", help="model folder (diffusers format); default: the installed default model")
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, help="CPU threads for torch")
    g.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    g.add_argument("-q", "--quiet", action="store_true")
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("samplers", help="list the samplers")
    s.set_defaults(func=cmd_samplers)
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
