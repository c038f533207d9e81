"""The emoji data pipeline, offline: the committed fixture (built from the real packages by
``dreamlab.data.emoji.build_fixture``), the split rule, captions, and the fetch errors with a fake npm."""

import argparse
import dataclasses
import hashlib
import io
import json
import os
import random
import re
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dreamlab
from dreamlab.data import catalog, emoji
from dreamlab.data.captions import MAX_WORDS, approx_tokens, canonical_caption, caption
from dreamlab.data.catalog import split_of
from dreamlab.data.dataset import (
    DatasetNotFoundError,
    EmojiDataset,
    check_dataset,
    load_metadata,
    to_rgb_on_white,
    to_rgba_uint8,
    to_tensor,
)
from dreamlab.errors import DreamlabError, IntegrityError, InvalidRequestError

FIXTURE = Path(__file__).parent / "fixtures" / "emoji"


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return load_metadata(FIXTURE)


def test_fixture_loads_verified_with_shapes_and_alpha(records):
    manifest = check_dataset(FIXTURE, verify=True)
    assert manifest["count"] == len(records) == 2 * len(emoji.FIXTURE_EMOJI)
    assert {r["unified"] for r in records} == set(emoji.FIXTURE_EMOJI)
    assert [r["index"] for r in records] == list(range(len(records)))

    images = np.load(FIXTURE / catalog.IMAGES_FILE)
    assert images.dtype == np.uint8 and images.shape == (len(records), 64, 64, 4)
    alpha = images[..., 3]
    assert (alpha == 0).any() and (alpha == 255).any() and ((alpha > 0) & (alpha < 255)).any()
    assert not images[..., :3][alpha == 0].any()  # transparent colour is zeroed
    # Straight, not premultiplied: some faint pixels have a colour channel above their alpha (impossible premultiplied).
    semi = (alpha > 0) & (alpha < 128)
    assert (images[..., :3][semi].max(axis=-1) > alpha[semi]).any()


def test_dataset_items_filters_and_display(records):
    train = EmojiDataset(FIXTURE)
    test = EmojiDataset(FIXTURE, split="test", styles=["twitter"])
    both = EmojiDataset(FIXTURE, split="all", verify=True)
    assert len(train) + len(EmojiDataset(FIXTURE, split="test")) == len(both) == len(records)
    assert {r["split"] for r in train.records} == {"train"}
    assert {(r["split"], r["style"]) for r in test.records} == {("test", "twitter")}

    image, meta = test[0]
    assert image.shape == (4, 64, 64) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    assert meta == test.records[0]
    rgba = test.rgba(0)
    assert np.array_equal(to_rgba_uint8(image), rgba)
    assert np.array_equal(to_rgba_uint8(to_tensor(rgba)[None])[0], rgba)

    rgb = to_rgb_on_white(rgba)
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert (rgb[rgba[..., 3] == 0] == 255).all()
    opaque = rgba[..., 3] == 255
    assert np.array_equal(rgb[opaque], rgba[..., :3][opaque])
    with pytest.raises(InvalidRequestError):
        EmojiDataset(FIXTURE, split="val")  # type: ignore[arg-type]


def test_reading_a_dataset_does_not_import_the_builder():
    """The loader and captions share ``catalog`` with the builder, not the builder itself (npm, tarfile, PIL).

    A fresh interpreter, because this one has imported the builder already. torch imports tarfile itself, so
    past ``dataset`` the builder's own third-party import (PIL) stands in for it.
    """
    code = (
        "import sys\n"
        "import dreamlab.data.captions\n"
        "print(sorted(m for m in ('dreamlab.data.emoji', 'tarfile', 'PIL') if m in sys.modules))\n"
        "import dreamlab.data.dataset\n"
        "print(sorted(m for m in ('dreamlab.data.emoji', 'PIL') if m in sys.modules))\n"
        "import dreamlab.data.emoji\n"  # the probe sees the builder once it is imported
        "print(sorted(m for m in ('dreamlab.data.emoji', 'PIL') if m in sys.modules))\n"
    )
    src = str(Path(dreamlab.__file__).resolve().parent.parent)  # this checkout, not whichever one is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (src, os.environ.get("PYTHONPATH"))))}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "[]", "['PIL', 'dreamlab.data.emoji']"]


