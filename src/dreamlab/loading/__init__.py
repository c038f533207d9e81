"""Checkpoint formats, bundled configs and hash checks. May import dreamlab.models; never the reverse."""

import os as _os

# Quiet, offline loading: no hub access and no per-file progress bars from transformers.
_os.environ.setdefault("HF_HUB_OFFLINE", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
