import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Tiny models: one thread avoids synchronisation overhead that dominates small ops.
torch.set_num_threads(1)


def make_tiny_unet(in_channels: int = 4, out_channels: int = 4, cross_dim: int = 16, sample_size: int = 8, seed: int = 0):
    """A tiny random UNet2DConditionModel with cross-attention (about 30k parameters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
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
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_unet():
    return make_tiny_unet()