def test_label_is_cldr_not_unicode_name(records):
    heart = next(r for r in records if r["unified"] == "2764-FE0F")
    assert heart["name"] == "HEAVY BLACK HEART" and heart["label"] == "red heart"
    mixed = next(r for r in records if r["unified"] == "1FAF1-1F3FB-200D-1FAF2-1F3FF")
    assert mixed["label"] == "handshake" and mixed["skin_tone"] == "mixed" and mixed["skin_tones"] == ["light", "dark"]
    tone = next(r for r in records if r["unified"] == "1F44B-1F3FE")
    assert tone["skin_tone"] == "medium-dark" and tone["base"] == "1F44B"


def test_split_holds_out_one_style_of_some_emoji_with_all_its_tones(records):
    by_base: dict[str, dict[str, set[str]]] = {}
    for r in records:
        assert r["split"] == split_of(r["base"], r["style"])
        by_base.setdefault(r["base"], {}).setdefault(r["style"], set()).add(r["split"])
    for styles in by_base.values():
        assert all(len(splits) == 1 for splits in styles.values())  # every tone of (emoji, style) together
        assert "train" in set().union(*styles.values())  # each emoji is seen in training in some style
    assert {r["split"] for r in records} == {"train", "test"}
    # Pinned outcomes: changing the rule silently would move emoji between splits.
    assert [[split_of(u, s) for s in ("google", "twitter")] for u in ("1F600", "1F91D", "1F34E", "2764-FE0F")] == [
        ["train", "test"],
        ["test", "train"],
        ["train", "train"],
        ["train", "train"],
    ]
    assert split_of("2764-FE0F", "google") == split_of("2764", "google") == split_of("2764-fe0f", "google")
    held = np.mean([any(split_of(f"{cp:X}", s) == "test" for s in catalog.STYLES) for cp in range(0x1F300, 0x1FB00)])
    assert 0.07 < held < 0.13


def test_captions_vary_and_keep_the_label(records):
    rng = random.Random(0)
    for r in records:
        drawn = [caption(r, rng) for _ in range(40)]
        assert len(set(drawn)) > 5
        assert all(r["label"] in c for c in drawn)
        assert all(approx_tokens(c) <= MAX_WORDS for c in drawn)
    tone = next(r for r in records if r["unified"] == "1F44B-1F3FE" and r["style"] == "twitter")
    drawn = [caption(tone, rng) for _ in range(200)]
    assert any("medium-dark skin tone" in c for c in drawn)
    assert any("twemoji style" in c for c in drawn) and any("twitter style" in c for c in drawn)
    assert not any("google" in c or "noto" in c for c in drawn)
    assert any(not c.startswith("waving hand") for c in drawn)
    assert canonical_caption(tone) == "waving hand, medium-dark skin tone, twitter style"


def test_canonical_caption_is_deterministic(records):
    apple = next(r for r in records if r["unified"] == "1F34E" and r["style"] == "google")
    assert canonical_caption(apple) == "red apple, google style"
    mixed = next(r for r in records if r["unified"] == "1FAF1-1F3FB-200D-1FAF2-1F3FF" and r["style"] == "google")
    assert canonical_caption(mixed) == "handshake, light skin tone, dark skin tone, google style"


def test_missing_manifest_is_a_clear_error(tmp_path):
    for name in (catalog.IMAGES_FILE, catalog.METADATA_FILE):
        shutil.copy(FIXTURE / name, tmp_path / name)
    with pytest.raises(
        DatasetNotFoundError, match=re.escape(f"no emoji dataset at {tmp_path}; run `dreamlab data emoji`")
    ):
        EmojiDataset(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="no emoji dataset"):
        load_metadata(tmp_path / "nowhere")


def test_modified_images_fail_verification(tmp_path):
    for name in (catalog.IMAGES_FILE, catalog.METADATA_FILE, catalog.MANIFEST_FILE):
        shutil.copy(FIXTURE / name, tmp_path / name)
    images = np.load(tmp_path / catalog.IMAGES_FILE)
    images[0, 0, 0, 0] ^= 1
    np.save(tmp_path / catalog.IMAGES_FILE, images)
    EmojiDataset(tmp_path)  # not hashed without verify
    with pytest.raises(IntegrityError, match=r"images\.npy: sha256 \w+ does not match the manifest"):
        EmojiDataset(tmp_path, verify=True)


def _fake_npm(bin_dir: Path, script: str) -> None:
    """An executable ``npm`` on a PATH of its own: the fetch runs its real subprocess code with no network."""
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text("#!/bin/sh\n" + script)
    npm.chmod(npm.stat().st_mode | stat.S_IEXEC)


