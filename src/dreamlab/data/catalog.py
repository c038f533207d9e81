"""What a built emoji dataset is: its files, its types, its split rule and the record of each image.

``dreamlab.data.emoji`` builds a dataset (fetching the npm packages, decoding the art, writing the files);
``dreamlab.data.dataset`` and ``dreamlab.data.captions`` read one. Both sides share this module, which
imports nothing beyond the standard library, so reading a dataset never loads the builder.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

Style = Literal["google", "twitter"]
Split = Literal["train", "test"]
Tone = Literal["light", "medium-light", "medium", "medium-dark", "dark"]
# "mixed": a multi-person emoji whose people have different tones; ``skin_tones`` lists them in order.
SkinTone = Literal["light", "medium-light", "medium", "medium-dark", "dark", "mixed"]

STYLES: Final[tuple[Style, ...]] = get_args(Style)
BUILDER_VERSION: Final = 2
IMAGE_SIZE: Final = 64
TEST_PERCENT: Final = 10  # of base emoji; one of their two styles is held out, so about 5% of images
DEFAULT_DATA_DIR: Final = Path("~/.cache/dreamlab/data/emoji")

IMAGES_FILE: Final = "images.npy"
METADATA_FILE: Final = "metadata.jsonl"
MANIFEST_FILE: Final = "manifest.json"
NOTICE_FILE: Final = "NOTICE.txt"

# Fitzpatrick modifiers as emoji-datasource keys its ``skin_variations`` ("1F3FB", or "1F3FB-1F3FF" for two people).
TONES: Final[dict[str, Tone]] = {
    "1F3FB": "light",
    "1F3FC": "medium-light",
    "1F3FD": "medium",
    "1F3FE": "medium-dark",
    "1F3FF": "dark",
}


def hex_key(code: str) -> str:
    """The matching key of a code point sequence: upper case, without FE0F variation selectors.

    emoji-datasource writes fully-qualified sequences ("2764-FE0F") while emojibase and older data may not,
    so both sides are compared without FE0F.
    """
    return "-".join(part for part in code.upper().split("-") if part != "FE0F")


def split_of(base: str, style: Style) -> Split:
    """The split of the images of base emoji ``base`` (its unified code) drawn in ``style``.

    For TEST_PERCENT% of base emoji, chosen by sha256 of ``hex_key(base)``, one style (also chosen by that
    hash) is held out with all its skin tones; the other style stays in training. So every emoji is a
    concept the model and the judge have seen, and the test split measures renderings they have not:
    prompts like "red apple, twitter style" for an apple seen only in google style. A function of the
    code alone: the split does not move when packages add, drop or reorder emoji.
    """
    digest = hashlib.sha256(hex_key(base).encode("ascii")).digest()
    held = int.from_bytes(digest[:8], "big") % 100 < TEST_PERCENT
    return "test" if held and STYLES[digest[8] % len(STYLES)] == style else "train"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class EmojiEntry:
    """One drawable emoji (a base emoji or one of its skin-tone variants) and the text that describes it.

    Variants carry their base's label and tags (emojibase gives skins a label only, one that repeats the tone),
    so captions can state the tone once, from ``skin_tones``.
    """

    unified: str
    base: str
    image: str
    name: str
    label: str
    tags: tuple[str, ...]
    category: str
    subcategory: str
    skin_tones: tuple[Tone, ...]

    @property
    def skin_tone(self) -> SkinTone | None:
        if not self.skin_tones:
            return None
        return self.skin_tones[0] if len(set(self.skin_tones)) == 1 else "mixed"

    def record(self, index: int, style: Style) -> dict[str, Any]:
        """The metadata.jsonl object of this emoji drawn in ``style`` at row ``index`` of images.npy."""
        return {
            "index": index,
            "style": style,
            "unified": self.unified,
            "label": self.label,
            "name": self.name,
            "tags": list(self.tags),
            "category": self.category,
            "subcategory": self.subcategory,
            "skin_tone": self.skin_tone,
            "skin_tones": list(self.skin_tones),
            "split": split_of(self.base, style),
            "base": self.base,
        }


def emoji_catalog(
    emoji_json: list[dict[str, Any]], emojibase: list[dict[str, Any]]
) -> tuple[list[EmojiEntry], list[str]]:
    """All emoji of emoji-datasource's ``emoji.json`` in CLDR order, each base followed by its skin tones.

    The CLDR label from emojibase is the caption text because the Unicode name often misleads (U+2764
    "HEAVY BLACK HEART" is drawn red; CLDR says "red heart"); the lower-cased name is the fallback. Returns
    the entries and the unified codes of the base emoji that had no emojibase entry (so fell back).
    """
    labels = {hex_key(e["hexcode"]): (e["label"], tuple(e.get("tags", ()))) for e in emojibase}
    entries: list[EmojiEntry] = []
    unlabeled: list[str] = []
    for e in sorted(emoji_json, key=lambda e: e["sort_order"]):
        key = hex_key(e["unified"])
        if key not in labels:
            unlabeled.append(e["unified"])
        label, tags = labels.get(key, (e["name"].lower(), ()))
        common = dict(
            base=e["unified"],
            name=e["name"],
            label=label,
            tags=tags,
            category=e["category"],
            subcategory=e["subcategory"],
        )
        entries.append(EmojiEntry(unified=e["unified"], image=e["image"], skin_tones=(), **common))
        for tone_key, variant in sorted((e.get("skin_variations") or {}).items()):
            tones = tuple(TONES[t] for t in tone_key.split("-"))
            entries.append(EmojiEntry(unified=variant["unified"], image=variant["image"], skin_tones=tones, **common))
    return entries, unlabeled
