"""The personalization sets' builder and reader, offline: resvg on tiny SVGs, the set selection and a whole build
from small fake packages, and the pinned-hash refusal shared with the emoji data (a fake npm, no network)."""

import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_data_emoji import _fake_npm, _tarball

from dreamlab.cli import build_parser
from dreamlab.data import emoji, personal
from dreamlab.data.catalog import hex_key, sha256_file, split_of
from dreamlab.errors import DreamlabError, IntegrityError

# An off-centre red disc with a blue dot, on a 32-unit viewBox: the icons' format (IconifyJSON body).
DISC_BODY = '<circle cx="10" cy="12" r="6" fill="#ff0000"/><circle cx="10" cy="12" r="1" fill="#0000ff"/>'
# The same drawing as an OpenMoji file: a whole document on a 72-unit viewBox.
OPENMOJI_SVG = (
    '<svg id="emoji" viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><g transform="scale(2.25)">{}</g></svg>'
)
CAT_FACES = {  # hexcode -> (Fluent icon name, CLDR label)
    "1F63A": ("grinning-cat", "grinning cat"),
    "1F638": ("grinning-cat-with-smiling-eyes", "grinning cat with smiling eyes"),
    "1F639": ("cat-with-tears-of-joy", "cat with tears of joy"),
    "1F63B": ("smiling-cat-with-heart-eyes", "smiling cat with heart-eyes"),
    "1F63C": ("cat-with-wry-smile", "cat with wry smile"),
    "1F63D": ("kissing-cat", "kissing cat"),
    "1F640": ("weary-cat", "weary cat"),
    "1F63F": ("crying-cat", "crying cat"),
    "1F63E": ("pouting-cat", "pouting cat"),
}


def _disc(i: int) -> str:
    """A different drawing per ``i`` (a set refuses pixel-identical images)."""
    return f'<circle cx="16" cy="16" r="{6 + i}" fill="#ffb02e"/><rect x="{8 + i}" y="14" width="3" height="3"/>'


def _fake_fluent(hexcodes=CAT_FACES) -> tuple[dict, dict]:
    """icons.json and chars.json of an Iconify set holding ``hexcodes`` and one hidden icon that must not be used."""
    icons = {name: {"body": _disc(i)} for i, (name, _) in enumerate(hexcodes.values())}
    icons["old-cat"] = {"body": _disc(0), "hidden": True}
    chars = {h.lower(): name for h, (name, _) in hexcodes.items()} | {"1f431": "old-cat"}
    return {"prefix": "fluent-emoji-flat", "icons": icons, "width": 32, "height": 32}, chars


def _labels(hexcodes=CAT_FACES) -> dict[str, str]:
    return {hex_key(h): label for h, (_, label) in hexcodes.items()}


