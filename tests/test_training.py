"""Trainers: resumable checkpoints, a killed run, and two processes on gloo (torchrun)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreamlab.models.tiny import make_tiny_vae
from dreamlab.train.common import EMA, latest_checkpoint, lr_at
from dreamlab.train.vae import VAEConfig, train_vae

FIXTURE = Path(__file__).parent / "fixtures" / "emoji"
TINY_VAE = dict(block_out_channels=(8, 16, 16), batch_size=4, log_every=1, eval_every=2, ckpt_every=1)


def test_lr_schedule_warms_up_then_decays():
    assert lr_at(0, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100) == pytest.approx(1.0)
    assert lr_at(100, 1.0, 10, 100) == pytest.approx(0.1)
    assert lr_at(50, 1.0, 10, 100) < lr_at(20, 1.0, 10, 100)


def test_ema_tracks_the_average():
    m = torch.nn.Linear(1, 1, bias=False)
    ema = EMA(m, decay=0.5)
    m.weight.data.fill_(1.0)
    for _ in range(50):
        ema.update(m)
    target = torch.nn.Linear(1, 1, bias=False)
    ema.copy_to(target)
    assert target.weight.item() == pytest.approx(1.0, abs=1e-6)


def test_vae_training_resumes_after_a_kill(tmp_path):
    out = tmp_path / "vae"
    train_vae(VAEConfig(data=str(FIXTURE), out=str(out), steps=2, **TINY_VAE))
    assert latest_checkpoint(out).name == "step-0000002"
    assert (out / "vae" / "config.json").exists() and (out / "reconstructions.png").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["scaling_factor"] > 0 and "psnr_colour" in metrics and "psnr_alpha" in metrics
    # A run killed while writing leaves a temporary folder: it must be ignored, not resumed from.
    shutil.copytree(out / "checkpoints" / "step-0000002", out / "checkpoints" / ".tmp-step-0000003")
    (out / "checkpoints" / ".tmp-step-0000003" / "state.json").unlink()
    before = (out / "checkpoints" / "step-0000002" / "model" / "diffusion_pytorch_model.safetensors").read_bytes()
    # ... and the steps it logged after its last checkpoint are trained again, so must be logged once.
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "rec": 99.0, "time": 0.0}) + "\n")
    train_vae(VAEConfig(data=str(FIXTURE), out=str(out), steps=3, **TINY_VAE))
    state = json.loads((latest_checkpoint(out) / "state.json").read_text())
    assert state["step"] == 3
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines() if '"rec"' in l]
    assert steps == [1, 2, 3]  # resumed at 3, not restarted at 1, and the lost step 3 dropped
    assert all(json.loads(l).get("rec") != 99.0 for l in (out / "log.jsonl").read_text().splitlines())
    assert before != (latest_checkpoint(out) / "model" / "diffusion_pytorch_model.safetensors").read_bytes()


@pytest.mark.slow
def test_unet_training_with_two_processes_on_gloo(tmp_path):
    vae_dir = make_tiny_vae(tmp_path / "vae")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dreamlab.cli", "train", "unet", "--data", str(FIXTURE), "--vae", str(vae_dir), "--out", str(out),
           "--steps", "2", "--batch-size", "2", "--block-out-channels", "32,32", "--layers-per-block", "1",
           "--captions-per-image", "1", "--log-every", "1", "--ckpt-every", "1", "--snapshot-every", "1",
           "--sample-every", "1000", "--device", "cpu"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["world"] for r in log] == [2, 2]
    assert 0 < log[0]["train_hours"] < log[1]["train_hours"]  # compute is counted, and only grows
    assert latest_checkpoint(out).name == "step-0000002"
    spec = json.loads((out / "model" / "dreamlab.json").read_text())
    assert spec["text_encoder"]["source"] == "minilm"
    assert spec["training"]["steps"] == 2 and spec["training"]["world"] == 2

    # Snapshots for the alignment-vs-compute curve: fp16 on disk, float32 when loaded, one per step here.
    from safetensors.torch import load_file

    from dreamlab.loading.model import load_model

    snaps = sorted((out / "snapshots").iterdir())
    assert [p.name for p in snaps] == ["step-0000001", "step-0000002"]
    weights = load_file(str(snaps[1] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float16}
    model = load_model(snaps[1])
    assert next(model.unet.parameters()).dtype == torch.float32
    hours = [json.loads((p / "dreamlab.json").read_text())["training"]["train_hours"] for p in snaps]
    assert 0 < hours[0] < hours[1]


def test_training_starts_from_committed_weights_when_checkpoints_are_lost(tmp_path):
    from diffusers import AutoencoderKL

    first = tmp_path / "first"
    train_vae(VAEConfig(data=str(FIXTURE), out=str(first), steps=2, **TINY_VAE))
    second = tmp_path / "second"  # a new machine: no checkpoints, only the exported EMA weights
    train_vae(VAEConfig(data=str(FIXTURE), out=str(second), steps=1, lr=1e-12, init=str(first / "vae"), **TINY_VAE))
    start = AutoencoderKL.from_pretrained(first / "vae").state_dict()
    after = AutoencoderKL.from_pretrained(latest_checkpoint(second) / "model").state_dict()
    assert all(torch.allclose(start[k], after[k], atol=1e-6) for k in start)


def test_unet_training_continues_from_an_exported_model_when_checkpoints_are_lost(tmp_path):
    """The shipped default model is the fallback resume point: --init MODEL continues its count."""
    from dreamlab.errors import DreamlabError
    from dreamlab.train.unet import UNetConfig, train_unet

    tiny = dict(data=str(FIXTURE), vae=str(make_tiny_vae(tmp_path / "vae")), batch_size=2, block_out_channels=(32, 32),
                captions_per_image=1, log_every=1, ckpt_every=1, sample_every=1000, device="cpu")
    first = tmp_path / "first"
    model = train_unet(UNetConfig(out=str(first), steps=2, **tiny))
    hours = json.loads((model / "dreamlab.json").read_text())["training"]["train_hours"]
    second = tmp_path / "second"  # a new machine: no checkpoints, only the exported model folder
    with pytest.raises(DreamlabError, match="larger than 2"):
        train_unet(UNetConfig(out=str(second), steps=2, init=str(model), **tiny))
    model2 = train_unet(UNetConfig(out=str(second), steps=3, init=str(model), **tiny))
    assert [json.loads(l)["step"] for l in (second / "log.jsonl").read_text().splitlines()] == [3]
    training = json.loads((model2 / "dreamlab.json").read_text())["training"]
    assert training["steps"] == 3 and training["train_hours"] > hours


def test_concept_sampling_gives_each_emoji_and_style_an_equal_share():
    """Skin-tone variants share their concept's share; "image" sampling is uniform over images."""
    from dreamlab.data.dataset import EmojiDataset
    from dreamlab.train.unet import sampling_weights

    records = [{"base": "1F44B", "style": "google"}] * 5 + [{"base": "1F34E", "style": "google"},
                                                            {"base": "1F34E", "style": "twitter"}]
    w = sampling_weights(records, "concept")
    assert w.sum().item() == pytest.approx(1.0)
    assert w[:5].sum().item() == pytest.approx(1 / 3) and w[5].item() == pytest.approx(1 / 3)
    assert torch.allclose(sampling_weights(records, "image"), torch.full((7,), 1 / 7, dtype=torch.float64))
    train = EmojiDataset(FIXTURE, split="train").records  # the fixture: every concept equally likely
    w = sampling_weights(train, "concept")
    shares: dict = {}
    for r, p in zip(train, w.tolist()):
        shares[(r["base"], r["style"])] = shares.get((r["base"], r["style"]), 0.0) + p
    assert max(shares.values()) == pytest.approx(min(shares.values()))


