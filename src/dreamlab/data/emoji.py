"""Build the emoji training set (64x64 RGBA art with CLDR captions) from pinned npm packages.

Art comes from ``emoji-datasource-google`` (Noto Emoji, Apache-2.0) and ``emoji-datasource-twitter``
(Twemoji, CC-BY-4.0); labels and tags come from ``emojibase-data`` (MIT, CLDR annotations). The Apple and
Facebook sets of the same family are never used: their licenses do not allow it.

Tarballs are fetched with ``npm pack`` because the npm registry is where these exact bytes are published,
checked against pinned sha256s before anything inside them is read, and read in place with ``tarfile``.
The output (``images.npy``, ``metadata.jsonl``, ``manifest.json``, ``NOTICE.txt``) is written atomically,
manifest last, so a directory with a manifest is a complete build. ``dreamlab.data.dataset`` reads it;
what the files hold (names, record fields, split rule) is ``dreamlab.data.catalog``, shared by both.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, get_args

import numpy as np
from PIL import Image
from tqdm import tqdm

from dreamlab.data.catalog import (
    BUILDER_VERSION,
    DEFAULT_DATA_DIR,
    IMAGE_SIZE,
    IMAGES_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    NOTICE_FILE,
    STYLES,
    TEST_PERCENT,
    Split,
    Style,
    emoji_catalog,
    sha256_file,
)
from dreamlab.errors import DreamlabError, IntegrityError, InvalidRequestError

DEFAULT_CACHE_DIR: Final = Path("~/.cache/dreamlab/npm")
NPM_TIMEOUT_S: Final = 900

# Never built: the licenses of these art sets forbid redistribution or commercial use.
FORBIDDEN_STYLES: Final = ("apple", "facebook")

# Images whose art contradicts their label, left out (and listed in the manifest) so no caption teaches it.
EXCLUDED: Final[dict[tuple[Style, str], str]] = {
    ("google", "1F1E8-1F1F6"): "flag: Sark is drawn as the flag of Saudi Arabia (pixel-identical to 1F1F8-1F1E6)",
}


@dataclass(frozen=True)
class NpmPackage:
    """One pinned npm tarball: what to fetch, the bytes to expect, and the license of what we take from it.

    ``license`` is the license of the content used (the art or the labels), which for the art packages is
    not the MIT license their package.json declares for the packaging code.
    """

    name: str
    version: str
    sha256: str
    license: str
    content: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def tarball(self) -> str:
        """The file ``npm pack`` writes: a scope's "@" dropped and its "/" made "-" (``@a/b`` -> ``a-b-1.0.0.tgz``)."""
        return f"{self.name.removeprefix('@').replace('/', '-')}-{self.version}.tgz"


ART_PACKAGES: Final[dict[Style, NpmPackage]] = {
    "google": NpmPackage(
        "emoji-datasource-google",
        "16.0.0",
        "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
        "Apache-2.0",
        "Noto Emoji art (Google), 64x64 PNG",
    ),
    "twitter": NpmPackage(
        "emoji-datasource-twitter",
        "16.0.0",
        "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
        "CC-BY-4.0",
        "Twemoji art (Twitter, Inc and other contributors), 64x64 PNG",
    ),
}
LABELS_PACKAGE: Final = NpmPackage(
    "emojibase-data",
    "17.0.0",
    "d01d0e2ca4e22cb402679532155342c71e2e871f25c32223c013b8b166ebdf5a",
    "MIT",
    "CLDR English labels and tags (en/data.json)",
)

NOTICE_TEXT: Final = """\
This emoji dataset contains third-party artwork. Attribution, as its licenses require:

- Twemoji graphics: Copyright 2020 Twitter, Inc and other contributors, licensed under CC-BY 4.0
  (https://creativecommons.org/licenses/by/4.0/). Source: https://github.com/jdecked/twemoji via the npm
  package emoji-datasource-twitter@16.0.0. Changes: repacked into a numpy array; the colour of fully
  transparent pixels was set to zero.
- Noto Emoji graphics: Copyright Google LLC, licensed under the Apache License 2.0
  (https://www.apache.org/licenses/LICENSE-2.0). Source: https://github.com/googlefonts/noto-emoji via the
  npm package emoji-datasource-google@16.0.0. Changes as above.
- Labels and tags: emojibase-data@17.0.0, Copyright (c) 2017-2019 Miles Johnson, MIT License, derived from
  Unicode CLDR annotations.
"""

