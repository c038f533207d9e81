"""Evaluation: dreamlab's own judge network (no Inception or CLIP weights exist offline), FID/KID on its
features, prompt alignment by its accuracy on generated images, and benchmarks."""
