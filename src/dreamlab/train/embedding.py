"""Textual inversion (Gal et al. 2022): learn the input embedding of a new token from a few images.

Everything is frozen but the new token's vectors: the text encoder's embedding table is wrapped for the
run in a TokenTable whose only parameter is the new rows (the old table is not trained), prompts built from
templates ("a {}", "{caption}, {} style") are encoded with autograd, and the loss is the base model's
own denoising loss through ``Denoiser.loss``. The result is a small safetensors file used by writing the
token in a prompt (``--embedding PATH``, or installed in the adapter library).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from torch import Tensor, nn

from ..models.patches import add_tokens
from ..adapters.embedding import Embedding, save_embedding
from ..errors import DreamlabError
from ..settings import EmbeddingConfig  # noqa: F401  (the configuration, kept torch-free)
from .personal import OBJECT_TEMPLATES, STYLE_TEMPLATES, Loop, base_model, batch_noise, load_shots, sample_grid, template_prompts


def check_token(tokenizer, token: str) -> None:
    vocab = tokenizer.get_vocab()
    if not token.strip() or any(c.isspace() for c in token):
        raise DreamlabError(f"--token {token!r}: a token is one word without spaces, e.g. <my-cat>")
    if token in vocab or token.lower() in vocab:
        raise DreamlabError(f"--token {token!r} already exists in the text encoder's vocabulary; choose a new word "
                            "such as <my-cat>")


def init_vector(encoder, word: str) -> Tensor:
    ids = encoder.tokenizer(word, add_special_tokens=False)["input_ids"]
    if not ids or all(i == encoder.tokenizer.unk_token_id for i in ids):
        raise DreamlabError(f"--init-word {word!r} is not in the text encoder's vocabulary")
    return encoder.model.get_input_embeddings().weight[torch.tensor(ids)].detach().float().mean(0)


def train_embedding(cfg: EmbeddingConfig) -> Path:
    if cfg.kind not in ("object", "style"):
        raise DreamlabError(f"--kind {cfg.kind!r}: object or style")
    if not 1 <= cfg.vectors <= 16:
        raise DreamlabError("--vectors: 1 to 16")
    model = base_model(cfg.base, cfg.device)
    encoder = model.text_encoder
    if encoder is None or not hasattr(encoder, "encode_with_grad"):
        raise DreamlabError(f"{model.name} has no transformers text encoder to add a token to")
    check_token(encoder.tokenizer, cfg.token)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    shots = load_shots(cfg.images, model)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)

    start = init_vector(encoder, cfg.init_word)
    table = encoder.model.get_input_embeddings()
    new = nn.Parameter(start.repeat(cfg.vectors, 1).to(table.weight.dtype).to(model.device).clone())
    view = model.clone()
    view.text_encoder, extended = add_tokens(encoder, {cfg.token: new.detach()}, rows=new)
    templates = OBJECT_TEMPLATES if cfg.kind == "object" else STYLE_TEMPLATES
    opt = torch.optim.AdamW([new], lr=cfg.lr, weight_decay=0.0)
    denoiser = model.denoiser()
    loop = Loop(out, cfg.steps, f"embedding {cfg.token}", cfg.log_every)
    encoder.model.set_input_embeddings(extended)
    try:
        for step in range(1, cfg.steps + 1):
            idx, x0, t, noise = batch_noise(shots, cfg.batch_size, model.schedule.num_train_timesteps, gen, cfg.flip)
            cond = view.encode_prompts(template_prompts(templates, cfg.token, shots.captions, idx, rng), grad=True)
            dev = model.device
            loss = denoiser.loss(x0.to(dev), noise.to(dev), t.to(dev), cond, min_snr_gamma=cfg.min_snr_gamma)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loop.step(step, loss=loss.item(), norm=float(new.detach().norm(dim=-1).mean()))
            if cfg.snapshot_every and step % cfg.snapshot_every == 0 and step < cfg.steps:
                save_embedding(Embedding(cfg.token, new.detach().float().cpu(), {"steps": step}), out / "snapshots" / f"step-{step:05d}")
    finally:
        encoder.model.set_input_embeddings(table)
    seconds = loop.close(("loss", "norm"))
    meta = {"kind": cfg.kind, "init_word": cfg.init_word, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "train_seconds": round(seconds, 1), "images": shots.files, "base_model": model.name,
            "base_files": model.files, "vectors": cfg.vectors}
    emb = Embedding(cfg.token, new.detach().float().cpu(), meta)
    file = save_embedding(emb, out)
    if cfg.samples:
        from ..models.patches import TokenEmbeddings

        prompts = ([cfg.token, f"a {cfg.token} with sunglasses"] if cfg.kind == "object"
                   else [f"red apple, {cfg.token} style", f"rocket, {cfg.token} style"])
        sample_grid(model, prompts, out, patches=[TokenEmbeddings({cfg.token: emb.vectors})])
    return file.parent