# The committed test fixture (tests/fixtures/emoji): 16 emoji x 2 styles. Picked to cover a name that
# misleads (2764 "HEAVY BLACK HEART" is red), keycaps, flags, uniform and mixed skin tones, and both splits
# (grinning face, handshake and avocado hash into the test split).
FIXTURE_EMOJI: Final[tuple[str, ...]] = (
    "2764-FE0F",  # red heart
    "1F34E",  # red apple
    "1F44B",  # waving hand
    "1F44B-1F3FE",  # waving hand: medium-dark skin tone
    "1F431",  # cat face
    "1F1EF-1F1F5",  # flag: Japan
    "0023-FE0F-20E3",  # keycap: #
    "1F525",  # fire
    "1F308",  # rainbow
    "1F9D1-200D-1F91D-200D-1F9D1",  # people holding hands
    "1F9D1-1F3FF-200D-1F91D-200D-1F9D1-1F3FB",  # people holding hands: dark, light skin tone
    "1F600",  # grinning face (test)
    "1F91D",  # handshake (test)
    "1F91D-1F3FD",  # handshake: medium skin tone (test)
    "1FAF1-1F3FB-200D-1FAF2-1F3FF",  # handshake: light, dark skin tone (test)
    "1F951",  # avocado (test)
)


class NpmError(DreamlabError):
    """npm is missing, or ``npm pack`` failed: the emoji packages cannot be fetched."""


def _npm_error_line(stderr: str) -> str:
    """The line of npm's error output that says what went wrong.

    npm ends every failure with "A complete log of this run can be found in ...", preceded by code/errno
    lines; the first line that is none of those is the reason (e.g. "404 Not Found - GET ...").
    """
    lines = [line.strip().removeprefix("npm error").removeprefix("npm ERR!").strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    reasons = [line for line in lines if not line.startswith(("code ", "errno ", "syscall ", "A complete log"))]
    return (reasons or lines or ["no error output"])[0]


def fetch_package(package: NpmPackage, cache_dir: Path) -> Path:
    """The verified tarball of ``package`` in ``cache_dir``, running ``npm pack`` only when no verified copy is cached.

    npm packs into a private temporary directory and the tarball is moved into the cache only after its hash
    matched, so the cache never holds a partial or unverified file under the final name. ``--loglevel=error``
    rather than ``--silent``: npm is just as quiet on success, but says why when it fails.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / package.tarball
    if target.is_file() and sha256_file(target) == package.sha256:
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise NpmError("npm is not installed; install Node.js/npm to fetch the emoji packages")
    command = f"npm pack {package.spec}"
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=cache_dir) as tmp:
        try:
            proc = subprocess.run(
                [npm, "pack", package.spec, "--loglevel=error"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=NPM_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise NpmError(f"`{command}` did not finish within {NPM_TIMEOUT_S} s") from None
        if proc.returncode != 0:
            raise NpmError(f"`{command}` failed (exit {proc.returncode}): {_npm_error_line(proc.stderr)}")
        packed = Path(tmp) / package.tarball
        if not packed.is_file():
            raise NpmError(f"`{command}` did not produce {package.tarball}")
        actual = sha256_file(packed)
        if actual != package.sha256:
            raise IntegrityError(
                f"checksum mismatch for {package.tarball} (from `{command}`): "
                f"expected sha256 {package.sha256}, got {actual}"
            )
        os.replace(packed, target)
    return target


def read_tar(path: Path, wanted: Callable[[str], bool]) -> dict[str, bytes]:
    """The contents of the members of the tarball at ``path`` whose names pass ``wanted``.

    One sequential pass (stream mode): seeking back and forth in a gzip stream would decompress it again
    for every out-of-order member.
    """
    with tarfile.open(path, "r|gz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile() and wanted(m.name)}  # type: ignore[union-attr]


def decode_png(data: bytes, *, size: int = IMAGE_SIZE) -> np.ndarray:
    """A (size, size, 4) uint8 straight-alpha RGBA array from PNG bytes; ``ValueError`` if it is not one.

    Fully transparent pixels get colour 0: the PNGs hold arbitrary colour there (invisible, but a model
    trained on RGBA would spend capacity reproducing it).
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.size != (size, size):
                raise ValueError(f"size {im.size[0]}x{im.size[1]}, not {size}x{size}")
            rgba = np.array(im.convert("RGBA"))
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"unreadable PNG ({e})") from None
    rgba[..., :3][rgba[..., 3] == 0] = 0
    return rgba


