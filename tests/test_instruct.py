"""Instruction editing (InstructPix2Pix, docs/control.md): the 8-channel model made from a base, its
guidance through the generate path, the data recipe, the trainer and the CLI."""

from __future__ import annotations

import io
import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.cli import main
from dreamlab.errors import InvalidRequestError
from dreamlab.generate import encode_image, generate, make_request
from dreamlab.loading.model import load_model


def _picture(path, size=16, seed=1):
    arr = np.random.default_rng(seed).integers(0, 256, (size, size, 4), dtype=np.uint8)
    arr[..., 3] = 255
    Image.fromarray(arr, "RGBA").save(path)
    return path


def make_instruct_model(base_dir, dest, *, perturb: bool = False):
    """An instruction model folder from a tiny base: its UNet with 4 more (zero) input channels."""
    from dreamlab.train.instruct import instruct_unet_from

    shutil.copytree(base_dir, dest)
    base = load_model(base_dir)
    unet = instruct_unet_from(base.unet)
    if perturb:  # make the source matter
        with torch.no_grad():
            unet.conv_in.weight[:, 4:].normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    shutil.rmtree(dest / "unet")
    unet.save_pretrained(dest / "unet")
    spec = json.loads((dest / "dreamlab.json").read_text())
    spec.update(name="tiny-instruct", inputs=["source_image"], defaults={"image_cfg_scale": 1.5})
    (dest / "dreamlab.json").write_text(json.dumps(spec))
    return dest


@pytest.fixture(scope="module")
def instruct_dirs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("instruct")
    return (make_instruct_model(tiny_dir, root / "fresh"), make_instruct_model(tiny_dir, root / "trained", perturb=True),
            _picture(root / "src.png"))


def test_the_new_input_channels_start_at_zero_so_the_copy_is_the_base(tiny_unet):
    from dreamlab.train.instruct import instruct_unet_from

    unet = instruct_unet_from(tiny_unet)
    assert unet.config.in_channels == 8 and torch.all(unet.conv_in.weight[:, 4:] == 0)
    g = torch.Generator().manual_seed(0)
    x, tokens = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    t = torch.tensor([10, 700])
    want = tiny_unet(x, t, tokens).sample
    for source in (torch.zeros_like(x), torch.randn(x.shape, generator=g)):
        assert torch.allclose(unet(torch.cat([x, source], 1), t, tokens).sample, want, atol=1e-6)


def test_a_fresh_instruction_model_edits_nothing_in_and_is_the_base_under_cfg(tiny_dir, instruct_dirs):
    fresh, _, src = instruct_dirs
    base, model = load_model(tiny_dir), load_model(fresh)
    kw = dict(prompt="red apple", seed=3, steps=4, cfg_scale=4.0)
    want = generate(base, make_request(**kw)).pixels
    for s_i in (1.0, 1.5):  # the source is ignored, so x0(0,0) = x0(I,0): both guidances are plain CFG
        got = generate(model, make_request(**kw, source_image=encode_image(src), image_cfg_scale=s_i)).pixels
        assert torch.allclose(got, want, atol=1e-4)


def _rows_per_step(model, req):
    seen = []
    unet = model.unet
    hook = unet.register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[0]), with_kwargs=True)
    try:
        generate(model, req)
    finally:
        hook.remove()
    return set(seen)


def test_image_and_text_guidance_is_one_batched_forward_of_three_rows(instruct_dirs):
    _, trained, src = instruct_dirs
    model = load_model(trained)
    req = dict(prompt="make it blue", seed=0, steps=3, source_image=encode_image(src))
    assert _rows_per_step(model, make_request(**req, cfg_scale=5.0, image_cfg_scale=1.5)) == {3}
    assert _rows_per_step(model, make_request(**req, cfg_scale=5.0, image_cfg_scale=1.0)) == {2}
    assert _rows_per_step(model, make_request(**req, cfg_scale=1.0, image_cfg_scale=1.0)) == {1}


def test_the_source_image_changes_a_trained_models_output_and_the_scales_matter(instruct_dirs):
    _, trained, src = instruct_dirs
    other = _picture(src.with_name("other.png"), seed=7)
    model = load_model(trained)
    kw = dict(prompt="make it blue", seed=0, steps=4, cfg_scale=5.0)
    a = generate(model, make_request(**kw, source_image=encode_image(src))).pixels
    b = generate(model, make_request(**kw, source_image=encode_image(other))).pixels
    c = generate(model, make_request(**kw, source_image=encode_image(src), image_cfg_scale=3.0)).pixels
    assert (a - b).abs().mean() > 1e-3 and (a - c).abs().mean() > 1e-3
    # the default s_I is the model's (1.5 in its dreamlab.json), recorded in the manifest
    res = generate(model, make_request(**kw, source_image=encode_image(src)))
    assert res.manifests[0]["request"]["image_cfg_scale"] == 1.5
    assert torch.equal(res.pixels, a)


