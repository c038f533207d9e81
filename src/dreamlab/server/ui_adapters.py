"""The web UI's adapter picker: the installed LoRAs and embeddings, put into the prompt the way A1111 users
write them (``<lora:NAME:SCALE>``, an embedding's token), so what the prompt box shows is what runs."""

from __future__ import annotations

import re
from typing import Any


def adapter_choices(model) -> tuple[list[str], list[str]]:
    """(LoRA names, embedding tokens) the model can use."""
    return sorted(model.adapters.known("lora")), sorted(model.adapters.known("embedding"))


def add_lora(prompt: str, name: str | None, scale: float) -> str:
    """The prompt with ``<lora:NAME:SCALE>`` (replacing that LoRA's tag if it has one)."""
    if not name:
        return prompt
    tag = f"<lora:{name}:{scale:g}>"
    pattern = re.compile(rf"<lora:{re.escape(name)}(?::[^>]*)?>")
    if pattern.search(prompt or ""):
        return pattern.sub(tag, prompt)
    return f"{prompt.rstrip()} {tag}".strip() if prompt else tag


def add_token(prompt: str, token: str | None) -> str:
    if not token or token in (prompt or ""):
        return prompt
    return f"{prompt.rstrip()} {token}".strip() if prompt else token


def adapter_picker(gr: Any, model, prompt) -> None:
    """Components under the prompt: pick a LoRA and its scale, or an embedding, and it goes into the prompt."""
    loras, tokens = adapter_choices(model)
    with gr.Accordion(f"Adapters ({len(loras)} LoRAs, {len(tokens)} embeddings installed)", open=False,
                      elem_id="adapters"):
        with gr.Row():
            lora = gr.Dropdown(loras, value=None, label="LoRA", interactive=bool(loras), elem_id="lora-name")
            scale = gr.Slider(-2, 2, value=1.0, step=0.05, label="LoRA scale", elem_id="lora-scale")
            add = gr.Button("Add to prompt", elem_id="lora-add", interactive=bool(loras))
        emb = gr.Dropdown(tokens, value=None, label="Embedding (its token goes into the prompt)",
                          interactive=bool(tokens), elem_id="embedding-token")
        if not loras and not tokens:
            gr.Markdown("Install adapters with `dreamlab adapters install PATH` (docs/personalization.md).",
                        elem_id="adapters-none")
    add.click(add_lora, [prompt, lora, scale], prompt, show_progress="hidden")
    emb.select(add_token, [prompt, emb], prompt, show_progress="hidden")
