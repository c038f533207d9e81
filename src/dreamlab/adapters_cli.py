"""Adapters on the command line: ``--lora PATH[:SCALE]`` and ``--embedding PATH`` on every generating
command, ``dreamlab adapters`` (list, install, convert to and from kohya), ``dreamlab train embedding``
and ``dreamlab train lora``."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .errors import DreamlabError


def add_adapter_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="a LoRA folder, kohya .safetensors file or installed name, at a scale (default 1; repeatable); "
                        "also <lora:NAME:SCALE> in the prompt")
    p.add_argument("--embedding", action="append", metavar="PATH",
                   help="a textual-inversion embedding (folder or file; repeatable); write its token in the prompt")


def _split(spec: str) -> tuple[str, float]:
    head, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def lora_fields(args: argparse.Namespace) -> list[dict]:
    """The request's ``loras`` from --lora (paths named as they will be registered)."""
    from .adapters.library import adapter_name

    out = []
    for spec in getattr(args, "lora", None) or []:
        target, scale = _split(spec)
        path = Path(target).expanduser()
        if not path.exists() and ("/" in target or target.endswith(".safetensors")):
            raise DreamlabError(f"--lora {spec}: no such file or folder")
        out.append({"name": adapter_name(path) if path.exists() else target, "scale": scale})
    return out


def register_adapters(args: argparse.Namespace, model) -> None:
    """Register the files --lora and --embedding give by path on the loaded model."""
    model.adapters.allow_pickle = bool(getattr(args, "allow_pickle", False))
    for spec in getattr(args, "lora", None) or []:
        path = Path(_split(spec)[0]).expanduser()
        if path.exists():
            model.adapters.register(path, "lora")
    for spec in getattr(args, "embedding", None) or []:
        path = Path(spec).expanduser()
        if not path.exists():
            raise DreamlabError(f"--embedding {spec}: no such file or folder")
        model.adapters.register(path, "embedding")


# --- dreamlab adapters -------------------------------------------------------------------------------


def cmd_adapters_list(args: argparse.Namespace) -> int:
    from .adapters.library import AdapterSet, installed, library_dir

    print(f"library: {library_dir()}")
    for name, path in installed("lora").items():
        print(f"lora       {name:32s} {path}")
    adapters = AdapterSet()
    for token, path in adapters.known("embedding").items():
        print(f"embedding  {token:32s} {path}")
    return 0


def cmd_adapters_install(args: argparse.Namespace) -> int:
    from .adapters.embedding import embedding_file
    from .adapters.library import adapter_name, library_dir

    src = Path(args.path).expanduser()
    if not src.exists():
        raise DreamlabError(f"no adapter at {src}")
    kind = args.kind or ("embedding" if src.is_dir() and (src / "learned_embeds.safetensors").exists() else "lora")
    if kind == "embedding":
        embedding_file(src)  # one line if it holds none
    else:
        from .adapters.lora import read_lora

        read_lora(src)  # one line if it is not a LoRA
    dest = library_dir() / ("loras" if kind == "lora" else "embeddings") / (args.name or (adapter_name(src) + ("" if src.is_dir() else src.suffix)))
    if dest.exists():
        raise DreamlabError(f"{dest} exists; remove it or give --name")
    dest.parent.mkdir(parents=True, exist_ok=True)
    (shutil.copytree if src.is_dir() else shutil.copy2)(src, dest)
    print(f"installed {kind} {adapter_name(dest)} -> {dest}")
    return 0


def cmd_adapters_convert(args: argparse.Namespace) -> int:
    """A LoRA from one format to the other: a folder -> kohya file, a kohya file -> folder."""
    from .adapters.lora import read_lora, resolved, save_kohya, save_lora
    from .loading.model import load_model

    lora = read_lora(args.source, allow_pickle=args.allow_pickle)
    out = Path(args.output).expanduser()
    if out.suffix == ".safetensors":
        view = load_model(args.model) if any(m.startswith("_") for mods in lora.layers.values() for m in mods) else None
        save_kohya(lora, out, view)
    else:
        save_lora(resolved(lora, load_model(args.model)), out)
    print(f"{args.source} -> {out}")
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("adapters", help="LoRAs and embeddings: list the installed ones, install, convert formats")
    asub = a.add_subparsers(dest="action", required=True)
    ls = asub.add_parser("list", help="the installed LoRAs and embeddings")
    ls.set_defaults(func=cmd_adapters_list)
    ins = asub.add_parser("install", help="copy a LoRA or embedding into the library ($DREAMLAB_ADAPTERS)")
    ins.add_argument("path")
    ins.add_argument("--kind", choices=("lora", "embedding"))
    ins.add_argument("--name", help="its name in the library (default: the folder's or file's)")
    ins.set_defaults(func=cmd_adapters_install)
    cv = asub.add_parser("convert", help="a LoRA folder to a kohya/A1111 .safetensors file, or back (-o FOLDER)")
    cv.add_argument("source")
    cv.add_argument("-o", "--output", required=True, help="a .safetensors file (kohya) or a folder (diffusers/peft)")
    cv.add_argument("--model", help="the model the LoRA is for (resolves kohya names; default: the default model)")
    cv.add_argument("--allow-pickle", action="store_true")
    cv.set_defaults(func=cmd_adapters_convert)


