"""Our model families, built on diffusers and transformers classes. Never imports dreamlab.loading."""
