"""``dreamlab convert``: a single-file checkpoint -> a diffusers folder that ``--model`` (and diffusers) load.

The folder is what diffusers' ``save_pretrained`` writes for the checkpoint's pipeline (weights in the
file's own precision, as safetensors) plus a ``dreamlab.json`` that records where it came from. It is
written beside the destination and renamed into place, so an interrupted conversion leaves no half folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from typing import TYPE_CHECKING

from .. import __version__
from ..errors import DreamlabError

if TYPE_CHECKING:  # the heavy modules load when a conversion runs, not for `dreamlab --help`
    from ..core.prediction import Prediction
    from .single_file import Components


def convert(source: str | Path, output: str | Path, *, allow_pickle: bool = False,
            prediction: str | Prediction | None = None, config: str | Path | None = None) -> Components:
    source, out = Path(source).expanduser(), Path(output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DreamlabError(f"{out} exists and is not an empty folder; choose another output")
    from .single_file import load_components

    c = load_components(source, allow_pickle=allow_pickle, prediction=prediction, config=config)
    tmp = out.with_name(f".{out.name}.converting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _pipeline(c).save_pretrained(tmp, safe_serialization=True)
        spec = {"name": source.stem, "text_encoder": {"source": "clip"},
                "converted_from": {"file": source.name, "sha256": c.files[source.name], "architecture": c.arch.name,
                                   "prediction": c.prediction.value, "prediction_from": c.prediction_from,
                                   "dreamlab_version": __version__}}
        (tmp / "dreamlab.json").write_text(json.dumps(spec, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return c


def _pipeline(c: Components):
    import diffusers
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()  # importing the pipelines imports image processors that warn about torchvision
    try:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    finally:
        logging.set_verbosity(level)
    scheduler = getattr(diffusers, c.scheduler["_class_name"]).from_config(c.scheduler)
    (tok, text), *second = c.encoders
    parts = dict(vae=c.vae, unet=c.unet, scheduler=scheduler, text_encoder=text, tokenizer=tok)
    if second:
        (tok2, text2), = second
        return StableDiffusionXLPipeline(**parts, text_encoder_2=text2, tokenizer_2=tok2, add_watermarker=False)
    return StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def add_cli(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("convert", help="convert a single-file SD 1.x / 2.x / SDXL checkpoint to a diffusers folder")
    c.add_argument("checkpoint", help=".safetensors (or .ckpt with --allow-pickle)")
    c.add_argument("-o", "--output", required=True, help="the new folder (absent or empty)")
    c.add_argument("--prediction", choices=("epsilon", "v"), help="the model's prediction type, if the file does not "
                   "say it right (SD 2.x files are taken as v unless a sidecar .yaml or their metadata says otherwise)")
    c.add_argument("--config", help="a diffusers folder whose configs to use instead of the bundled ones (variant architectures)")
    c.add_argument("--allow-pickle", action="store_true", help="allow pickled checkpoints (unsafe for untrusted files)")
    c.set_defaults(func=cmd_convert)


def cmd_convert(args: argparse.Namespace) -> int:
    c = convert(args.checkpoint, args.output, allow_pickle=args.allow_pickle, prediction=args.prediction, config=args.config)
    print(f"{c.arch.title}, {c.prediction.value} ({c.prediction_from}) -> {args.output}")
    return 0