def test_bad_instruction_requests_get_one_line(tiny, instruct_dirs):
    _, trained, src = instruct_dirs
    model = load_model(trained)
    with pytest.raises(InvalidRequestError, match="instruction-editing model .* give it the image to edit"):
        generate(model, make_request(prompt="make it blue", steps=2))
    with pytest.raises(InvalidRequestError, match="source_image is for instruction-editing models"):
        generate(tiny, make_request(prompt="x", steps=2, source_image=encode_image(src)))
    with pytest.raises(InvalidRequestError, match="image_cfg_scale is for instruction-editing models"):
        generate(tiny, make_request(prompt="x", steps=2, image_cfg_scale=2.0))
    with pytest.raises(InvalidRequestError, match="no regions.*prompt-to-prompt edits"):
        generate(model, make_request(prompt="x", steps=2, source_image=encode_image(src), edit={"target": "y"}))


def test_dreamlab_instruct_writes_an_image_that_replays(instruct_dirs, tmp_path, capsys):
    _, trained, src = instruct_dirs
    out = tmp_path / "edit.png"
    assert main(["instruct", str(src), "make it blue", "--model", str(trained), "-o", str(out), "--seed", "2",
                 "--steps", "3", "--image-cfg", "1.2", "--cfg", "4", "-q"]) == 0
    capsys.readouterr()
    assert main(["replay", str(out), "-o", str(tmp_path / "again.png")]) == 2
    assert "--source-image" in capsys.readouterr().err
    assert main(["replay", str(out), "--source-image", str(src), "-o", str(tmp_path / "again.png")]) == 0
    assert "identical" in capsys.readouterr().out
    assert main(["instruct", str(tmp_path / "missing.png"), "make it blue", "--model", str(trained)]) == 2
    assert capsys.readouterr().err.count("\n") == 1


# ------------------------------------------------------------------------------------------ the data


def _records():
    def rec(label, sub, style="google", split="train", tone=None, base=None, unified=None):
        u = unified or label
        return {"label": label, "subcategory": sub, "style": style, "split": split, "skin_tone": tone,
                "skin_tones": [tone] if tone else [], "base": base or u, "unified": u}

    return [rec("red heart", "heart"), rec("blue heart", "heart"), rec("green heart", "heart", split="test"),
            rec("cat face", "animal-mammal"), rec("dog face", "animal-mammal"), rec("cat face", "animal-mammal", "twitter"),
            rec("smiling face", "face-smiling"), rec("smiling face with halo", "face-smiling"),
            rec("thumbs up", "hand-fingers-closed"),
            rec("thumbs up", "hand-fingers-closed", tone="dark", base="thumbs up", unified="thumbs up dark")]


def test_the_edit_catalog_draws_every_kind_from_the_training_split_only():
    from dreamlab.data.instruct import draw_edits, edit_catalog

    cat = edit_catalog(_records())
    assert ("red heart", "blue heart", "google", {"colour": "blue", "noun": "heart"}) in cat["colour"]
    assert not any("green heart" in (a, b) for a, b, *_ in cat["colour"])  # test split: never used
    assert ("cat face", "dog face", "google", {"a": "cat face", "b": "dog face"}) in cat["swap"]
    assert [e[:2] for e in cat["add"]] == [("smiling face", "smiling face with halo")]
    assert [e[:2] for e in cat["remove"]] == [("smiling face with halo", "smiling face")]
    assert {e[3]["to"] for e in cat["style"]} == {"google", "twitter"}
    assert [e[3]["tone"] for e in cat["tone"]] == ["dark"]
    edits = list(draw_edits(_records(), 14, seed=0))
    assert edits == list(draw_edits(_records(), 14, seed=0))  # deterministic
    assert {e.kind for _, e in edits} == {"colour", "swap", "style", "tone", "add", "remove"}
    tone = next(e for _, e in edits if e.kind == "tone")
    assert tone.source == "thumbs up, google style" and tone.target == "thumbs up, dark skin tone, google style"
    assert "dark" in tone.instruction


def test_instructions_use_an_before_a_vowel():
    from dreamlab.data.instruct import _articles

    assert _articles("make it a apple") == "make it an apple"
    assert _articles("make it a dog") == "make it a dog"


