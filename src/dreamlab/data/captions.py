"""Text prompts for emoji images: varied captions for training, one fixed caption per image for evaluation.

Training captions always contain the CLDR label verbatim, so a prompt of just the label is always in
distribution; the other parts (style, skin tone, taxonomy words, tags) come and go at random so the model
also learns what the label alone means, and what each extra phrase changes. Captions stay short: at most
``MAX_WORDS`` words and punctuation marks, which is also the length of the longest mandatory part (label,
two skin tones and style, e.g. "couple with heart: woman, man, medium-light skin tone, medium-dark skin
tone, google style"), so optional parts never push a caption past the longest canonical one.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from typing import Any, Final

from dreamlab.data.catalog import Style

STYLE_PHRASES: Final[dict[Style, tuple[str, ...]]] = {
    "google": ("google style", "noto style"),
    "twitter": ("twitter style", "twemoji style"),
}
CANONICAL_STYLE: Final[dict[Style, str]] = {"google": "google style", "twitter": "twitter style"}

# Subcategories whose words, with the hyphen removed, read badly as a phrase ("food fruit" -> "fruit").
SUBCATEGORY_WORDS: Final[dict[str, str]] = {
    "food-fruit": "fruit",
    "food-vegetable": "vegetable",
    "food-prepared": "prepared food",
    "food-asian": "asian food",
    "food-sweet": "sweets",
    "animal-mammal": "mammal",
    "animal-bird": "bird",
    "animal-bug": "bug",
    "animal-marine": "sea animal",
    "animal-reptile": "reptile",
    "animal-amphibian": "amphibian",
    "plant-flower": "flower",
    "plant-other": "plant",
    "transport-air": "air transport",
    "transport-ground": "ground transport",
    "transport-water": "boat",
    "place-building": "building",
    "place-geographic": "landscape",
    "place-map": "map",
    "place-other": "place",
    "place-religious": "religious building",
    "face-affection": "affectionate face",
    "face-concerned": "concerned face",
    "face-costume": "costume",
    "face-glasses": "face with glasses",
    "face-hand": "face with hand",
    "face-hat": "face with hat",
    "face-negative": "angry face",
    "face-neutral-skeptical": "skeptical face",
    "face-sleepy": "sleepy face",
    "face-smiling": "smiling face",
    "face-tongue": "face with tongue",
    "face-unwell": "unwell face",
    "hand-fingers-closed": "closed hand",
    "hand-fingers-open": "open hand",
    "hand-fingers-partial": "hand gesture",
    "hand-prop": "hand holding something",
    "hand-single-finger": "pointing finger",
    "person-activity": "person doing something",
    "person-fantasy": "fantasy character",
    "person-gesture": "person gesturing",
    "person-resting": "resting person",
    "person-role": "profession",
    "person-sport": "sport",
    "person-symbol": "person symbol",
    "other-object": "object",
    "other-symbol": "symbol",
    "alphanum": "letters and numbers",
    "av-symbol": "media symbol",
    "body-parts": "body part",
    "subdivision-flag": "flag",
}

MAX_WORDS: Final = 22
_WORD = re.compile(r"\w+|[^\w\s]")


def approx_tokens(text: str) -> int:
    """Words plus punctuation marks: a lower bound on BPE tokens that needs no tokenizer files."""
    return len(_WORD.findall(text))


def subcategory_words(subcategory: str) -> str:
    """Words for an emoji-datasource subcategory: "food-fruit" -> "fruit", "sky & weather" -> "sky and weather"."""
    return SUBCATEGORY_WORDS.get(subcategory, subcategory.replace("-", " ").replace("&", "and"))


def category_words(category: str) -> str:
    """Plain words for an emoji-datasource category ("Food & Drink" -> "food and drink")."""
    return category.lower().replace("&", "and")


def tone_phrase(meta: Mapping[str, Any]) -> str | None:
    """The skin tone as words ("medium-dark skin tone"), one phrase per tone in order; ``None`` without tones."""
    tones = list(dict.fromkeys(meta.get("skin_tones") or ([meta["skin_tone"]] if meta.get("skin_tone") else [])))
    return ", ".join(f"{t} skin tone" for t in tones) or None


def _extra_tags(meta: Mapping[str, Any]) -> list[str]:
    """Tags that add a word the label does not already contain ("apple" adds nothing to "red apple")."""
    label_words = set(_WORD.findall(meta["label"].lower()))
    return [t for t in meta.get("tags", ()) if not set(_WORD.findall(t.lower())) <= label_words]


def caption(meta: Mapping[str, Any], rng: random.Random) -> str:
    """A random training caption for the image described by ``meta`` (a metadata.jsonl record).

    Always the label; usually the style (one of two names for it) and the skin tone; sometimes a taxonomy
    phrase, up to three tags and the word "emoji"; in random order, label first more often than not.
    Parts are dropped, tags first, until the caption fits in ``MAX_WORDS``.
    """
    optional: list[str] = []
    if rng.random() < 0.8:
        optional.append(rng.choice(STYLE_PHRASES[meta["style"]]))
    tone = tone_phrase(meta)
    if tone and rng.random() < 0.9:
        optional.append(tone)
    taxonomy = None
    if rng.random() < 0.3:
        taxonomy = subcategory_words(meta["subcategory"]) if rng.random() < 0.75 else category_words(meta["category"])
        optional.append(taxonomy)
    extra = _extra_tags(meta)
    tags = rng.sample(extra, min(len(extra), rng.randint(0, 3)))
    optional.extend(tags)
    if rng.random() < 0.15:
        optional.append("emoji")
    parts = [p for p in dict.fromkeys(optional) if p != meta["label"]]
    rng.shuffle(parts)
    parts.insert(0 if rng.random() < 0.7 else rng.randint(0, len(parts)), meta["label"])
    for droppable in (*tags, taxonomy, "emoji"):
        if approx_tokens(", ".join(parts)) <= MAX_WORDS:
            break
        if droppable in parts:
            parts.remove(droppable)
    return ", ".join(parts)


def canonical_label(meta: Mapping[str, Any]) -> str:
    """The label with any skin tone, without the style: "red apple", "waving hand, medium-dark skin tone"."""
    return ", ".join(p for p in (meta["label"], tone_phrase(meta)) if p)


def canonical_caption(meta: Mapping[str, Any]) -> str:
    """The one deterministic prompt for an image, used in evaluation: "red apple, google style",
    "waving hand, medium-dark skin tone, twitter style"."""
    return f"{canonical_label(meta)}, {CANONICAL_STYLE[meta['style']]}"
