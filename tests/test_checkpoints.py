"""Single-file Stable Diffusion checkpoints: detection, conversion, parity with diffusers folders, bad files.

Tiny random SD 1.x, 2.x and SDXL models are written in the original single-file layout
(``loading/original_layout.py``, diffusers' conversion run backwards) beside a diffusers folder of the
same weights (their "twin"); the real architectures are checked on the meta device with the bundled configs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from dreamlab import cli
from dreamlab.core.prediction import Prediction
from dreamlab.generate import generate, make_request
from dreamlab.loading import single_file
from dreamlab.loading.checkpoint import Checkpoint
from dreamlab.loading.detect import ARCHITECTURES, detect
from dreamlab.loading.model import load_model
from dreamlab.loading.original_layout import openclip_to_original, to_original
from dreamlab.loading.single_file import BUNDLED, CONFIGS, convert_checkpoint, resolve_prediction
from dreamlab.models.tiny_sd import make_tiny_sd
from dreamlab.models.unet import size_ids

ARCHS = ("sd1", "sd2", "sdxl")
REQUEST = dict(prompt="a red cat", negative_prompt="blurry", seed=3, steps=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (checkpoint file, twin folder); SD 2.x's twin samples v, as the loader takes an SD 2.x file."""
    root = tmp_path_factory.mktemp("tiny-sd")
    return {a: make_tiny_sd(root / a, a, prediction="v_prediction" if a == "sd2" else "epsilon") for a in ARCHS}


def _same_images(a, b) -> None:
    req = make_request(**REQUEST)
    ra, rb = generate(a, req), generate(b, req)
    assert torch.equal(ra.latents, rb.latents)
    assert np.array_equal(np.asarray(ra.images[0]), np.asarray(rb.images[0]))