def _check_styles(styles: Iterable[str]) -> tuple[Style, ...]:
    chosen = tuple(dict.fromkeys(s.strip().lower() for s in styles if s.strip()))
    for s in chosen:
        if s in FORBIDDEN_STYLES:
            raise InvalidRequestError(
                f"emoji style {s!r} is not allowed: its license forbids this use; choose from {', '.join(STYLES)}"
            )
        if s not in STYLES:
            raise InvalidRequestError(f"unknown emoji style {s!r}; choose from {', '.join(STYLES)}")
    if not chosen:
        raise InvalidRequestError(f"no emoji style given; choose from {', '.join(STYLES)}")
    return chosen  # type: ignore[return-value]


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through a temporary file in the same directory and rename it into place.

    A killed build leaves at worst a hidden temporary file, never a truncated file under the real name.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: object) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))


def _duplicate_groups(images: list[np.ndarray], records: list[dict[str, Any]], style: Style) -> list[list[str]]:
    """Unified codes of the ``style`` images that are pixel-identical to another image of that style."""
    groups: defaultdict[bytes, list[str]] = defaultdict(list)
    for image, record in zip(images, records, strict=True):
        if record["style"] == style:
            groups[hashlib.sha256(image.tobytes()).digest()].append(record["unified"])
    return [g for g in groups.values() if len(g) > 1]


def _build(
    out_dir: Path,
    *,
    cache_dir: Path | None,
    styles: Iterable[str],
    subset: Sequence[str] | None,
    progress: bool,
) -> Path:
    """Fetch, verify and read the packages, then write the dataset of ``styles`` (only ``subset`` if given)."""
    chosen = _check_styles(styles)
    out_dir = Path(out_dir).expanduser()
    cache_dir = Path(cache_dir or DEFAULT_CACHE_DIR).expanduser()
    # Fetch everything first: a missing npm or a bad checksum should fail before minutes of decoding.
    labels_tar = fetch_package(LABELS_PACKAGE, cache_dir)
    art_tars = {style: fetch_package(ART_PACKAGES[style], cache_dir) for style in chosen}

    emojibase = json.loads(read_tar(labels_tar, lambda n: n == "package/en/data.json")["package/en/data.json"])
    images: list[np.ndarray] = []
    records: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    excluded: list[dict[str, str]] = []
    unlabeled: set[str] = set()
    for style in chosen:
        prefix = f"package/img/{style}/{IMAGE_SIZE}/"
        members = read_tar(art_tars[style], lambda n, prefix=prefix: n.startswith(prefix) or n == "package/emoji.json")
        entries, missing_labels = emoji_catalog(json.loads(members["package/emoji.json"]), emojibase)
        unlabeled.update(missing_labels)
        if subset is not None:
            entries = [e for e in entries if e.unified in subset]
            if absent := sorted(set(subset) - {e.unified for e in entries}):
                raise DreamlabError(f"emoji not in {ART_PACKAGES[style].spec}: {', '.join(absent)}")
        for entry in tqdm(entries, desc=f"emoji {style}", unit="img", disable=not progress):
            if reason := EXCLUDED.get((style, entry.unified)):
                excluded.append({"style": style, "unified": entry.unified, "reason": reason})
                continue
            data = members.get(prefix + entry.image)
            if data is None:
                skipped.append({"style": style, "unified": entry.unified, "reason": "missing from the package"})
                continue
            try:
                image = decode_png(data)
            except ValueError as e:
                skipped.append({"style": style, "unified": entry.unified, "reason": str(e)})
                continue
            images.append(image)
            records.append(entry.record(len(records), style))
    if skipped:
        warnings.warn(
            f"skipped {len(skipped)} missing or unreadable emoji PNGs (listed in {MANIFEST_FILE})", stacklevel=3
        )
    if not records:
        raise DreamlabError("no readable emoji images in the packages; nothing written")

    out_dir.mkdir(parents=True, exist_ok=True)
    # The manifest marks a complete build: drop the old one first so a build killed midway is seen as incomplete.
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)
    array = np.stack(images)
    _atomic_write(out_dir / IMAGES_FILE, lambda f: np.save(f, array, allow_pickle=False))
    jsonl = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    _atomic_write(out_dir / METADATA_FILE, lambda f: f.write(jsonl))
    _atomic_write(out_dir / NOTICE_FILE, lambda f: f.write(NOTICE_TEXT.encode("utf-8")))

    counts = Counter((r["style"], r["split"]) for r in records)
    manifest = {
        "dataset": "emoji",
        "builder_version": BUILDER_VERSION,
        "subset": "full" if subset is None else "fixture",
        "packages": [
            {"name": p.name, "version": p.version, "sha256": p.sha256, "license": p.license, "content": p.content}
            for p in (*(ART_PACKAGES[s] for s in chosen), LABELS_PACKAGE)
        ],
        "styles": list(chosen),
        "count": len(records),
        "counts": {s: {split: counts[s, split] for split in get_args(Split)} for s in chosen},
        "images": {
            "file": IMAGES_FILE,
            "sha256": sha256_file(out_dir / IMAGES_FILE),
            "shape": list(array.shape),
            "dtype": "uint8",
        },
        "metadata": {"file": METADATA_FILE, "sha256": hashlib.sha256(jsonl).hexdigest()},
        "format": "RGBA uint8, straight (not premultiplied) alpha; colour of fully transparent pixels is 0",
        "split_rule": f"test iff int.from_bytes(sha256(hex_key(base))[:8], 'big') % 100 < {TEST_PERCENT} "
        f"and style == {list(STYLES)}[sha256(hex_key(base))[8] % {len(STYLES)}]",
        "skipped": skipped,
        "excluded": excluded,
        "unlabeled": sorted(unlabeled),
        "exact_duplicates": {s: _duplicate_groups(images, records, s) for s in chosen},
    }
    _write_json(out_dir / MANIFEST_FILE, manifest)
    return out_dir


