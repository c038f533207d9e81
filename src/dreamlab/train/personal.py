"""What the personalization trainers share: a user's few images as latents with their captions, the
prompt templates, the loop's bookkeeping (progress bar, log, loss plot) and the sample grid after training.

Captions: ``IMAGE.txt`` beside an image (kohya's convention), else ``captions.json`` ({file name: caption})
in the folder, else the file name with dashes and underscores as spaces.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..errors import DreamlabError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGES = 200

# Gal et al.'s templates, in this model's vocabulary (emoji captions: "grinning cat", "red apple")
OBJECT_TEMPLATES = ("{}", "a {}", "{} emoji", "an emoji of a {}", "a {}, google style", "a {}, twitter style")
STYLE_TEMPLATES = ("{caption}, {} style", "{caption} in {} style", "a {caption} in the style of {}", "{} {caption}")


@dataclass
class Shots:
    """The user's images: pixels in [-1, 1], their latents, captions and file hashes."""

    pixels: Tensor  # (N, C, H, W)
    latents: Tensor  # (N, c, h, w)
    captions: list[str]
    files: dict[str, str]  # name -> sha256


def _caption(path: Path, table: dict[str, str]) -> str:
    side = path.with_suffix(".txt")
    if side.is_file():
        return side.read_text().strip()
    return table.get(path.name) or path.stem.replace("-", " ").replace("_", " ")


def load_shots(folder: str | Path, model, *, flip_ok: bool = False) -> Shots:
    """The images of ``folder`` at the model's size and channels (RGBA kept for an RGBA model; composited
    on white for an RGB one), encoded once. One line if the folder holds none that can be read."""
    from ..loading.files import sha256_file

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DreamlabError(f"--images {root} is not a folder")
    table = json.loads((root / "captions.json").read_text()) if (root / "captions.json").is_file() else {}
    size, channels = model.sample_size, model.space.image_channels
    tensors, captions, files, bad = [], [], {}, []
    for p in sorted(root.iterdir()):
        if p.suffix.lower() not in IMAGE_SUFFIXES or p.name.startswith("."):
            continue
        try:
            with Image.open(p) as im:
                im.load()
                im = im.convert("RGBA")
        except (OSError, UnidentifiedImageError, ValueError):
            bad.append(p.name)
            continue
        if channels == 3:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im).convert("RGB")
        im = im.resize((size, size), Image.LANCZOS)
        t = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1
        tensors.append(t)
        captions.append(_caption(p, table))
        files[p.name] = sha256_file(p)
        if len(tensors) > MAX_IMAGES:
            raise DreamlabError(f"--images {root} has more than {MAX_IMAGES} images; personalization takes a few")
    if not tensors:
        extra = f" ({len(bad)} could not be read: {', '.join(bad[:3])})" if bad else ""
        raise DreamlabError(f"--images {root} holds no readable images{extra}")
    pixels = torch.stack(tensors)
    latents = torch.cat([model.space.encode(pixels[i : i + 16].to(model.device)) for i in range(0, len(pixels), 16)])
    return Shots(pixels, latents.float(), captions, files)


class Loop:
    """Steps of a short run: a tqdm bar, a JSONL log, the loss plot, and the compute spent."""

    def __init__(self, out: Path, total: int, desc: str, log_every: int = 10):
        from tqdm import tqdm

        from .common import Log

        self.out, self.total, self.log_every = out, total, log_every
        self.log = Log(out)
        self.log.rewind(0)
        self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True)
        self.start = time.time()

    def step(self, step: int, **metrics: float) -> None:
        self.bar.update(1)
        if step % self.log_every == 0 or step == self.total:
            self.log.write(step, **metrics, seconds=time.time() - self.start)
            self.bar.set_postfix({k: f"{v:.4f}" for k, v in metrics.items()})

    def close(self, keys: tuple[str, ...] = ("loss",)) -> float:
        self.bar.close()
        self.log.plot(keys)
        return time.time() - self.start


def batch_noise(shots: Shots, batch: int, timesteps: int, gen: torch.Generator, flip: bool):
    """Indices, x0 (flipped at random if asked), timesteps and noise of one batch."""
    idx = torch.randint(len(shots.captions), (batch,), generator=gen)
    x0 = shots.latents[idx]
    if flip:
        flips = torch.rand(batch, generator=gen) < 0.5
        x0 = torch.where(flips[:, None, None, None], x0.flip(-1), x0)
    t = torch.randint(timesteps, (batch,), generator=gen)
    return idx, x0, t, torch.randn(x0.shape, generator=gen)


def template_prompts(templates: Sequence[str], token: str, captions: Sequence[str], idx: Tensor, rng: random.Random) -> list[str]:
    return [rng.choice(templates).replace("{caption}", captions[int(i)]).replace("{}", token) for i in idx]


def sample_grid(model, prompts: Sequence[str], out: Path, *, seeds: Sequence[int] = (0, 1, 2, 3), patches=(),
                steps: int = 20, name: str = "samples.png", **request: Any) -> Path:
    """One row per prompt, one column per seed, generated through ``generate`` (patches applied)."""
    from ..generate import generate
    from ..images import labelled_grid
    from ..request import make_request

    images, labels = [], []
    for prompt in prompts:
        res = generate(model, make_request(prompt=prompt, seed=int(seeds[0]), batch=len(seeds), steps=steps, **request),
                       patches=patches)
        images += res.images
        labels += [prompt] * len(res.images)
    labelled_grid(images, labels, cols=len(seeds)).save(out / name)
    return out / name


def base_model(base: str | None, device: str = "auto"):
    from ..loading.model import default_model_dir, load_model

    root = Path(base).expanduser() if base else default_model_dir()
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    return load_model(root, device=dev)
