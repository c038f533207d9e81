import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

# Tiny models: one thread avoids synchronisation overhead that dominates small ops.
torch.set_num_threads(1)


def make_tiny_unet(**kw):
    from dreamlab.models.tiny import tiny_unet

    return tiny_unet(**kw).eval().requires_grad_(False)


@pytest.fixture(scope="session")
def tiny_unet():
    return make_tiny_unet()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random model folder in the full format (tests that change files copy it first)."""
    from dreamlab.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    from dreamlab.loading.model import load_model

    return load_model(tiny_dir)
