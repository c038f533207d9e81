"""The gallery: every output PNG (with its A1111 ``parameters`` chunk and dreamlab manifest) in one
folder, indexed in the job store. File names are made here from server ids, never from a request;
files are found by looking an id up in the database, never by joining a request string into a path."""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path

from PIL import Image

from ..manifest import Manifest
from ..metadata import png_bytes, write_atomic
from .queue import GalleryIndex, ImageRecord

INPUT_EXTENSIONS = {"PNG": ".png", "JPEG": ".jpg", "WEBP": ".webp", "GIF": ".gif", "BMP": ".bmp"}


class Gallery:
    def __init__(self, root: str | Path, store: GalleryIndex):
        self.root = Path(root)
        self.images_dir = self.root / "images"
        self.inputs_dir = self.root / "inputs"
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.inputs_dir.mkdir(parents=True, exist_ok=True)
        self.store = store

    def save(self, job_id: str, images: list[Image.Image], manifests: list[Manifest]) -> list[ImageRecord]:
        """Write the PNGs of a finished job (atomically, each) and return their records."""
        return self.save_files(job_id, [png_bytes(im, m) for im, m in zip(images, manifests, strict=True)], manifests)

    def save_files(self, job_id: str, pngs: list[bytes], manifests: list[Manifest]) -> list[ImageRecord]:
        """The same for PNG files already encoded (``metadata.png_bytes``), e.g. by a worker on another machine."""
        records = []
        now = time.time()
        for i, (png, manifest) in enumerate(zip(pngs, manifests, strict=True)):
            filename = f"{job_id}-{i}.png"  # job ids are server-made uuid hex
            write_atomic(self.images_dir / filename, png)
            records.append(
                ImageRecord(
                    id=f"{job_id}-{i}",
                    job_id=job_id,
                    idx=i,
                    filename=filename,
                    prompt=manifest.prompt,
                    negative_prompt=manifest.negative_prompt,
                    seed=manifest.seed,
                    width=manifest.width,
                    height=manifest.height,
                    created=now,
                    manifest=manifest.dump(),
                )
            )
        return records

    def image_path(self, record: ImageRecord) -> Path | None:
        return self._inside(self.images_dir, record.filename)

    def delete(self, image_id: str) -> bool:
        record = self.store.delete_image(image_id)
        if record is None:
            return False
        path = self.image_path(record)
        if path is not None:
            path.unlink(missing_ok=True)
        return True

    def record_input(self, data: bytes, image_format: str | None) -> str:
        """Keep an uploaded input image (its bytes as sent) under the sha256 of those bytes, which its
        manifests record (``"sha256:<hex>"``, = ``sha256sum`` of the file), so a user can fetch it to replay."""
        digest = hashlib.sha256(data).hexdigest()
        if self.store.input_filename(digest) is None:
            filename = digest + INPUT_EXTENSIONS.get(image_format or "", ".bin")
            path = self.inputs_dir / filename
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=self.inputs_dir)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.store.add_input(digest, filename)
        return digest

    def input_path(self, digest: str) -> Path | None:
        filename = self.store.input_filename(digest)
        return self._inside(self.inputs_dir, filename) if filename else None

    @staticmethod
    def _inside(folder: Path, filename: str) -> Path | None:
        """Defence in depth: a stored name must still resolve to a file directly inside ``folder``."""
        path = (folder / filename).resolve()
        if path.parent != folder.resolve() or not path.is_file():
            return None
        return path