def test_unknown_sampling_is_named():
    from dreamlab.errors import DreamlabError
    from dreamlab.train.unet import UNetConfig, check_config

    with pytest.raises(DreamlabError, match="--sampling 'uniform'"):
        check_config(UNetConfig(data="d", vae="v", out="o", sampling="uniform"))


def test_pooled_text_path_added_to_a_trained_model_starts_as_a_no_op(tmp_path):
    """--pooled-text on --init weights without it: the new projection starts at zero, so the model still
    draws what it drew; the exported folder loads and samples through the pooled path."""
    from dreamlab.generate import generate, make_request
    from dreamlab.loading.model import load_model
    from dreamlab.train.unet import UNetConfig, train_unet

    tiny = dict(data=str(FIXTURE), vae=str(make_tiny_vae(tmp_path / "vae")), batch_size=2, block_out_channels=(32, 32),
                captions_per_image=1, log_every=1, ckpt_every=1, sample_every=1000, device="cpu")
    before = train_unet(UNetConfig(out=str(tmp_path / "plain"), steps=2, **tiny))
    after = train_unet(UNetConfig(out=str(tmp_path / "pooled"), steps=3, init=str(before), lr=1e-12, pooled_text=True, **tiny))
    a, b = load_model(before), load_model(after)
    assert a.unet.config.class_embed_type is None and b.unet.config.class_embed_type == "projection"
    req = make_request(prompt="red apple", seed=3, steps=4, cfg_scale=3.0)
    assert torch.allclose(generate(a, req).pixels, generate(b, req).pixels, atol=1e-4)
    # and the path learns: trained from scratch at the usual rate, its output layer leaves zero
    scratch = train_unet(UNetConfig(out=str(tmp_path / "scratch"), steps=2, pooled_text=True, **tiny))
    assert load_model(scratch).unet.class_embedding.linear_2.weight.abs().sum() > 0