def test_the_conditioning_dropouts_take_five_percent_each():
    from dreamlab.train.instruct import draw_batch

    n = 50
    data = {"source": torch.ones(n, 4, 2, 2), "edited_mean": torch.zeros(n, 4, 2, 2), "edited_std": torch.zeros(n, 4, 2, 2),
            "row": torch.arange(n), "tokens": torch.ones(n, 3, 4, dtype=torch.float16), "mask": torch.ones(n, 3, dtype=torch.uint8),
            "empty_tokens": torch.zeros(1, 3, 4, dtype=torch.float16), "empty_mask": torch.zeros(1, 3, dtype=torch.uint8)}
    _, source, tokens, _, _, _ = draw_batch(data, 40000, 0.05, 1000, torch.Generator().manual_seed(0))
    no_image = source.flatten(1).sum(1) == 0
    no_text = tokens.flatten(1).sum(1) == 0
    for share in ((no_text & ~no_image), (no_image & ~no_text), (no_text & no_image)):
        assert abs(share.float().mean().item() - 0.05) < 0.005


def test_the_trainer_runs_resumes_and_exports_an_instruction_model(tiny_dir, tmp_path):
    from dreamlab.settings import InstructConfig
    from dreamlab.train.instruct import train_instruct

    pairs = tmp_path / "pairs"
    (pairs / "images").mkdir(parents=True)
    rows = []
    for i in range(6):
        row = {"id": i, "kind": "colour", "instruction": random.Random(i).choice(["make it red", "make it blue"]),
               "kept": True, "source_file": f"images/{i:06d}-source.png", "edited_file": f"images/{i:06d}-edited.png"}
        _picture(pairs / row["source_file"], seed=i)
        _picture(pairs / row["edited_file"], seed=100 + i)
        rows.append(row)
    rows.append({"id": 6, "kind": "colour", "instruction": "x", "kept": False})
    (pairs / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = InstructConfig(data=str(pairs), out=str(tmp_path / "run"), base=str(tiny_dir), steps=3, batch_size=4,
                         ckpt_every=2, snapshot_every=3, log_every=1)
    out = train_instruct(cfg)
    model = load_model(out)
    assert model.inputs == ("source_image",) and model.unet.config.in_channels == 8
    assert json.loads((out / "dreamlab.json").read_text())["training"]["pairs"] == 6
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in log)
    again = train_instruct(InstructConfig(**{**cfg.__dict__, "steps": 4}))  # resumes from the step-3 checkpoint
    assert json.loads((again / "dreamlab.json").read_text())["training"]["steps"] == 4
    src = pairs / rows[0]["source_file"]
    res = generate(load_model(again), make_request(prompt="make it red", steps=2, source_image=encode_image(src)))
    assert res.images[0].size == (16, 16)


def test_a_source_image_sent_to_the_base_model_goes_to_its_instruction_model(tiny_dir, instruct_dirs, tmp_path,
                                                                              monkeypatch):
    from dreamlab.models.controlnet import base_hash

    _, trained, src = instruct_dirs
    base = load_model(tiny_dir)
    library = tmp_path / "models"
    shutil.copytree(trained, library / "edit")
    spec = json.loads((library / "edit" / "dreamlab.json").read_text())
    spec["instruct"] = {"base": base.name, "base_unet": base_hash(base.files)}
    (library / "edit" / "dreamlab.json").write_text(json.dumps(spec))
    req = make_request(prompt="make it blue", seed=1, steps=3, source_image=encode_image(src))
    with pytest.raises(InvalidRequestError, match="source_image is for instruction-editing models"):
        generate(base, req)  # none installed for it
    monkeypatch.setenv("DREAMLAB_MODELS", str(library))
    base = load_model(tiny_dir)
    res = generate(base, req)
    assert res.records[0].model.source == str((library / "edit").resolve())
    assert torch.equal(res.pixels, generate(load_model(library / "edit"), req).pixels)
    assert torch.equal(generate(base, make_request(prompt="red apple", seed=1, steps=3)).pixels,
                       generate(load_model(tiny_dir), make_request(prompt="red apple", seed=1, steps=3)).pixels)


