"""Composition (docs/composition.md): canvases larger than the model (MultiDiffusion windows), regional
prompts, layered RGBA collages, outpainting, illusions (visual anagrams) and ILVR reference guidance.
Each is a small object plugged into the one sampling loop: a denoiser wrapper, a guider or a state hook."""
