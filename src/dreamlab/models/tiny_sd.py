"""Tiny random Stable Diffusion models (SD 1.x, 2.x, SDXL base) in both layouts: for tests and debugging.

``make_tiny_sd(dir, arch)`` writes the same random weights twice, a few hundred KB each:
    dir/twin/               a diffusers pipeline folder (``save_pretrained``), also usable as ``config=``
    dir/<arch>.safetensors  the original single-file layout that model sharing sites use
Each has every part its real architecture has (SDXL: two text encoders and the size conditioning; SD 2.x:
an OpenCLIP encoder with the last layer and projection that SD 2 leaves unused), with tiny widths, and a
CLIP tokenizer cut from the real one (the byte symbols and the first merges). Images are noise-like.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..loading.detect import ARCHITECTURES
from ..loading.original_layout import openclip_to_original, to_original
from ..loading.single_file import BUNDLED, TOKENIZER

_MERGES = 100  # of CLIP's 48,894
_TEXT = {  # (hidden width, activation); two layers each
    "sd1": [(16, "quick_gelu")],
    "sd2": [(24, "gelu")],
    "sdxl": [(16, "quick_gelu"), (24, "gelu")],
}
_POOLED = 12  # SDXL's second encoder projects to this


def tiny_tokenizer(folder: Path, pad_token: str):
    """A CLIP BPE tokenizer with the first 512 + _MERGES tokens of the real vocabulary and its own specials."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    keep = [t for t, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i < 512 + _MERGES]
    tokens = {t: i for i, t in enumerate([*keep, "<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(tokens, ensure_ascii=False), encoding="utf-8")
    merges = (TOKENIZER / "merges.txt").read_text(encoding="utf-8").splitlines()[: 1 + _MERGES]
    (folder / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(folder, pad_token=pad_token, model_max_length=77)


def _text_config(width: int, act: str, vocab: int, layers: int = 2):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                          num_attention_heads=2, max_position_embeddings=77, hidden_act=act, projection_dim=_POOLED,
                          bos_token_id=0, eos_token_id=2, pad_token_id=1)  # ids as in SD's configs (argmax pooling)


def _unet(arch: str, cross: int):
    from diffusers import UNet2DConditionModel

    if arch == "sdxl":
        blocks = dict(block_out_channels=(8, 16, 16), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 1, 2),
                      attention_head_dim=(2, 4, 4), use_linear_projection=True, addition_embed_type="text_time",
                      addition_time_embed_dim=4, projection_class_embeddings_input_dim=_POOLED + 6 * 4)
    else:
        blocks = dict(block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        if arch == "sd1":
            blocks.update(attention_head_dim=2)
        else:  # SD 2.x: per-block heads, linear projections, attention upcast
            blocks.update(attention_head_dim=(2, 4), use_linear_projection=True, upcast_attention=True)
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, norm_num_groups=4,
                                cross_attention_dim=cross, **blocks)


def _vae(arch: str):
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=16,
                         scaling_factor=0.13025 if arch == "sdxl" else 0.18215)


def make_tiny_sd(path: str | Path, arch: str = "sd1", *, seed: int = 0, prediction: str = "epsilon",
                 metadata: dict[str, str] | None = None) -> tuple[Path, Path]:
    """(the single-file checkpoint, its diffusers twin folder)."""
    import diffusers
    from safetensors.torch import save_file
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    spec = ARCHITECTURES[arch]
    root = Path(path)
    torch.manual_seed(seed)
    tokenizers = [tiny_tokenizer(root / "tokenizers" / e.tokenizer_folder, e.pad_token) for e in spec.encoders]
    vocab = len(tokenizers[0])
    encoders, file_encoders = [], {}
    for e, (width, act) in zip(spec.encoders, _TEXT[arch]):
        if arch == "sd2":  # the file has one layer more and a projection; SD 2 uses neither
            full = CLIPTextModelWithProjection(_text_config(width, act, vocab, layers=3))
            file_encoders.update(openclip_to_original(full.state_dict(), e.prefix))
            model = CLIPTextModel(_text_config(width, act, vocab))
            model.load_state_dict({k.removeprefix("text_model."): v for k, v in full.state_dict().items()
                                   if "layers.2." not in k and "projection" not in k})
        else:
            model = (CLIPTextModelWithProjection if e.folder == "text_encoder_2" else CLIPTextModel)(_text_config(width, act, vocab))
        encoders.append(model.eval())
    unet, vae = _unet(arch, sum(w for w, _ in _TEXT[arch])).eval(), _vae(arch).eval()
    sched_cfg = json.loads((BUNDLED / arch / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config({**sched_cfg, "prediction_type": prediction})

    parts = dict(vae=vae, unet=unet, scheduler=scheduler, text_encoder=encoders[0], tokenizer=tokenizers[0])
    if arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(**parts, text_encoder_2=encoders[1], tokenizer_2=tokenizers[1],
                                                   add_watermarker=False)
    else:
        pipe = diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                                 requires_safety_checker=False)
    pipe.save_pretrained(root / "twin")

    state = to_original(spec, unet, vae, encoders)
    state.update(file_encoders)
    for e in spec.encoders:  # older checkpoints carry CLIP's position ids; the loader must ignore them
        if e.layout == "clip":
            state[e.prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    state["alphas_cumprod"] = torch.ones(1000)  # the original trainers' schedule buffers, not weights
    file = root / f"{arch}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, file, metadata=metadata)
    return file, root / "twin"