def test_rasterized_svg_is_64x64_rgba_framed_like_the_training_art():
    icon_set = {"icons": {"disc": {"body": DISC_BODY}}, "width": 32, "height": 32}
    rgba = personal.rasterize_svg(personal.iconify_svg(icon_set, "disc"))
    assert rgba.shape == (64, 64, 4) and rgba.dtype == np.uint8
    corners = rgba[[0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners == 0).all()  # transparent, and the colour of transparent pixels is 0
    assert not rgba[..., :3][rgba[..., 3] == 0].any()
    # The disc spans 12 of 32 units off-centre; framed, it fills 62 px with a 1-px border, centred.
    rows, cols = np.nonzero(rgba[..., 3])
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (1, 62, 1, 62)
    assert tuple(rgba[32, 32]) == (0, 0, 255, 255) and tuple(rgba[32, 12]) == (255, 0, 0, 255)
    semi = (rgba[..., 3] > 0) & (rgba[..., 3] < 255)
    assert semi.any()  # antialiased edge, straight alpha: the edge stays pure red
    assert (rgba[semi][:, :3] == (255, 0, 0)).all()
    # Deterministic bytes, and a viewBox set on the document (OpenMoji's form) frames the same way, up to the
    # extent measured at 1/4 pixel: edge pixels' alpha moves a little, nothing else.
    png = personal.encode_png(Image.fromarray(rgba, "RGBA"))
    assert personal.encode_png(Image.fromarray(personal.rasterize_svg(personal.iconify_svg(icon_set, "disc")))) == png
    doc = OPENMOJI_SVG.format(DISC_BODY)
    other = personal.rasterize_svg(doc)
    assert np.array_equal(other[..., 3] > 127, rgba[..., 3] > 127) and np.abs(other.astype(int) - rgba).mean() < 0.5


def test_svg_errors_are_value_errors():
    with pytest.raises(ValueError, match="draws nothing"):
        personal.rasterize_svg('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><g/></svg>')
    with pytest.raises(ValueError, match="viewBox"):
        personal.rasterize_svg("<html/>")
    icon_set = {"icons": {"arrow": {"body": DISC_BODY, "hFlip": True}}, "width": 32, "height": 32}
    with pytest.raises(ValueError, match="hFlip"):
        personal.iconify_svg(icon_set, "arrow")


def test_iconify_icon_overrides_the_set_size():
    icon_set = {"icons": {"tall": {"body": "<g/>", "height": 33}}, "width": 32, "height": 32}
    assert 'viewBox="0 0 32 33"' in personal.iconify_svg(icon_set, "tall")


def test_art_is_keyed_by_hexcode_without_fe0f():
    icon_set, chars = _fake_fluent()
    art = personal.fluent_art(icon_set, chars)
    assert art["1F63A"].origin == "grinning-cat" and "1F431" not in art  # hidden icons are not used
    files = {"package/color/svg/0031-FE0F-20E3.svg": b"<svg/>", "package/black/svg/1F63A.svg": b"<svg/>"}
    assert {k: a.origin for k, a in personal.openmoji_art(files).items()} == {
        "0031-20E3": "color/svg/0031-FE0F-20E3.svg"
    }


def test_selection_from_a_small_icon_set_gives_the_cat_and_lists_what_the_rest_lack():
    icon_set, chars = _fake_fluent()
    art = {"fluent": personal.fluent_art(icon_set, chars)}
    planned, incomplete = personal.plan_sets(personal.SETS, art, _labels())
    assert [p.spec.name for p in planned] == ["fluent-cat"]
    cat = planned[0]
    assert [p.label for p in cat.picked] == [label for _, label in CAT_FACES.values()]
    assert [p.art.origin for p in cat.picked] == [name for name, _ in CAT_FACES.values()]
    assert set(incomplete) == {s.name for s in personal.SETS} - {"fluent-cat"}
    assert incomplete["openmoji-cat"] == list(personal.CAT_FACES)  # no OpenMoji art at all
    assert incomplete["fluent-face"] == list(personal.SMILEYS)

    with_one_gap = {k: v for k, v in CAT_FACES.items() if k != "1F640"}
    art = {"fluent": personal.fluent_art(*_fake_fluent(with_one_gap))}
    planned, incomplete = personal.plan_sets(personal.SETS[:1], art, _labels())
    assert planned == [] and incomplete == {"fluent-cat": ["1F640"]}  # all or nothing


def test_the_pinned_sets_are_enough_for_the_measurements():
    subjects = [s for s in personal.SETS if s.kind == "subject"]
    styles = [s for s in personal.SETS if s.kind == "style"]
    assert len(subjects) >= 8 and {s.source for s in styles} == {"fluent", "openmoji"}
    assert all(personal.MIN_IMAGES <= len(s.emoji) <= 10 and len(set(s.emoji)) == len(s.emoji) for s in personal.SETS)
    assert all(s.class_noun and len(s.contexts) >= 3 and not s.held_out for s in subjects)
    assert len({s.name for s in personal.SETS}) == len({s.identifier for s in personal.SETS}) == len(personal.SETS)
    for style in styles:
        assert len(style.emoji) >= 8 and len(style.held_out) >= 16 and not set(style.emoji) & set(style.held_out)
        # Every emoji a style set shows or asks for is one the default model trained on in both its styles.
        assert all(split_of(h, s) == "train" for h in (*style.emoji, *style.held_out) for s in ("google", "twitter"))
        for subject in subjects:
            if subject.source == style.source:
                assert not set(subject.emoji) & {*style.emoji, *style.held_out}


def test_identifiers_are_single_tokens_of_the_default_text_encoder():
    from transformers import AutoTokenizer

    from dreamlab.loading.text_encoders import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    for spec in personal.SETS:
        assert tokenizer.tokenize(spec.identifier) == [spec.identifier], spec.name


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """Tiny Fluent, OpenMoji and emojibase tarballs (cat faces only), the pins patched to them, no npm on PATH."""
    cache = tmp_path / "cache"
    cache.mkdir()
    icon_set, chars = _fake_fluent()
    info = {"author": {"name": "Microsoft Corporation"}, "license": {"title": "MIT", "spdx": "MIT"}}
    _tarball(
        cache / personal.PACKAGES["fluent"].tarball,
        {
            "package/icons.json": json.dumps(icon_set).encode(),
            "package/chars.json": json.dumps(chars).encode(),
            "package/info.json": json.dumps(info).encode(),
        },
    )
    _tarball(
        cache / personal.PACKAGES["openmoji"].tarball,
        {
            "package/package.json": json.dumps({"name": "openmoji", "license": "CC-BY-SA-4.0"}).encode(),
            **{
                f"package/color/svg/{h}.svg": OPENMOJI_SVG.format(_disc(8 - i)).encode()
                for i, h in enumerate(CAT_FACES)
            },
        },
    )
    emojibase = [{"hexcode": h, "label": label} for h, (_, label) in CAT_FACES.items()]
    _tarball(cache / emoji.LABELS_PACKAGE.tarball, {"package/en/data.json": json.dumps(emojibase).encode()})
    for source, package in personal.PACKAGES.items():
        monkeypatch.setitem(
            personal.PACKAGES, source, dataclasses.replace(package, sha256=sha256_file(cache / package.tarball))
        )
    labels = emoji.LABELS_PACKAGE
    monkeypatch.setattr(
        personal, "LABELS_PACKAGE", dataclasses.replace(labels, sha256=sha256_file(cache / labels.tarball))
    )
    style = dataclasses.replace(
        next(s for s in personal.SETS if s.name == "openmoji-style"), emoji=tuple(CAT_FACES)[:4], held_out=("1F63E",)
    )
    monkeypatch.setattr(personal, "SETS", (*(s for s in personal.SETS if s.name.endswith("-cat")), style))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    return cache


def test_build_from_small_fake_packages_then_load(fake_cache, tmp_path, capsys):
    """The whole build offline through the CLI handler, and the reader's view of it."""
    out = tmp_path / "out"
    args = build_parser().parse_args(
        ["data", "personal", "--out", str(out), "--cache", str(fake_cache), "--sheet", str(tmp_path / "sheet.png")]
    )
    assert args.func(args) == 0
    assert "built 2 subject sets and 1 style sets (22 images)" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "SOURCES.md",
        "fluent-cat",
        "openmoji-cat",
        "openmoji-style",
        "sets.json",
    ]
    assert Image.open(tmp_path / "sheet.png").mode == "RGB"

    cat, om_cat, style = personal.load_sets(out, verify=True)
    assert (cat.name, cat.kind, cat.source, cat.license, cat.class_noun) == (
        "fluent-cat",
        "subject",
        "fluent",
        "MIT",
        "cat face",
    )
    assert cat.images[0] == out / "fluent-cat" / "grinning-cat.png" and len(cat.images) == 9
    assert cat.captions[:2] == ("grinning cat", "grinning cat with smiling eyes")
    assert set(cat.prompts) == {"a bwv cat face"} and set(cat.class_prompts) == {"a cat face"}
    assert (
        cat.eval_prompts[0] == "a bwv cat face with sunglasses"
        and cat.eval_class_prompts[0] == "a cat face with sunglasses"
    )
    assert om_cat.license == "CC-BY-SA-4.0" and om_cat.identifier == "spp"
    assert style.kind == "style" and style.class_noun is None
    assert style.prompts[0] == "grinning cat, mcc style" and style.class_prompts[0] == "grinning cat"
    assert style.eval_prompts == ("pouting cat, mcc style",) and style.eval_class_prompts == ("pouting cat",)
    rgba = cat.rgba()
    assert rgba.shape == (9, 64, 64, 4) and rgba.dtype == np.uint8 and (rgba[:, 0, 0] == 0).all()

    index = json.loads((out / "sets.json").read_text())
    assert [p["source"] for p in index["packages"]] == ["fluent", "openmoji", "labels"]
    assert index["packages"][1]["declared"] == {"license": "CC-BY-SA-4.0"}
    sources = (out / "SOURCES.md").read_text()
    assert "All emojis designed by OpenMoji" in sources and "CC BY-SA 4.0" in sources and "Microsoft" in sources
    first = index["sets"][0]["images"][0]
    assert f"{first['sha256']}  fluent-cat/grinning-cat.png" in sources
    assert first["sha256"] == hashlib.sha256((out / "fluent-cat" / "grinning-cat.png").read_bytes()).hexdigest()

    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    personal.build_personal_sets(out, cache_dir=fake_cache)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # same bytes

    (out / "fluent-cat" / "weary-cat.png").write_bytes(b"changed")
    personal.load_sets(out)  # not hashed without verify
    with pytest.raises(IntegrityError, match=r"weary-cat\.png: sha256 \w+ does not match sets\.json"):
        personal.load_sets(out, verify=True)
    (out / "fluent-cat" / "weary-cat.png").unlink()
    with pytest.raises(IntegrityError, match=r"weary-cat\.png is missing; rebuild with `dreamlab data personal`"):
        personal.load_sets(out)


