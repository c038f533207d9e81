"""A tiny randomly initialised model in the full folder format: for tests, benchmarks and debugging.

It has every part a real model has (UNet with cross-attention, RGBA autoencoder, BERT text encoder and
tokenizer, scheduler), a few hundred KB in all. Its images are noise-like: it is not a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_WORDS = "a an the red green blue yellow apple heart star cat dog face smile sun moon tree flower car".split()


def tiny_unet(in_channels: int = 4, out_channels: int = 4, cross_dim: int = 16, sample_size: int = 8, seed: int = 0,
              class_embed_type: str | None = None):
    """A random UNet2DConditionModel with cross-attention, about 65k parameters."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=4,
        attention_head_dim=2,
        cross_attention_dim=cross_dim,
        class_embed_type=class_embed_type,
    )


def make_tiny_model(
    path: str | Path, *, seed: int = 0, prediction_type: str = "epsilon", sample_size: int = 16, sr_from: int | None = None
) -> Path:
    """``sr_from``: a super-resolution stage enlarging images of that side to ``sample_size``."""
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import BertConfig, BertModel, BertTokenizer

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    sr = {"in_channels": 8, "class_embed_type": "timestep"} if sr_from else {}
    tiny_unet(seed=seed, sample_size=sample_size // 2, **sr).save_pretrained(root / "unet")
    AutoencoderKL(
        in_channels=4,
        out_channels=4,
        latent_channels=4,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type
    ).save_pretrained(root / "scheduler")

    tok_dir = root / "tokenizer"
    tok_dir.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *_WORDS, *"abcdefghijklmnopqrstuvwxyz"]
    (tok_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tok_dir / "vocab.txt")).save_pretrained(tok_dir)
    BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    ).save_pretrained(root / "text_encoder")
    spec: dict = {
        "name": "tiny-random" + (f"-sr{sr_from}" if sr_from else ""),
        "sample_size": sample_size,
        "use_mask": True,
        "text_encoder": {"source": "folder", "max_length": 8, "pooling": "mean"},
    }
    if sr_from:
        spec["super_resolution"] = {"from_size": sr_from, "noise_level": 50}
    (root / "dreamlab.json").write_text(json.dumps(spec, indent=2) + "\n")
    return root


def make_tiny_cascade(path: str | Path, *, seed: int = 0) -> Path:
    """A cascade folder: a tiny 8x8 base model and a tiny 8 -> 16 super-resolution stage."""
    root = Path(path)
    make_tiny_model(root / "base", seed=seed, sample_size=8)
    make_tiny_model(root / "sr", seed=seed + 1, sample_size=16, sr_from=8)
    (root / "dreamlab.json").write_text(json.dumps({"name": "tiny-cascade", "cascade": {"base": "base", "sr": "sr"}}, indent=2) + "\n")
    return root


def make_tiny_vae(path: str | Path) -> Path:
    """A random RGBA AutoencoderKL with the emoji autoencoder's 4x downsampling, for training tests."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(in_channels=4, out_channels=4, latent_channels=4, block_out_channels=(8, 16, 16),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=8, sample_size=64)
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(path)
    return Path(path)