def add_train_cli(tsub: argparse._SubParsersAction, add_dataclass_args, train) -> None:
    from .settings import EmbeddingConfig, LoraTrainConfig

    te = tsub.add_parser("embedding", help="textual inversion: a new token learned from a few images")
    add_dataclass_args(te, EmbeddingConfig, required=("images", "token", "out"))
    te.add_argument("--threads", type=int)
    te.set_defaults(func=train("embedding", ".train.embedding", "EmbeddingConfig", "train_embedding"))
    tl = tsub.add_parser("lora", help="a LoRA of the UNet; with --class, DreamBooth with prior preservation")
    add_dataclass_args(tl, LoraTrainConfig, required=("images", "instance", "out"))
    tl.add_argument("--class", dest="class_prompt", help="DreamBooth's class prompt, e.g. 'a cat face' (= --class-prompt)")
    tl.add_argument("--threads", type=int)
    tl.set_defaults(func=train("LoRA", ".train.lora", "LoraTrainConfig", "train_lora"))


# --- dreamlab imagic ---------------------------------------------------------------------------------


def cmd_imagic(args: argparse.Namespace) -> int:
    import torch

    from .generate import generate, make_request
    from .imagic import ImagicSettings, prepare
    from .images import labelled_grid
    from .loading.model import load_model
    from .metadata import save_png

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        data = Path(args.image).expanduser().read_bytes()
    except OSError as e:
        raise DreamlabError(f"cannot read {args.image}: {e.strerror or e}") from None
    model = load_model(args.model, device=args.device)
    settings = ImagicSettings(embed_steps=args.embed_steps, tune_steps=args.tune_steps, rank=args.rank, seed=args.train_seed)
    from tqdm import tqdm

    bar = tqdm(total=settings.embed_steps + settings.tune_steps, desc="imagic: embedding, then fine-tuning", leave=False)
    folder = prepare(model, data, args.target, settings, on_progress=lambda i, n: bar.update(i - bar.n))
    bar.close()
    name = model.adapters.register(folder, "imagic")
    etas = args.eta or [0.7]
    out = Path(args.output)
    images, labels = [], []
    for eta in etas:
        req = make_request(prompt=args.target, seed=args.seed, steps=args.steps, cfg_scale=args.cfg, sampler=args.sampler,
                           imagic={"name": name, "eta": eta}, **({"negative_prompt": args.negative} if args.negative else {}))
        res = generate(model, req)
        path = out if len(etas) == 1 else out.with_name(f"{out.stem}-eta{eta:g}{out.suffix or '.png'}")
        save_png(res.images[0], path, res.manifests[0])
        print(f"{path}  eta {eta:g}  seed {res.records[0].seed}")
        images.append(res.images[0])
        labels.append(f"eta {eta:g}")
    if len(etas) > 1:
        grid = out.with_name(f"{out.stem}-grid.png")
        labelled_grid(images, labels, cols=len(etas)).save(grid)
        print(f"{grid}  (the sweep)")
    print(f"prepared edit cached in {folder}")
    return 0


def add_imagic_cli(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("imagic", help="edit a picture by text: embedding optimisation + LoRA fine-tuning (Imagic)")
    i.add_argument("image")
    i.add_argument("target", help='the edit as a prompt, e.g. "a winking face"')
    i.add_argument("--eta", type=float, action="append", help="interpolation toward the text (repeat to sweep; default 0.7)")
    i.add_argument("-o", "--output", default="imagic.png")
    i.add_argument("-n", "--negative")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--steps", type=int)
    i.add_argument("--sampler")
    i.add_argument("--cfg", type=float)
    i.add_argument("--embed-steps", type=int, default=200, help="step 1: optimiser steps on the text embedding")
    i.add_argument("--tune-steps", type=int, default=100, help="step 2: LoRA fine-tuning steps")
    i.add_argument("--rank", type=int, default=8)
    i.add_argument("--train-seed", type=int, default=0)
    i.add_argument("--model", help="model folder; default: the installed default model")
    i.add_argument("--device", default="cpu")
    i.add_argument("--threads", type=int)
    i.set_defaults(func=cmd_imagic)
