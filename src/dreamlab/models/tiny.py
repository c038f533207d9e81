"""A tiny randomly initialised model in the full folder format: for tests, benchmarks and debugging.

It has every part a real model has (UNet with cross-attention, RGBA autoencoder, BERT text encoder and
tokenizer, scheduler), a few hundred KB in all. Its images are noise-like: it is not a trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

_WORDS = "a an the red green blue yellow apple heart star cat dog face smile sun moon tree flower car".split()


def tiny_unet(in_channels: int = 4, out_channels: int = 4, cross_dim: int = 16, sample_size: int = 8, seed: int = 0):
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
    )


def make_tiny_model(path: str | Path, *, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import BertConfig, BertModel, BertTokenizer

    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tiny_unet(seed=seed).save_pretrained(root / "unet")
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
    spec = {
        "name": "tiny-random",
        "sample_size": 16,
        "use_mask": True,
        "text_encoder": {"source": "folder", "max_length": 8, "pooling": "mean"},
    }
    (root / "dreamlab.json").write_text(json.dumps(spec, indent=2) + "\n")
    return root
