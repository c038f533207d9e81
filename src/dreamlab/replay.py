"""``dreamlab replay``: regenerate an image from the manifest in its PNG and compare the pixels.

The manifest records the request (seed fixed, batch of one), the model folder and the sha256 of every
model file. Replay loads the model (``--model`` or the recorded folder), names every model file that was
changed, removed or added since, checks the img2img / inpainting input files against the sha256 of their
bytes the manifest records, generates, writes the PNG and says whether it is identical to the original.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DreamlabError, IntegrityError


@dataclass
class ModelDiff:
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # recorded, not in the model now
    added: list[str] = field(default_factory=list)  # in the model now, not recorded

    def __bool__(self) -> bool:
        return bool(self.changed or self.missing or self.added)

    def lines(self) -> list[str]:
        return (
            [f"changed: {p}" for p in self.changed]
            + [f"missing: {p} (recorded in the manifest, not in the model now)" for p in self.missing]
            + [f"added:   {p} (in the model now, not recorded in the manifest)" for p in self.added]
        )


def diff_model_files(recorded: dict[str, str], current: dict[str, str]) -> ModelDiff:
    return ModelDiff(
        changed=sorted(p for p in recorded.keys() & current.keys() if recorded[p] != current[p]),
        missing=sorted(recorded.keys() - current.keys()),
        added=sorted(current.keys() - recorded.keys()),
    )


def resolve_input(recorded: str, path: str | None, what: str, flag: str) -> str:
    """The request value for an input recorded as ``sha256:<hex>`` (the hash of the image file's bytes,
    as ``sha256sum`` prints it), from the file the user passes: base64 of its bytes, once they match."""
    if not recorded.startswith("sha256:"):
        return recorded  # recorded inline (not by hash): use it as it is
    if path is None:
        raise DreamlabError(f"this image was made from an {what} ({recorded}); pass it with {flag} FILE")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DreamlabError(f"cannot read {path}: {e.strerror or e}") from None
    if "sha256:" + hashlib.sha256(data).hexdigest() != recorded:
        raise IntegrityError(f"{path} is not the {what} this image was made from (its sha256 does not match {recorded})")
    return base64.b64encode(data).decode("ascii")


def _nested(fields: dict[str, Any], files: list[str]) -> None:
    """Fill the images nested in the request (controls, region masks, the ILVR reference, collage
    layers), recorded as sha256, from ``files``, matched by the hash of their bytes."""
    from .request import INPUT_IMAGES, image_fields

    by_hash: dict[str, str] = {}
    for path in files:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise DreamlabError(f"cannot read {path}: {e.strerror or e}") from None
        by_hash["sha256:" + hashlib.sha256(data).hexdigest()] = base64.b64encode(data).decode("ascii")
    wanted = set()
    for holder, key, what in image_fields(fields):
        if holder is fields and key in INPUT_IMAGES or not holder[key].startswith("sha256:"):
            continue
        wanted.add(holder[key])
        if holder[key] not in by_hash:
            raise DreamlabError(f"this image was made with a {what} ({holder[key]}); pass it with --image-file FILE")
        holder[key] = by_hash[holder[key]]
    if set(by_hash) - wanted:
        raise DreamlabError("an --image-file is not one this image was made with (its sha256 matches no recorded input)")


def compare_pixels(a, b) -> tuple[int, int, int]:
    """(pixels that differ, all pixels, largest channel difference) of two images of one size and mode."""
    import numpy as np

    x, y = np.asarray(a), np.asarray(b)
    if x.shape != y.shape:
        return -1, int(np.prod(x.shape[:2])), -1
    diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
    per_pixel = diff.reshape(diff.shape[0], diff.shape[1], -1).max(axis=-1)
    return int((per_pixel > 0).sum()), int(per_pixel.size), int(diff.max(initial=0))


@dataclass
class ReplayReport:
    output: Path
    differing: int  # pixels that differ from the original; -1 when the sizes differ
    pixels: int
    max_diff: int
    model_diff: ModelDiff
    environment: list[str]  # version or platform differences

    @property
    def identical(self) -> bool:
        return self.differing == 0


def replay(
    image: str | Path,
    output: str | Path,
    *,
    model_dir: str | Path | None = None,
    inputs: dict[str, str | None] | None = None,
    device: str = "cpu",
    allow_pickle: bool = False,
    prediction: str | None = None,
    log=print,
    control_images: list[str] | None = None,
    **input_files: str | None,
) -> ReplayReport:
    """``inputs`` (or keywords): the files of the request's input images by field or option name
    (``init_image`` or ``mask`` ...; see ``request.INPUTS``), checked against the recorded sha256."""
    import torch
    from PIL import Image

    from . import __version__
    from .generate import generate, make_request
    from .loading.model import load_model
    from .metadata import read_record, save_png
    from .inputs import INPUTS

    files = {**(inputs or {}), **input_files}
    manifest = read_record(image)
    if manifest.artifact is not None:
        raise DreamlabError(f"{image} is an edit's {manifest.artifact} sheet, not an image to replay; replay the edited image")
    fields: dict[str, Any] = json.loads(json.dumps(manifest.request))  # nested images are filled in below
    for inp in INPUTS:
        path = files.get(inp.field, files.get(inp.dest))
        if fields.get(inp.field):
            fields[inp.field] = resolve_input(fields[inp.field], path, inp.what, inp.flag)
        elif path:
            raise DreamlabError(f"this image was not {inp.made}; drop {inp.flag}")
    _nested(fields, control_images or [])
    request = make_request(**fields)

    source = model_dir or manifest.model.source
    if not source:
        raise DreamlabError("the manifest names no model folder; pass --model DIR")
    if prediction is None and Path(source).is_file():  # a checkpoint file: the prediction type it was sampled with
        prediction = manifest.model.prediction
    model = load_model(source, device=device, allow_pickle=allow_pickle, prediction=prediction)
    for adapter in manifest.adapters or []:  # ControlNets given by folder: the same folders again
        if adapter.kind == "controlnet" and adapter.source and Path(adapter.source).is_dir():
            model.use_controlnet(adapter.source)
    from .adapters.provider import register_from_manifest

    model.adapters.allow_pickle = allow_pickle
    for line in register_from_manifest(model, manifest.adapters):  # LoRAs and embeddings: the same files again
        log(line)
    model_diff = diff_model_files(manifest.model.files, model.files)
    if model_diff:
        log(f"the model in {model.source} differs from the one that made this image:")
        for line in model_diff.lines():
            log("  " + line)
    environment = [
        f"{what}: recorded {getattr(manifest, key)}, now {now}"
        for what, key, now in (
            ("dreamlab", "dreamlab_version", __version__),
            ("torch", "torch_version", torch.__version__),
            ("platform", "platform", __import__("platform").machine()),
        )
        if getattr(manifest, key) != now
    ]
    for line in environment:
        log(f"environment differs: {line} (bit-identical replay needs the same versions and machine)")

    result = generate(model, request)
    out = save_png(result.images[0], output, result.manifests[0])
    with Image.open(image) as original:
        original.load()
        differing, pixels, max_diff = compare_pixels(original, result.images[0])
    return ReplayReport(out, differing, pixels, max_diff, model_diff, environment)


def add_cli(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("replay", help="regenerate an image from its manifest and compare the pixels")
    r.add_argument("image", help="a PNG made by dreamlab (it carries the manifest)")
    r.add_argument("-o", "--output", default="replay.png", help="where to write the regenerated PNG")
    r.add_argument("--model", help="model folder or checkpoint file (default: the one recorded in the manifest)")
    r.add_argument("--prediction", choices=("epsilon", "v"),
                   help="a checkpoint file's prediction type (default: the one recorded in the manifest)")
    from .inputs import INPUTS

    for inp in INPUTS:  # the input images a manifest can record, each by the sha256 of its file
        r.add_argument(inp.flag, dest=inp.dest, help=f"the {inp.what} the image was made from")
    r.add_argument("--image-file", "--control-image", dest="control_image", action="append", default=[],
                   help="an image nested in the request (a control image, region mask, ILVR reference, collage layer); repeatable")
    r.add_argument("--device", default="cpu")
    r.add_argument("--allow-pickle", action="store_true", help="allow pickled weights (unsafe for untrusted files)")
    r.set_defaults(func=cmd_replay)


def cmd_replay(args: argparse.Namespace) -> int:
    """Exit status 0: identical; 1: the pixels differ; 2: an error (as every dreamlab command)."""
    from .inputs import INPUTS

    report = replay(args.image, args.output, model_dir=args.model, inputs={i.field: getattr(args, i.dest) for i in INPUTS},
                    control_images=args.control_image,
                    device=args.device, allow_pickle=args.allow_pickle, prediction=args.prediction)
    print(f"wrote {report.output}")
    if report.identical:
        print(f"identical: all {report.pixels} pixels match {args.image}")
        return 0
    if report.differing < 0:
        print(f"different: the replayed image's size differs from {args.image}'s")
    else:
        print(f"different: {report.differing} of {report.pixels} pixels differ from {args.image} "
              f"(largest channel difference {report.max_diff}/255)")
    if report.model_diff:
        print("likely cause: the model files changed (" + "; ".join(report.model_diff.lines()) + ")", file=sys.stderr)
    return 1