def test_the_http_api_runs_an_instruction_edit_and_keeps_its_source(instruct_dirs, tmp_path):
    import time

    from fastapi.testclient import TestClient

    from dreamlab.server.app import create_app

    _, trained, src = instruct_dirs
    model = load_model(trained)
    body = {"prompt": "make it blue", "steps": 3, "seed": 4, "source_image": encode_image(src), "image_cfg_scale": 1.3}
    with TestClient(create_app(model, tmp_path / "data", ui=False)) as client:
        assert client.post("/api/jobs", json={"prompt": "make it blue", "steps": 3}).status_code == 422
        job_id = client.post("/api/jobs", json=body).json()["id"]
        for _ in range(3000):
            job = client.get(f"/api/jobs/{job_id}").json()
            if job["state"] in ("done", "failed", "cancelled"):
                break
            time.sleep(0.02)
        assert job["state"] == "done", job
        out = np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)))
    assert np.array_equal(out, np.asarray(generate(model, make_request(**body)).images[0]))


def test_dreamlab_eval_scores_an_instruction_model_on_held_out_edits(instruct_dirs, tmp_path, capsys):
    from pathlib import Path

    _, trained, _ = instruct_dirs
    fixture = Path(__file__).parent / "fixtures" / "emoji"
    out = tmp_path / "scores.json"
    assert main(["eval", "--model", str(trained), "--data", str(fixture), "--prompts", "3", "--steps", "2",
                 "--json", str(out)]) == 0
    assert "3 held-out edits at s_I 1.5, s_T 5" in capsys.readouterr().out
    scores = json.loads(out.read_text())
    assert scores["n"] == 3 and scores["sources"]["cos"] == pytest.approx(1.0, abs=1e-5)
    if scores["edit_top5"] is not None:  # the fixture's held-out emoji may allow only tone and style edits
        assert scores["edit_gain"] == pytest.approx(scores["edit_top5"] - scores["sources"]["edit_top5"])
    assert scores["sources"]["iou"] == 1.0


def test_balanced_drawing_gives_every_edit_kind_the_same_share():
    from dreamlab.train.instruct import draw_batch, pair_weights

    kind = torch.tensor([0] * 8 + [1] * 2)  # 8 pairs of one kind, 2 of another; both flips cached
    n = 20
    data = {"source": torch.arange(n).float().view(n, 1, 1, 1).expand(n, 4, 2, 2).contiguous(),
            "edited_mean": torch.zeros(n, 4, 2, 2), "edited_std": torch.zeros(n, 4, 2, 2),
            "row": torch.arange(10).repeat(2), "kind": kind, "tokens": torch.ones(10, 3, 4, dtype=torch.float16),
            "mask": torch.ones(10, 3, dtype=torch.uint8), "empty_tokens": torch.zeros(1, 3, 4, dtype=torch.float16),
            "empty_mask": torch.zeros(1, 3, dtype=torch.uint8)}
    w = pair_weights(data, True)
    assert float(w[kind[data["row"]] == 1].sum()) == pytest.approx(0.5)
    assert torch.allclose(pair_weights(data, False), torch.full((n,), 1 / n, dtype=torch.float64))
    _, source, *_ = draw_batch(data, 20000, 0.0, 1000, torch.Generator().manual_seed(0), w)
    drawn = source[:, 0, 0, 0].long()
    share = (kind[data["row"][drawn]] == 1).float().mean().item()
    assert abs(share - 0.5) < 0.02


def test_named_models_are_the_shipped_folders_and_a_missing_one_says_so(tmp_path, monkeypatch, capsys):
    from dreamlab.loading import model as loading

    monkeypatch.setattr(loading, "SHIPPED_DIR", tmp_path / "weights")
    (tmp_path / "weights" / "instruct" / "unet").mkdir(parents=True)
    assert loading.named_model("instruct") == tmp_path / "weights" / "instruct"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast").mkdir()  # a folder of that name in the working directory wins
    assert loading.named_model("fast").resolve() == tmp_path / "fast"
    (tmp_path / "fast").rmdir()
    assert main(["generate", "x", "--model", "fast", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert "no model named 'fast' ships with this dreamlab (named models here: default, instruct)" in err
    assert err.count("\n") == 1


def test_a_source_of_another_size_is_resized_and_said_so(instruct_dirs, tmp_path):
    _, trained, _ = instruct_dirs
    big = _picture(tmp_path / "big.png", size=32)
    model = load_model(trained)
    res = generate(model, make_request(prompt="make it blue", steps=2, seed=0, source_image=encode_image(big)))
    assert res.images[0].size == (16, 16)
    assert any("source image 32x32 resized to 16x16" in n for n in res.notes)
    same = generate(model, make_request(prompt="make it blue", steps=2, seed=0,
                                        source_image=encode_image(_picture(tmp_path / "s.png"))))
    assert not same.notes