def test_init_weights_of_another_shape_are_named(tmp_path):
    from dreamlab.errors import DreamlabError
    from dreamlab.train.unet import UNetConfig, train_unet

    tiny = dict(data=str(FIXTURE), vae=str(make_tiny_vae(tmp_path / "vae")), batch_size=2, captions_per_image=1,
                log_every=1, ckpt_every=1, sample_every=1000, device="cpu")
    model = train_unet(UNetConfig(out=str(tmp_path / "a"), steps=1, block_out_channels=(32, 32), **tiny))
    with pytest.raises(DreamlabError, match="do not fit this network"):
        train_unet(UNetConfig(out=str(tmp_path / "b"), steps=3, init=str(model), block_out_channels=(32, 64), **tiny))


def test_pooled_text_is_refused_for_a_super_resolution_stage():
    from dreamlab.errors import DreamlabError
    from dreamlab.train.unet import UNetConfig, check_config

    with pytest.raises(DreamlabError, match="--pooled-text"):
        check_config(UNetConfig(data="d", vae="v", out="o", resolution=64, sr_from=32, pooled_text=True))


def test_boolean_training_options_are_switches():
    from dreamlab.cli import build_parser

    parse = lambda *extra: build_parser().parse_args(["train", "unet", "--data", "d", "--vae", "v", "--out", "o", *extra])  # noqa: E731
    assert parse().pooled_text is False
    assert parse("--pooled-text").pooled_text is True
    assert parse("--pooled-text", "--no-pooled-text").pooled_text is False


def test_a_unet_taking_a_pooled_embedding_needs_an_encoder_that_gives_one(tmp_path):
    from diffusers import UNet2DConditionModel

    from dreamlab.errors import DreamlabError
    from dreamlab.generate import generate, make_request
    from dreamlab.loading.model import load_model
    from dreamlab.models.tiny import make_tiny_model

    root = make_tiny_model(tmp_path / "m")
    cfg = {**UNet2DConditionModel.load_config(root / "unet"), "class_embed_type": "projection",
           "projection_class_embeddings_input_dim": 16}
    UNet2DConditionModel.from_config(cfg).save_pretrained(root / "unet")
    assert generate(load_model(root), make_request(prompt="red apple", steps=2)).pixels.isfinite().all()
    spec = json.loads((root / "dreamlab.json").read_text())
    spec["text_encoder"]["pooling"] = "none"
    (root / "dreamlab.json").write_text(json.dumps(spec))
    with pytest.raises(DreamlabError, match="pooled prompt embedding of width 16 .* gives none"):
        load_model(root)


def test_bf16_mixed_precision_trains_and_unknown_values_are_named(tmp_path):
    from dreamlab.errors import DreamlabError
    from dreamlab.train.unet import UNetConfig, check_config, train_unet

    with pytest.raises(DreamlabError, match="--mixed-precision 'fp8'"):
        check_config(UNetConfig(data="d", vae="v", out="o", mixed_precision="fp8"))
    out = tmp_path / "run"
    model = train_unet(UNetConfig(data=str(FIXTURE), vae=str(make_tiny_vae(tmp_path / "vae")), out=str(out), steps=2,
                                  batch_size=2, block_out_channels=(32, 32), captions_per_image=1, log_every=1,
                                  sample_every=1000, device="cpu", mixed_precision="bf16"))
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 and r["loss"] == r["loss"] for r in log)  # finite, not NaN
    from safetensors.torch import load_file

    weights = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {v.dtype for v in weights.values()} == {torch.float32}  # master weights stay float32