def _error_line(capsys, *argv: str) -> str:
    """The one line `dreamlab ...` prints for a bad file (exit status 2, no traceback)."""
    assert cli.main(list(argv)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# --- the real architectures, on the meta device --------------------------------------------------------------


REAL = {  # a few tensors of the real files, by their original names
    "sd1": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
            "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768)},
    "sd2": {"model.diffusion_model.input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.positional_embedding": (77, 1024)},
    "sdxl": {"conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": (1280,),
             "conditioner.embedders.1.model.text_projection": (1280, 1280),
             "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": (77, 768),
             "model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048)},
}
PARAMS = {"sd1": 859_520_964, "sd2": 865_910_724, "sdxl": 2_567_463_684}  # UNet parameters of the released models


@pytest.mark.parametrize("arch,folder", [("sd1", "sd1"), ("sd2", "sd2"), ("sd2", "sd2-v"), ("sdxl", "sdxl")])
def test_bundled_configs_convert_the_real_layouts(arch, folder):
    """Real-size networks from the bundled configs, written in the original layout (shapes only), are
    detected and convert back key for key; their names and shapes are those of the released files."""
    import transformers
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel

    spec, cfg = ARCHITECTURES[arch], BUNDLED / folder
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(json.loads((cfg / "unet" / "config.json").read_text()))
        vae = AutoencoderKL.from_config(json.loads((cfg / "vae" / "config.json").read_text()))
        configs = [transformers.CLIPTextConfig.from_pretrained(cfg / e.folder) for e in spec.encoders]
        encoders = [getattr(transformers, c.architectures[0])(c) for c in configs]
        state = to_original(spec, unet, vae, encoders)
        if arch == "sd2":  # the released file has OpenCLIP's 24th layer and projection, unused by SD 2
            full = transformers.CLIPTextConfig.from_pretrained(cfg / "text_encoder", num_hidden_layers=24, projection_dim=1024)
            state.update(openclip_to_original(transformers.CLIPTextModelWithProjection(full).state_dict(), spec.encoders[0].prefix))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert {k: shapes.get(k) for k in REAL[arch]} == REAL[arch]
    assert detect(shapes) is spec
    prediction = Prediction.V if folder == "sd2-v" else Prediction.EPS
    c = convert_checkpoint(Checkpoint(Path(f"released-{folder}.safetensors"), state), prediction=prediction)
    assert sum(p.numel() for p in c.unet.parameters()) == PARAMS[arch]
    assert c.unet.config.sample_size * 8 == {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}[folder]
    assert [type(m).__name__ for _, m in c.encoders] == (
        ["CLIPTextModel", "CLIPTextModelWithProjection"] if arch == "sdxl" else ["CLIPTextModel"])


def test_bundled_files_are_the_recorded_ones():
    from dreamlab.loading.files import sha256_file

    sums = {rel: digest for digest, rel in (line.split("  ") for line in (CONFIGS / "SHA256SUMS").read_text().splitlines())}
    assert sorted(sums) == sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.*") if p.name != "SHA256SUMS")
    assert {rel: sha256_file(CONFIGS / rel) for rel in sums} == sums


def test_bundled_tokenizer_gives_clips_ids():
    tokenizer = single_file._tokenizer(BUNDLED / "sd1", ARCHITECTURES["sd1"].encoders[0], {})
    assert tokenizer("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408
    padded = single_file._tokenizer(BUNDLED / "sd2", ARCHITECTURES["sd2"].encoders[0], {})("a", padding="max_length", max_length=5)
    assert padded["input_ids"] == [49406, 320, 49407, 0, 0]  # OpenCLIP pads with "!" (id 0)


# --- tiny models: parity, conversion, conditioning -------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_single_file_generates_what_its_diffusers_twin_does(tiny, arch):
    file, twin = tiny[arch]
    model, twin_model = load_model(file, config=twin), load_model(twin)
    assert model.name == arch and model.source == str(file.resolve()) and model.prediction == twin_model.prediction
    assert file.name in model.files and "config/unet/config.json" in model.files
    _same_images(model, twin_model)


@pytest.mark.parametrize("arch", ARCHS)
def test_convert_writes_the_twin(tiny, arch, tmp_path, capsys):
    file, twin = tiny[arch]
    out = tmp_path / "converted"
    assert cli.main(["convert", str(file), "-o", str(out), "--config", str(twin)]) == 0
    assert ARCHITECTURES[arch].title in capsys.readouterr().out
    for part in ("unet", "vae", "text_encoder", *(("text_encoder_2",) if arch == "sdxl" else ())):
        name = "diffusion_pytorch_model.safetensors" if part in ("unet", "vae") else "model.safetensors"
        ours, theirs = load_file(out / part / name), load_file(twin / part / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), part
    spec = json.loads((out / "dreamlab.json").read_text())
    assert spec["converted_from"]["architecture"] == arch and spec["text_encoder"] == {"source": "clip"}
    _same_images(load_model(out), load_model(file, config=twin))
    assert "not an empty folder" in _error_line(capsys, "convert", str(file), "-o", str(out), "--config", str(twin))


def test_sdxl_conditioning_is_diffusers(tiny):
    """Both encoders' penultimate states concatenated and the pooled projection, as diffusers' pipeline
    encodes a prompt; the size conditioning from the size of the image being made."""
    import diffusers

    file, twin = tiny["sdxl"]
    model = load_model(file, config=twin)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(twin, local_files_only=True)
    tokens, _, pooled, _ = pipe.encode_prompt(["a red cat", "x"], device="cpu", do_classifier_free_guidance=False)
    cond = model.encode_prompts(["a red cat", "x"])
    assert torch.equal(cond.tokens, tokens) and torch.equal(cond.pooled, pooled)
    ids = pipe._get_add_time_ids((32, 24), (0, 0), (32, 24), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(size_ids(1, 32, 24), ids)

    seen = []
    hook = model.unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["added_cond_kwargs"]["time_ids"]), with_kwargs=True)
    try:
        generate(model, make_request(prompt="a cat", seed=0, steps=1, width=24, height=32))
        generate(model, make_request(prompt="a cat", seed=0, steps=1))  # the model's size: its config's (SDXL: 1024)
    finally:
        hook.remove()
    assert seen[0].tolist() == [[32, 24, 0, 0, 32, 24]] * 2  # the CFG rows, uncond and cond
    assert seen[-1][0].tolist() == [model.sample_size, model.sample_size, 0, 0, model.sample_size, model.sample_size]


def test_prediction_type(tiny, tmp_path):
    file, _ = tiny["sd2"]
    sd2 = ARCHITECTURES["sd2"]
    ckpt = Checkpoint(tmp_path / "m.safetensors", {})
    assert resolve_prediction(ckpt, sd2, None)[0] == Prediction.V  # diffusers' guess for SD 2.x
    assert resolve_prediction(Checkpoint(ckpt.path, {}, global_step=875000), sd2, None)[0] == Prediction.EPS
    assert resolve_prediction(Checkpoint(ckpt.path, {}, {"modelspec.prediction_type": "epsilon"}), sd2, None)[0] == Prediction.EPS
    assert resolve_prediction(Checkpoint(ckpt.path, {"v_pred": torch.zeros(())}), ARCHITECTURES["sd1"], None)[0] == Prediction.V
    assert resolve_prediction(ckpt, sd2, "epsilon") == (Prediction.EPS, "given")
    (tmp_path / "m.yaml").write_text("model:\n  params:\n    parameterization: v\n")
    assert resolve_prediction(Checkpoint(ckpt.path, {}, {"modelspec.prediction_type": "epsilon"}), sd2, None)[0] == Prediction.V

    copy = tmp_path / "sd2-base.safetensors"  # a sidecar yaml without parameterization: eps, and it is hashed
    shutil.copy(file, copy)
    copy.with_suffix(".yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    model = load_model(copy, config=tiny["sd2"][1])
    assert model.prediction == Prediction.EPS and "sd2-base.yaml" in model.files


def test_cli_generate_and_replay_a_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    """`generate --model FILE` and `replay` of its image, the tiny model's configs standing in for the bundled
    ones; the prediction type given on the command line is recorded, and replay uses it again."""
    file, twin = tiny["sd2"]
    monkeypatch.setattr(single_file, "_bundled", lambda arch, prediction: twin)
    out = tmp_path / "a.png"
    assert cli.main(["generate", "a cat", "--model", str(file), "--prediction", "epsilon", "--steps", "2", "--seed", "1",
                     "-o", str(out), "-q"]) == 0
    assert cli.main(["replay", str(out), "-o", str(tmp_path / "b.png")]) == 0
    assert "identical" in capsys.readouterr().out


def test_pickled_checkpoint_needs_allow_pickle(tiny, tmp_path, capsys):
    file, twin = tiny["sd1"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(file), "global_step": 10}, ckpt)
    assert "--allow-pickle" in _error_line(capsys, "generate", "x", "--model", str(ckpt))
    _same_images(load_model(ckpt, allow_pickle=True, config=twin), load_model(file, config=twin))


# --- files that are not (supported) checkpoints --------------------------------------------------------------


def test_bad_files_get_one_line(tiny, tmp_path, capsys):
    import os

    file, _ = tiny["sd1"]
    state = load_file(file)

    def bad(name: str, tensors=None, data: bytes | None = None) -> str:
        path = tmp_path / name
        if tensors is not None:
            save_file(tensors, path)
        else:
            path.write_bytes(data)
        return _error_line(capsys, "generate", "x", "--model", str(path), *(["--allow-pickle"] if name.endswith(".ckpt") else []))

    assert "not a safetensors file" in bad("random.safetensors", data=os.urandom(4096))
    assert "is truncated" in bad("cut.safetensors", data=file.read_bytes()[: file.stat().st_size // 2])
    assert "not a PyTorch checkpoint" in bad("random.ckpt", data=os.urandom(4096))
    no_text = {k: v for k, v in state.items() if not k.startswith("cond_stage_model.")}
    assert "unknown architecture" in bad("no-text.safetensors", no_text)
    nine = {**state, "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 9, 3, 3)}
    assert "inpainting" in bad("inpaint.safetensors", nine)
    refiner = {**no_text, "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(10, 16)}
    assert "refiner" in bad("refiner.safetensors", refiner)
    assert "LoRA" in bad("lora.safetensors", {"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)})
    assert "not a checkpoint file" in bad("notes.txt", data=b"hello")
    # a real architecture's layout, but not the released model's widths: the bundled configs do not fit
    assert "does not fit its config" in _error_line(capsys, "generate", "x", "--model", str(file))