def test_a_set_with_repeated_art_is_refused(fake_cache, tmp_path, monkeypatch):
    icon_set, chars = _fake_fluent()
    icon_set["icons"]["weary-cat"] = icon_set["icons"]["grinning-cat"]
    tarball = fake_cache / personal.PACKAGES["fluent"].tarball
    _tarball(
        tarball,
        {
            "package/icons.json": json.dumps(icon_set).encode(),
            "package/chars.json": json.dumps(chars).encode(),
            "package/info.json": b'{"author": {}, "license": {}}',
        },
    )
    monkeypatch.setitem(
        personal.PACKAGES, "fluent", dataclasses.replace(personal.PACKAGES["fluent"], sha256=sha256_file(tarball))
    )
    with pytest.raises(DreamlabError, match="^fluent-cat: 'weary cat' is drawn exactly as 'grinning cat'$"):
        personal.build_personal_sets(tmp_path / "out", cache_dir=fake_cache)
    assert not (tmp_path / "out" / "sets.json").exists()


def test_missing_build_is_a_clear_one_line_error(tmp_path):
    with pytest.raises(
        personal.PersonalSetsNotFoundError,
        match=re.escape(f"no personalization sets at {tmp_path}; run `dreamlab data personal`"),
    ):
        personal.load_sets(tmp_path)
    (tmp_path / "sets.json").write_text('{"builder_version": 0, "sets": []}')
    with pytest.raises(personal.PersonalSetsNotFoundError, match="builder version 0, this code reads version 1"):
        personal.load_sets(tmp_path)
    assert issubclass(personal.PersonalSetsNotFoundError, DreamlabError)


def test_scoped_package_is_fetched_under_npm_pack_name_and_a_bad_hash_is_refused(tmp_path, monkeypatch):
    package = personal.PACKAGES["fluent"]
    assert package.sha256 == "7d064769dee690815f823bc5bcc511d957198caf9f5edd8dd9c1aa48a6aeb175"
    assert package.tarball == "iconify-json-fluent-emoji-flat-1.2.6.tgz"  # what `npm pack @scope/name` writes
    _fake_npm(tmp_path / "bin", f'printf "not the real tarball" > {package.tarball}\necho {package.tarball}\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cache = tmp_path / "cache"
    with pytest.raises(
        IntegrityError, match=f"checksum mismatch for {package.tarball} .*expected sha256 {package.sha256}"
    ):
        emoji.fetch_package(package, cache)
    assert not (cache / package.tarball).exists()
    with pytest.raises(IntegrityError):
        personal.build_personal_sets(tmp_path / "out", cache_dir=cache)
    assert not (tmp_path / "out").exists()  # refused before anything is written