def test_checksum_mismatch_raises_integrity_error(tmp_path, monkeypatch):
    _fake_npm(
        tmp_path / "bin", 'printf "not the real tarball" > emojibase-data-17.0.0.tgz\necho emojibase-data-17.0.0.tgz\n'
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    cache = tmp_path / "cache"
    with pytest.raises(IntegrityError) as info:
        emoji.fetch_package(emoji.LABELS_PACKAGE, cache)
    message = str(info.value)
    assert "emojibase-data-17.0.0.tgz" in message and emoji.LABELS_PACKAGE.sha256 in message
    assert f"got {hashlib.sha256(b'not the real tarball').hexdigest()}" in message
    assert "\n" not in message
    assert not (cache / "emojibase-data-17.0.0.tgz").exists()  # an unverified tarball never enters the cache


def test_cached_tarball_with_matching_hash_is_reused_without_npm(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    tarball = tmp_path / "emojibase-data-17.0.0.tgz"
    tarball.write_bytes(b"pretend tarball")
    package = emoji.NpmPackage("emojibase-data", "17.0.0", catalog.sha256_file(tarball), "MIT", "test")
    assert emoji.fetch_package(package, tmp_path) == tarball


def test_missing_npm_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        emoji.NpmError, match=r"^npm is not installed; install Node\.js/npm to fetch the emoji packages$"
    ):
        emoji.build_emoji_dataset(tmp_path / "out", cache_dir=tmp_path / "cache", progress=False)
    assert not (tmp_path / "out").exists()


def test_npm_failure_reports_npm_reason(tmp_path, monkeypatch):
    _fake_npm(
        tmp_path / "bin",
        "echo 'npm error code ETARGET' >&2\n"
        "echo 'npm error notarget No matching version found for emojibase-data@17.0.0.' >&2\n"
        "echo 'npm error A complete log of this run can be found in: /tmp/x.log' >&2\nexit 1\n",
    )
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(
        emoji.NpmError, match=r"npm pack emojibase-data@17.0.0` failed \(exit 1\): notarget No matching version"
    ):
        emoji.fetch_package(emoji.LABELS_PACKAGE, tmp_path / "cache")


def test_forbidden_and_unknown_styles_are_refused(tmp_path):
    with pytest.raises(InvalidRequestError, match="'apple' is not allowed: its license"):
        emoji.build_emoji_dataset(tmp_path, styles=("google", "apple"))
    with pytest.raises(InvalidRequestError, match="unknown emoji style 'noto'"):
        emoji.build_emoji_dataset(tmp_path, styles=("noto",))


def test_corrupt_png_is_a_value_error():
    with pytest.raises(ValueError, match="unreadable PNG"):
        emoji.decode_png(b"\x89PNG\r\n\x1a\n truncated")


def test_cli_registers_emoji_under_data():
    parser = argparse.ArgumentParser(prog="dreamlab")
    data = parser.add_subparsers(dest="command").add_parser("data").add_subparsers(dest="data_command")
    emoji.add_cli(data)
    args = parser.parse_args(["data", "emoji", "--out", "/tmp/x", "--styles", "twitter"])
    assert args.out == Path("/tmp/x") and args.styles == ("twitter",) and callable(args.func)
    assert parser.parse_args(["data", "emoji"]).styles == ("google", "twitter")
    with pytest.raises(SystemExit):
        parser.parse_args(["data", "emoji", "--styles", "apple"])


def test_errors_are_dreamlab_errors():
    assert issubclass(emoji.NpmError, DreamlabError) and issubclass(DatasetNotFoundError, DreamlabError)


def test_notice_ships_with_the_fixture():
    notice = (FIXTURE / catalog.NOTICE_FILE).read_text(encoding="utf-8")
    assert "Copyright 2020 Twitter, Inc and other contributors" in notice and "CC-BY 4.0" in notice
    assert json.loads((FIXTURE / catalog.MANIFEST_FILE).read_text())["subset"] == "fixture"
    assert os.path.getsize(FIXTURE / catalog.IMAGES_FILE) < 600_000


def _tarball(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def fake_cache(tmp_path, monkeypatch) -> Path:
    """A tarball cache holding tiny twitter-art and emojibase packages, with the pinned hashes patched to theirs.

    Three emoji: red heart, waving hand (no emojibase entry) and a waving-hand tone whose PNG is corrupt.
    PATH is emptied: the tarballs are cached and verified, so npm must never be needed.
    """
    cache = tmp_path / "cache"
    cache.mkdir()
    png = io.BytesIO()
    Image.new("RGBA", (64, 64), (200, 30, 30, 255)).save(png, format="PNG")
    emoji_json = [
        {
            "name": "HEAVY BLACK HEART",
            "unified": "2764-FE0F",
            "image": "2764-fe0f.png",
            "category": "Smileys & Emotion",
            "subcategory": "heart",
            "sort_order": 2,
        },
        {
            "name": "WAVING HAND SIGN",
            "unified": "1F44B",
            "image": "1f44b.png",
            "category": "People & Body",
            "subcategory": "hand-fingers-open",
            "sort_order": 1,
            "skin_variations": {"1F3FF": {"unified": "1F44B-1F3FF", "image": "1f44b-1f3ff.png"}},
        },
    ]
    art = cache / "emoji-datasource-twitter-16.0.0.tgz"
    _tarball(
        art,
        {
            "package/emoji.json": json.dumps(emoji_json).encode(),
            "package/img/twitter/64/2764-fe0f.png": png.getvalue(),
            "package/img/twitter/64/1f44b.png": png.getvalue(),
            "package/img/twitter/64/1f44b-1f3ff.png": b"\x89PNG broken",
        },
    )
    labels = cache / "emojibase-data-17.0.0.tgz"
    _tarball(
        labels,
        {"package/en/data.json": json.dumps([{"label": "red heart", "hexcode": "2764", "tags": ["love"]}]).encode()},
    )
    twitter = dataclasses.replace(emoji.ART_PACKAGES["twitter"], sha256=catalog.sha256_file(art))
    monkeypatch.setitem(emoji.ART_PACKAGES, "twitter", twitter)
    monkeypatch.setattr(
        emoji, "LABELS_PACKAGE", dataclasses.replace(emoji.LABELS_PACKAGE, sha256=catalog.sha256_file(labels))
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    return cache


def test_build_from_small_fake_packages_skips_bad_pngs(fake_cache, tmp_path, monkeypatch, capsys):
    """The whole build offline, through the CLI handler."""
    parser = argparse.ArgumentParser()
    emoji.add_cli(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["emoji", "--out", str(out), "--cache", str(fake_cache), "--styles", "twitter"])
    with pytest.warns(UserWarning, match="skipped 1 missing or unreadable emoji PNGs"):
        assert args.func(args) == 0
    assert "built 2 emoji images (twitter" in capsys.readouterr().out

    manifest = check_dataset(out, verify=True)
    assert sorted(p.name for p in out.iterdir()) == ["NOTICE.txt", "images.npy", "manifest.json", "metadata.jsonl"]
    assert [s["unified"] for s in manifest["skipped"]] == ["1F44B-1F3FF"]
    assert manifest["unlabeled"] == ["1F44B"] and manifest["exact_duplicates"]["twitter"] == [["1F44B", "2764-FE0F"]]
    first, second = load_metadata(out)
    assert (first["unified"], first["label"], first["tags"]) == (
        "1F44B",
        "waving hand sign",
        [],
    )  # name fallback, CLDR order
    assert (second["label"], second["tags"], second["index"]) == ("red heart", ["love"], 1)

    monkeypatch.setitem(emoji.EXCLUDED, ("twitter", "2764-FE0F"), "drawn as something else")
    with pytest.warns(UserWarning):
        emoji.build_emoji_dataset(out, cache_dir=fake_cache, styles=["twitter"], progress=False)
    manifest = check_dataset(out, verify=True)
    assert manifest["count"] == 1 and manifest["excluded"] == [
        {"style": "twitter", "unified": "2764-FE0F", "reason": "drawn as something else"}
    ]
    assert [r["unified"] for r in load_metadata(out)] == ["1F44B"]


def test_interrupted_rebuild_leaves_no_complete_looking_dataset(fake_cache, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(FIXTURE, out)
    check_dataset(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(emoji.np, "save", killed)
    with pytest.raises(KeyboardInterrupt), pytest.warns(UserWarning):
        emoji.build_emoji_dataset(out, cache_dir=fake_cache, styles=["twitter"], progress=False)
    with pytest.raises(DatasetNotFoundError, match="no emoji dataset at"):
        check_dataset(out)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
