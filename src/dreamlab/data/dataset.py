"""Load a built emoji dataset (see ``dreamlab.data.emoji``; its format is ``dreamlab.data.catalog``) for training
and evaluation.

``images.npy`` is memory-mapped, so a dataset costs no RAM up front and DataLoader workers share the page
cache instead of each holding a copy. Images are returned as straight-alpha RGBA in [-1, 1] with no
augmentation: emoji are canonical drawings, and a flip would turn "left arrow" into a right arrow.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from dreamlab.data.catalog import (
    BUILDER_VERSION,
    IMAGES_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    STYLES,
    Style,
    sha256_file,
)
from dreamlab.errors import DreamlabError, IntegrityError, InvalidRequestError

SplitFilter = Literal["train", "test", "all"]


class DatasetNotFoundError(DreamlabError, FileNotFoundError):
    """No complete emoji dataset in the given directory."""


def check_dataset(root: Path, *, verify: bool = False) -> dict[str, Any]:
    """The manifest of the dataset at ``root``, after checking that the build is complete and current.

    Always checks that the manifest (written last by the builder) and both data files exist, that the
    builder version matches this code's, and that the row counts agree; ``verify=True`` also hashes
    ``images.npy`` and ``metadata.jsonl`` against the manifest (about a second for the full set).
    """
    root = Path(root).expanduser()
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise DatasetNotFoundError(f"no emoji dataset at {root}; run `dreamlab data emoji`")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for name in (IMAGES_FILE, METADATA_FILE):
        if not (root / name).is_file():
            raise DatasetNotFoundError(
                f"emoji dataset at {root} is incomplete ({name} is missing); run `dreamlab data emoji`"
            )
    if manifest.get("builder_version") != BUILDER_VERSION:
        raise DatasetNotFoundError(
            f"emoji dataset at {root} was built by builder version {manifest.get('builder_version')}, "
            f"this code reads version {BUILDER_VERSION}; run `dreamlab data emoji` to rebuild it"
        )
    if verify:
        for name, entry in ((IMAGES_FILE, manifest["images"]), (METADATA_FILE, manifest["metadata"])):
            actual = sha256_file(root / name)
            if actual != entry["sha256"]:
                raise IntegrityError(
                    f"{root / name}: sha256 {actual} does not match the manifest's {entry['sha256']}; "
                    "rebuild with `dreamlab data emoji`"
                )
    return manifest


def load_metadata(root: Path) -> list[dict[str, Any]]:
    """The metadata.jsonl records of the dataset at ``root``, in images.npy order."""
    root = Path(root).expanduser()
    check_dataset(root)
    return _read_records(root)


def _read_records(root: Path) -> list[dict[str, Any]]:
    with open(root / METADATA_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def to_tensor(rgba: np.ndarray) -> torch.Tensor:
    """(H, W, 4) uint8 RGBA -> (4, H, W) float32 in [-1, 1], alpha kept straight."""
    return torch.from_numpy(np.array(rgba, dtype=np.float32)).permute(2, 0, 1).div_(127.5).sub_(1.0)


def to_rgba_uint8(x: torch.Tensor) -> np.ndarray:
    """The inverse of ``to_tensor``, for model output: (..., 4, H, W) in [-1, 1] -> (..., H, W, 4) uint8, clamped."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).numpy()


def to_rgb_on_white(rgba: np.ndarray) -> np.ndarray:
    """Composite straight-alpha RGBA uint8 (..., H, W, 4) over white, for display: (..., H, W, 3) uint8."""
    if rgba.dtype != np.uint8 or rgba.shape[-1] != 4:
        raise InvalidRequestError(f"expected uint8 RGBA with 4 channels last, got {rgba.dtype} {tuple(rgba.shape)}")
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:].astype(np.float32) / 255.0
    return np.rint(rgb * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)


class EmojiDataset(Dataset[tuple[torch.Tensor, dict[str, Any]]]):
    """The images of one split (``"all"`` for both) and some styles of the dataset at ``root``.

    ``dataset[i]`` is ``(image, meta)``: a (4, 64, 64) float32 RGBA tensor in [-1, 1] and the image's
    metadata record (pass it to ``dreamlab.data.captions.caption``). Raises ``DatasetNotFoundError`` if
    nothing has been built at ``root``.
    """

    def __init__(
        self,
        root: Path,
        *,
        split: SplitFilter = "train",
        styles: Iterable[Style] | None = None,
        verify: bool = False,
    ) -> None:
        if split not in ("train", "test", "all"):
            raise InvalidRequestError(f"unknown split {split!r}; choose train, test or all")
        self.root = Path(root).expanduser()
        self.manifest = check_dataset(self.root, verify=verify)
        wanted = tuple(styles) if styles is not None else STYLES
        if unknown := [s for s in wanted if s not in STYLES]:
            raise InvalidRequestError(f"unknown emoji style {unknown[0]!r}; choose from {', '.join(STYLES)}")
        self.images: np.ndarray = np.load(self.root / IMAGES_FILE, mmap_mode="r")
        records = _read_records(self.root)
        if len(records) != len(self.images):
            raise DatasetNotFoundError(
                f"emoji dataset at {self.root} is inconsistent ({len(records)} metadata rows, "
                f"{len(self.images)} images); run `dreamlab data emoji`"
            )
        self.records = [r for r in records if r["style"] in wanted and split in ("all", r["split"])]

    def __len__(self) -> int:
        return len(self.records)

    def rgba(self, i: int) -> np.ndarray:
        """Image ``i`` of this subset as stored: (64, 64, 4) uint8 straight-alpha RGBA."""
        return np.array(self.images[self.records[i]["index"]])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        record = self.records[i]
        return to_tensor(self.images[record["index"]]), dict(record)