def build_emoji_dataset(
    out_dir: Path,
    *,
    cache_dir: Path | None = None,
    styles: Iterable[str] = STYLES,
    progress: bool = True,
) -> Path:
    """Build the full emoji dataset into ``out_dir`` (tarballs cached in ``cache_dir``) and return ``out_dir``.

    Raises ``NpmError`` when npm is missing or fails, ``IntegrityError`` when a tarball's sha256 is not the
    pinned one, ``InvalidRequestError`` for an unknown or forbidden style. Unreadable PNGs are skipped with a
    warning and listed in the manifest.
    """
    return _build(out_dir, cache_dir=cache_dir, styles=styles, subset=None, progress=progress)


def build_fixture(out_dir: Path, *, cache_dir: Path | None = None, progress: bool = False) -> Path:
    """Build the committed test fixture (``FIXTURE_EMOJI`` in both styles) into ``out_dir``, as the full build does.

    Regenerate it with
    ``python -c "from dreamlab.data.emoji import build_fixture; build_fixture('tests/fixtures/emoji')"``.
    """
    return _build(out_dir, cache_dir=cache_dir, styles=STYLES, subset=FIXTURE_EMOJI, progress=progress)


def _parse_styles(text: str) -> tuple[Style, ...]:
    try:
        return _check_styles(text.split(","))
    except InvalidRequestError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _run_cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out_dir = build_emoji_dataset(args.out, cache_dir=args.cache, styles=args.styles)
    manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    per_style = ", ".join(f"{s} {c['train']} train / {c['test']} test" for s, c in manifest["counts"].items())
    print(f"built {manifest['count']} emoji images ({per_style}) in {time.perf_counter() - start:.0f} s -> {out_dir}")
    if manifest["skipped"]:
        print(f"skipped {len(manifest['skipped'])} unreadable images (see {out_dir / MANIFEST_FILE})")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``emoji`` under the ``data`` command group; its handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "emoji",
        help="build the emoji training set (Noto + Twemoji art, CLDR captions)",
        description="Fetch the pinned emoji packages with npm, check their sha256, build the 64x64 RGBA emoji set.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_DATA_DIR, metavar="DIR", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR", help="npm tarball cache (default: %(default)s)"
    )
    parser.add_argument(
        "--styles",
        type=_parse_styles,
        default=STYLES,
        metavar="LIST",
        help="comma-separated art styles (default: google,twitter)",
    )
    parser.set_defaults(func=_run_cli)
    return parser
