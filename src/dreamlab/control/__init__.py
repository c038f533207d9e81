"""Wrappers and hooks that compose around a DenoiseFn: inpainting, ControlNet, attention control."""
