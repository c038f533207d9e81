"""dreamlab: diffusion image generation, editing, training and evaluation on one sampling engine."""

__version__ = "0.1.0"
