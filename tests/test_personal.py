"""Personalization: textual inversion, LoRA (peft) and DreamBooth trainers, adapter files and formats, and
adapters as scoped patches of a request (docs/personalization.md). Tiny random models; seconds."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from dreamlab.adapters.embedding import Embedding, read_embedding, save_embedding
from dreamlab.adapters.lora import LoraLayer, LoraWeights, lora_deltas, read_lora, save_kohya, save_lora
from dreamlab.errors import DreamlabError, InvalidRequestError
from dreamlab.generate import generate
from dreamlab.loading.model import load_model
from dreamlab.request import lora_tags, make_request
from dreamlab.settings import EmbeddingConfig, LoraTrainConfig


@pytest.fixture()
def shots(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        a = np.zeros((16, 16, 4), np.uint8)
        a[4:12, 4:12] = [200, 40 + 60 * i, 30, 255]
        a[4:12, 4:12, :3] += rng.integers(0, 20, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(a, "RGBA").save(folder / f"img{i}.png")
    (folder / "img0.txt").write_text("red apple")
    (folder / "notes.md").write_text("not an image")
    return folder


@pytest.fixture()
def model(tiny_dir):
    return load_model(tiny_dir)


def _lora_for(model, rank=2, seed=0) -> LoraWeights:
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, mod in model.unet.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_v")):
            out_f, in_f = mod.weight.shape
            layers[name] = LoraLayer(torch.randn(rank, in_f, generator=g) * 0.3, torch.randn(out_f, rank, generator=g) * 0.3, 1.0)
    return LoraWeights({"unet": layers})


def _req(**kw):
    return make_request(prompt="red apple", seed=3, steps=4, **kw)


# --- textual inversion -------------------------------------------------------------------------------


def test_textual_inversion_lowers_loss_and_changes_only_the_new_token(tiny_dir, shots, tmp_path, model):
    from dreamlab.train.embedding import train_embedding
    from dreamlab.train.personal import Loop  # noqa: F401

    before = model.text_encoder.model.get_input_embeddings().weight.detach().clone()
    out = train_embedding(EmbeddingConfig(images=str(shots), token="<my-thing>", out=str(tmp_path / "emb"), init_word="apple",
                                          base=str(tiny_dir), steps=30, batch_size=3, lr=5e-2, samples=False, log_every=1))
    import json

    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    first, last = np.mean([r["loss"] for r in log[:5]]), np.mean([r["loss"] for r in log[-5:]])
    assert last < first
    emb = read_embedding(out)
    assert emb.token == "<my-thing>" and emb.vectors.shape == (1, 16)
    # the text encoder is untouched (its table is the same tensor values) and the vector moved from its init
    loaded = load_model(tiny_dir)
    assert torch.equal(loaded.text_encoder.model.get_input_embeddings().weight, before)
    init = before[loaded.text_encoder.tokenizer("apple", add_special_tokens=False)["input_ids"]].mean(0)
    assert not torch.allclose(emb.vectors[0], init)
    assert json.loads((out / "dreamlab_embedding.json").read_text())["images"].keys() == {"img0.png", "img1.png", "img2.png"}


def test_embedding_not_in_the_prompt_leaves_the_image_bit_identical(model, tmp_path):
    base = generate(model, _req()).pixels
    save_embedding(Embedding("<zz>", torch.randn(2, 16)), tmp_path / "e")
    model.adapters.register(tmp_path / "e", "embedding")
    try:
        same = generate(model, _req())
        assert torch.equal(same.pixels, base) and same.records[0].adapters is None
        used = generate(model, make_request(prompt="<zz> apple", seed=3, steps=4))
        assert used.records[0].adapters[0].kind == "embedding" and used.records[0].adapters[0].name == "<zz>"
        # after the request the tokenizer and table are the model's own again
        assert "<zz>" not in model.text_encoder.tokenizer.get_vocab()
        assert torch.equal(generate(model, _req()).pixels, base)
    finally:
        model.adapters.registered["embedding"].clear()


def test_token_already_in_the_vocabulary_is_refused(tiny_dir, shots, tmp_path):
    from dreamlab.train.embedding import train_embedding

    with pytest.raises(DreamlabError, match="already exists in the text encoder's vocabulary"):
        train_embedding(EmbeddingConfig(images=str(shots), token="apple", out=str(tmp_path / "e"), base=str(tiny_dir), steps=1))


def test_folder_without_readable_images_is_one_line(tiny_dir, tmp_path):
    from dreamlab.train.embedding import train_embedding

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DreamlabError, match=r"holds no readable images \(1 could not be read: broken.png\)"):
        train_embedding(EmbeddingConfig(images=str(tmp_path / "empty"), token="<x>", out=str(tmp_path / "e"), base=str(tiny_dir), steps=1))


# --- LoRA --------------------------------------------------------------------------------------------


def test_lora_at_scale_zero_is_the_base_model_and_does_not_leak(model, tmp_path):
    base = generate(model, _req()).pixels
    save_lora(_lora_for(model), tmp_path / "my-lora")
    model.adapters.register(tmp_path / "my-lora", "lora")
    try:
        zero = generate(model, _req(loras=[{"name": "my-lora", "scale": 0.0}]))
        assert torch.equal(zero.pixels, base)
        on = generate(model, make_request(prompt="red apple <lora:my-lora:1.0>", seed=3, steps=4))
        assert not torch.equal(on.pixels, base)
        rec = on.records[0].adapters[0]
        assert (rec.kind, rec.name, rec.scale) == ("lora", "my-lora", 1.0) and rec.files
        assert on.records[0].request["prompt"] == "red apple"
        assert torch.equal(generate(model, _req()).pixels, base)  # the next request: weights back bit for bit
    finally:
        model.adapters.registered["lora"].clear()


def test_kohya_round_trip_gives_the_same_weights(model, tmp_path):
    lora = _lora_for(model)
    save_kohya(lora, tmp_path / "k.safetensors")
    back = read_lora(tmp_path / "k.safetensors")
    a, b = lora_deltas(lora, model)["unet"], lora_deltas(back, model)["unet"]
    assert a.keys() == b.keys()
    for k in a:  # fp16 files
        torch.testing.assert_close(a[k], b[k], rtol=2e-3, atol=2e-3)
    save_lora(lora, tmp_path / "folder")
    c = lora_deltas(read_lora(tmp_path / "folder"), model)["unet"]
    for k in a:
        torch.testing.assert_close(a[k], c[k], rtol=2e-3, atol=2e-3)


def test_lora_for_another_architecture_names_the_first_mismatching_key(model, tmp_path):
    from safetensors.torch import save_file

    save_file({"lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 8),
               "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 2)}, str(tmp_path / "sd.safetensors"))
    with pytest.raises(InvalidRequestError, match="another architecture: the unet has no module down_blocks_7_attentions_0_proj_in"):
        lora_deltas(read_lora(tmp_path / "sd.safetensors"), model)


def test_pickled_adapter_needs_allow_pickle(tmp_path):
    torch.save({"<t>": torch.zeros(16)}, tmp_path / "emb.pt")
    with pytest.raises(DreamlabError, match="pickle"):
        read_embedding(tmp_path / "emb.pt")
    assert read_embedding(tmp_path / "emb.pt", allow_pickle=True).token == "<t>"
    (tmp_path / "l").mkdir()
    torch.save({}, tmp_path / "l" / "adapter_model.bin")
    with pytest.raises(DreamlabError, match="--allow-pickle"):
        read_lora(tmp_path / "l")


def test_missing_lora_name_is_one_line(model):
    with pytest.raises(InvalidRequestError, match="no LoRA named 'nope'"):
        generate(model, make_request(prompt="red apple <lora:nope:0.5>", seed=0, steps=2))


def test_lora_tag_syntax():
    assert lora_tags("a cat <lora:style-a:0.8>, snow") == ("a cat , snow", [{"name": "style-a", "scale": 0.8}])
    assert lora_tags("<lora:b>") == ("", [{"name": "b", "scale": 1.0}])
    with pytest.raises(InvalidRequestError):
        make_request(prompt="x <lora:../../etc:1>")


def test_lora_training_with_prior_preservation_computes_both_terms(tiny_dir, shots, tmp_path):
    import json

    from dreamlab.train.lora import train_lora

    out = train_lora(LoraTrainConfig(images=str(shots), instance="a sks apple", class_prompt="a apple", class_images=2,
                                     out=str(tmp_path / "db"), base=str(tiny_dir), steps=3, batch_size=2, rank=2,
                                     samples=False, log_every=1))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert all("instance" in r and "prior" in r and abs(r["loss"] - r["instance"] - r["prior"]) < 1e-5 for r in log)
    assert len(list((out / "class_images").glob("*.png"))) == 2
    lora = read_lora(out)
    assert lora.meta["class_prompt"] == "a apple" and {l.rank for l in lora.layers["unet"].values()} == {2}
    kohya = read_lora(out / "lora.safetensors")
    assert len(kohya.layers["unet"]) == len(lora.layers["unet"])
    # the base model loaded afterwards is untouched by the trainer
    assert not any("lora" in n for n, _ in load_model(tiny_dir).unet.named_parameters())


def test_lora_training_lowers_the_loss_on_its_images(tiny_dir, shots, tmp_path):
    import json

    from dreamlab.train.lora import train_lora

    out = train_lora(LoraTrainConfig(images=str(shots), instance="a sks apple", out=str(tmp_path / "l"), base=str(tiny_dir),
                                     steps=40, batch_size=3, rank=4, lr=1e-2, samples=False, log_every=1, seed=1))
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert np.mean([r["loss"] for r in log[-10:]]) < np.mean([r["loss"] for r in log[:10]])


def test_adapter_in_one_server_job_is_absent_in_the_next(model, tmp_path):
    from dreamlab.server.service import Service  # noqa: F401  (the server runs jobs through generate, as here)

    save_lora(_lora_for(model, seed=4), tmp_path / "job-lora")
    model.adapters.register(tmp_path / "job-lora", "lora")
    try:
        base = generate(model, _req()).pixels
        generate(model, _req(loras=[{"name": "job-lora", "scale": 1.5}]))
        assert torch.equal(generate(model, _req()).pixels, base)
    finally:
        model.adapters.registered["lora"].clear()


def test_replay_finds_the_adapters_again(model, tmp_path, tiny_dir):
    from dreamlab.metadata import save_png
    from dreamlab.replay import replay

    shutil.copytree(tiny_dir, tmp_path / "m")
    m = load_model(tmp_path / "m")
    save_lora(_lora_for(m, seed=5), tmp_path / "rl")
    m.adapters.register(tmp_path / "rl", "lora")
    res = generate(m, _req(loras=[{"name": "rl", "scale": 0.7}]))
    save_png(res.images[0], tmp_path / "a.png", res.manifests[0])
    out = replay(tmp_path / "a.png", tmp_path / "b.png")
    assert out.identical


# --- Imagic ------------------------------------------------------------------------------------------


def test_imagic_prepares_once_and_interpolates(model, tmp_path):
    import io

    from dreamlab.imagic import ImagicSettings, prepare

    buf = io.BytesIO()
    generate(model, _req()).images[0].save(buf, format="PNG")
    settings = ImagicSettings(embed_steps=3, tune_steps=3, rank=2, batch_size=2)
    folder = prepare(model, buf.getvalue(), "a red apple", settings, cache=tmp_path / "cache")
    stamp = (folder / "imagic.json").stat().st_mtime_ns
    assert prepare(model, buf.getvalue(), "a red apple", settings, cache=tmp_path / "cache") == folder
    assert (folder / "imagic.json").stat().st_mtime_ns == stamp  # cached: not trained again
    name = model.adapters.register(folder, "imagic")
    try:
        def at(eta):
            return generate(model, make_request(prompt="a red apple", seed=1, steps=4, imagic={"name": name, "eta": eta}))

        a, b = at(0.0), at(1.0)
        assert not torch.equal(a.pixels, b.pixels)
        assert a.records[0].adapters[0].kind == "imagic" and a.records[0].adapters[0].scale == 0.0
        plain = generate(model, make_request(prompt="a red apple", seed=1, steps=4)).pixels
        assert not torch.equal(b.pixels, plain)  # the LoRA is in
        with pytest.raises(DreamlabError, match="was prepared for the prompt"):
            generate(model, make_request(prompt="a cat", seed=1, steps=4, imagic={"name": name, "eta": 0.5}))
    finally:
        model.adapters.registered["imagic"].clear()
    with pytest.raises(DreamlabError, match="no prepared Imagic edit"):
        generate(model, make_request(prompt="a red apple", seed=1, steps=4, imagic={"name": name, "eta": 0.5}))


# --- serving -----------------------------------------------------------------------------------------


def test_server_lists_installed_adapters_and_refuses_unknown_loras(tiny_dir, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from dreamlab.server.app import create_app

    lib = tmp_path / "lib"
    monkeypatch.setenv("DREAMLAB_ADAPTERS", str(lib))
    m = load_model(tiny_dir)
    save_lora(_lora_for(m), lib / "loras" / "style-x")
    save_embedding(Embedding("<tok>", torch.randn(16)), lib / "embeddings" / "tok")
    with TestClient(create_app(m, tmp_path / "data", ui=False)) as client:
        assert client.get("/api/adapters").json() == {"loras": ["style-x"], "embeddings": ["<tok>"]}
        assert client.get("/sdapi/v1/loras").json()[0]["name"] == "style-x"
        assert client.get("/sdapi/v1/embeddings").json()["loaded"]["<tok>"]["vectors"] == 1
        r = client.post("/api/jobs", json={"prompt": "red apple <lora:nope:1>", "steps": 2})
        assert r.status_code == 422 and "no LoRA named 'nope'" in r.json()["detail"]
        r = client.post("/api/jobs", json={"prompt": "red apple", "steps": 2, "loras": [{"name": "../loras", "scale": 1}]})
        assert r.status_code == 422
        def png(body):
            import io
            import time

            r = client.post("/api/jobs", json=body)
            assert r.status_code in (200, 201, 202), r.text
            deadline = time.monotonic() + 60
            while (job := client.get(f"/api/jobs/{r.json()['id']}").json())["state"] not in ("done", "failed", "cancelled"):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            assert job["state"] == "done", job
            return np.asarray(Image.open(io.BytesIO(client.get(job["images"][0]["url"]).content)))

        plain = {"prompt": "red apple", "steps": 3, "seed": 0}
        before = png(plain)
        with_lora = png({**plain, "prompt": "red apple <lora:style-x:1.5>"})
        after = png(plain)  # the next job: the LoRA is gone from the shared model
        assert not np.array_equal(with_lora, before) and np.array_equal(after, before)


def test_ui_picker_writes_the_a1111_syntax():
    from dreamlab.server.ui_adapters import add_lora, add_token

    assert add_lora("red apple", "style-x", 0.8) == "red apple <lora:style-x:0.8>"
    assert add_lora("red apple <lora:style-x:0.8>", "style-x", 1.0) == "red apple <lora:style-x:1>"
    assert add_token("", "<tok>") == "<tok>" and add_token("a <tok>", "<tok>") == "a <tok>"
