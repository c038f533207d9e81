"""The default model and judge shipped in the package: intact, small, and working with no --model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dreamlab

WEIGHTS = Path(dreamlab.__file__).parent / "weights"
FIXTURE = Path(__file__).parent / "fixtures" / "emoji"


def test_shipped_files_match_their_checksums_and_fit_the_budget():
    from dreamlab.loading.files import sha256_file

    lines = (WEIGHTS / "SHA256SUMS").read_text().splitlines()
    listed = {rel: digest for digest, rel in (line.split("  ") for line in lines)}
    on_disk = {p.relative_to(WEIGHTS).as_posix() for p in WEIGHTS.rglob("*") if p.is_file() and p.name != "SHA256SUMS"}
    assert set(listed) == on_disk, "weights/ and weights/SHA256SUMS disagree: run `dreamlab ship` again"
    for rel, digest in listed.items():
        assert sha256_file(WEIGHTS / rel) == digest, f"{rel} does not match SHA256SUMS"
    # this round's budget: every shipped network (default model, judge, ControlNets, students) under 120 MB
    assert sum((WEIGHTS / rel).stat().st_size for rel in listed) <= 120 * 2**20
    card = (WEIGHTS / "default" / "MODEL_CARD.md").read_text()
    assert "License" in card and "top-5" in card


def test_the_default_model_records_its_training():
    spec = json.loads((WEIGHTS / "default" / "dreamlab.json").read_text())
    assert spec["sample_size"] == 64 and spec["training"]["steps"] > 0 and spec["training"]["train_hours"] > 0


def test_generate_without_model_uses_the_shipped_default(tmp_path, monkeypatch):
    from dreamlab.cli import main
    from dreamlab.metadata import read_manifest

    monkeypatch.delenv("DREAMLAB_MODEL", raising=False)
    out = tmp_path / "apple.png"
    assert main(["generate", "red apple", "-o", str(out), "--steps", "8", "-q"]) == 0
    img = Image.open(out)
    assert img.size == (64, 64) and img.mode == "RGBA"
    arr = np.asarray(img)
    # An object on a transparent background, not noise: some pixels opaque, some transparent.
    assert (arr[..., 3] > 200).mean() > 0.1 and (arr[..., 3] < 50).mean() > 0.1
    assert read_manifest(out)["request"]["prompt"] == "red apple"


def test_shipped_judge_recognises_real_held_out_style_images():
    """The judge behind `dreamlab eval` knows real emoji: top-5 on the committed fixture images."""
    from dreamlab.data.dataset import EmojiDataset
    from dreamlab.eval.judge import judge_outputs, load_judge
    from dreamlab.eval.metrics import topk_accuracy

    judge, bases, _ = load_judge(WEIGHTS / "judge")
    pos = {b: i for i, b in enumerate(bases)}
    ds = EmojiDataset(FIXTURE, split="all")
    recs = [r for r in ds.records if r["base"] in pos]
    idx = np.array([r["index"] for r in recs])
    x = torch.from_numpy(np.asarray(ds.images[idx])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)
    _, logits = judge_outputs(judge, x)
    y = torch.tensor([pos[r["base"]] for r in recs])
    top5 = topk_accuracy(logits, y)[5]
    assert len(recs) >= 20 and top5 > 0.5, f"shipped judge top-5 on fixture images: {top5:.2f}"
