"""`dreamlab ship`: put a trained model and judge into the package as its defaults.

The model folder (a snapshot or export of `dreamlab train unet`) and the judge (`dreamlab train judge`)
are copied into ``src/dreamlab/weights/{default,judge}`` with every floating-point tensor stored in
fp16 (the loaders compute in float32), and ``weights/SHA256SUMS`` lists every shipped file so a user
can check what they run against the model card.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import DreamlabError, ModelNotFoundError
from ..loading.files import sha256_file

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def _fp16_copy(src: Path, dest: Path) -> None:
    """Copy a folder; safetensors files get their float tensors stored in fp16."""
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(".*", "*.bin", "*.pt", "*.ckpt"))
    for f in tmp.rglob("*.safetensors"):
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(f))
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}, str(f))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def _drop_training_logs(folder: Path) -> None:
    """Training logs and sample grids stay in the run folder, not in the package."""
    for extra in ("log.jsonl", "loss.png", "samples.png"):
        (folder / extra).unlink(missing_ok=True)


def ship(model: str | Path, judge: str | Path, dest: str | Path = WEIGHTS_DIR) -> Path:
    model, judge, dest = Path(model).expanduser(), Path(judge).expanduser(), Path(dest).expanduser()
    from ..loading.model import read_spec

    is_cascade = read_spec(model).cascade is not None  # (no dreamlab.json: the defaults, not a cascade)
    if not ((model / "unet").is_dir() or is_cascade) or not (model / "dreamlab.json").exists():
        raise ModelNotFoundError(f"{model} is not a dreamlab model folder (unet/, vae/, scheduler/, dreamlab.json) or cascade")
    if not (judge / "judge.safetensors").exists():
        raise ModelNotFoundError(f"no judge at {judge}; train one with `dreamlab train judge`")
    dest.mkdir(parents=True, exist_ok=True)
    _fp16_copy(model, dest / "default")
    (dest / "judge").mkdir(exist_ok=True)
    judge_tmp = dest / ".tmp-judge"
    _fp16_copy(judge, judge_tmp)
    shutil.rmtree(dest / "judge")
    judge_tmp.rename(dest / "judge")
    _drop_training_logs(dest / "judge")
    write_sums(dest)
    return dest


def ship_named(model: str | Path, name: str, dest: str | Path = WEIGHTS_DIR, card: str | Path | None = None) -> Path:
    """Install ``model`` (a student, an instruction model) as the package's named model ``name``
    (``weights/NAME``, what ``--model NAME`` loads), fp16, with ``card`` as its MODEL_CARD.md; the
    checksums of the whole weights folder are written again."""
    from ..loading.model import NAMED_MODELS, load_model

    model, dest = Path(model).expanduser(), Path(dest).expanduser()
    if name == "default" or name not in NAMED_MODELS:
        raise DreamlabError(f"--as {name!r}: ship installs the named models {', '.join(n for n in NAMED_MODELS if n != 'default')} "
                            "(the default model comes with --judge)")
    if not (model / "unet").is_dir() or not (model / "dreamlab.json").exists():
        raise ModelNotFoundError(f"{model} is not a dreamlab model folder (unet/, vae/, scheduler/, dreamlab.json)")
    if card is not None and not Path(card).expanduser().is_file():
        raise ModelNotFoundError(f"--card {card}: no such file")
    load_model(model)  # a folder that does not load is refused before anything is replaced
    dest.mkdir(parents=True, exist_ok=True)
    _fp16_copy(model, dest / name)
    _drop_training_logs(dest / name)
    if card is not None:
        shutil.copyfile(Path(card).expanduser(), dest / name / "MODEL_CARD.md")
    write_sums(dest)
    return dest / name


def write_sums(dest: Path) -> None:
    """``dest/SHA256SUMS``: every shipped file with its sha256, so a user can check what they run."""
    files = sorted(p for p in dest.rglob("*") if p.is_file() and p.name != "SHA256SUMS" and not p.name.startswith("."))
    sums = "".join(f"{sha256_file(p)}  {p.relative_to(dest).as_posix()}\n" for p in files)
    (dest / "SHA256SUMS").write_text(sums)
    total = sum(p.stat().st_size for p in files)
    print(f"shipped: {len(files)} files, {total / 2**20:.1f} MiB, in {dest}")


def assemble_cascade(base: str | Path, sr: str | Path, dest: str | Path, *, name: str | None = None) -> Path:
    """A cascade folder: copies of a base model and a super-resolution stage, and a dreamlab.json naming them.
    Checked by loading it, so a mismatched pair is refused here rather than at generation time."""
    from ..loading.model import load_model

    base, sr, dest = Path(base).expanduser(), Path(sr).expanduser(), Path(dest).expanduser()
    for what, folder in (("base", base), ("sr", sr)):
        if not (folder / "unet").is_dir():
            raise ModelNotFoundError(f"{what} {folder} is not a model folder (expected unet/ in it)")
    if dest.exists() and any(dest.iterdir()):
        raise DreamlabError(f"{dest} exists and is not empty; choose a new folder for the cascade")
    tmp = dest.with_name(f".tmp-{dest.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for src, sub in ((base, "base"), (sr, "sr")):
        shutil.copytree(src, tmp / sub, ignore=shutil.ignore_patterns(".*", "*.bin", "*.pt", "*.ckpt", "MODEL_CARD.md"))
    spec = {"name": name or dest.name, "cascade": {"base": "base", "sr": "sr"}}
    (tmp / "dreamlab.json").write_text(json.dumps(spec, indent=2) + "\n")
    try:
        load_model(tmp)
    except DreamlabError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    return dest


def add_cli(sub) -> None:
    p = sub.add_parser("ship", help="install a trained model and judge as the package's defaults, or a named model "
                                    "(--as fast), in fp16 with SHA256SUMS")
    p.add_argument("--model", required=True, help="model folder, e.g. RUN/snapshots/step-0006000")
    p.add_argument("--judge", help="judge folder from `dreamlab train judge` (with the default model)")
    p.add_argument("--as", dest="as_name", metavar="NAME", help="install the model as the named model NAME (instruct, fast) instead")
    p.add_argument("--card", help="with --as: the model card to ship as its MODEL_CARD.md")
    p.add_argument("--dest", default=str(WEIGHTS_DIR), help="default: the package's weights folder")

    def run(args) -> int:
        if args.as_name:
            if args.judge:
                raise DreamlabError("--judge ships with the default model; leave it out with --as")
            ship_named(args.model, args.as_name, args.dest, args.card)
        elif not args.judge:
            raise DreamlabError("--judge is needed to ship the default model (or name another model with --as)")
        else:
            ship(args.model, args.judge, args.dest)
        return 0

    p.set_defaults(func=run)
