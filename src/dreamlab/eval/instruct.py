"""Scores of an instruction-editing model (docs/control.md): held-out real emoji edited by instructions.

The sources are emoji of the test split (never rendered into the training pairs, whose edits come from
the training split), each with one edit of the catalog (``data.instruct.edit_catalog(split="test")``),
the kinds in turn. Edit achieved: the judge's top-5 names the target emoji (for tone and style edits the
target is the same emoji: that it is still recognised). Source kept: the cosine of the judge's features
and the IoU of the alpha masks against the source. ``prompt_to_prompt`` scores the baseline on the same
edits: the source inverted with null-text inversion under its caption, then the caption edited, on the
model the instruction model was made from.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images import from_pil


def _rgba(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGBA"))


def alpha_iou(a: Image.Image, b: Image.Image) -> float:
    ma, mb = _rgba(a)[..., 3] > 127, _rgba(b)[..., 3] > 127
    union = (ma | mb).sum()
    return float((ma & mb).sum() / union) if union else 1.0


def held_out_edits(data: str | Path, n: int, seed: int = 0):
    """``n`` (source image, edit) pairs over the test split, the kinds in turn, no edit twice."""
    from ..data.dataset import EmojiDataset
    from ..data.instruct import KINDS, edit_catalog, make_edit

    test = EmojiDataset(Path(data).expanduser(), split="test")
    records = [json.loads(line) for line in (Path(data).expanduser() / "metadata.jsonl").read_text().splitlines()
               if line.strip()]
    catalog = edit_catalog(records, split="test")
    where = {(r["label"], r["style"], r.get("skin_tone")): k for k, r in enumerate(test.records)}
    kinds = [k for k in KINDS if catalog[k]]
    out: list[tuple[Image.Image, Any]] = []
    rng, tries = random.Random(seed), 0
    while len(out) < n and tries < 100 * n:
        tries += 1
        kind = kinds[len(out) % len(kinds)]
        e = make_edit(kind, rng.choice(catalog[kind]), rng)
        parts = e.source.split(", ")
        tone = parts[1].removesuffix(" skin tone") if len(parts) == 3 else None
        k = where.get((e.source_label, parts[-1].removesuffix(" style"), tone))
        if k is None or any(x[1] == e for x in out):
            continue
        out.append((Image.fromarray(test.rgba(k), "RGBA"), e))
    return out


SAME_CLASS = ("tone", "style")  # edits whose target is the same emoji: the judge (tone and style invariant) cannot
#                                  tell them done; they count for the source kept, not for the edit achieved


class Scorer:
    """The judge's verdicts on edits of fixed sources.

    edit_top5:  the target emoji in the judge's top-5 of the output, over the edits that change the emoji
                (colour, swap, expression, add, remove); ``sources`` scores the unedited sources the same
                way, the level of doing nothing (a yellow square's top-5 often holds the brown one)
    edit_gain:  edit_top5 minus that level
    cos, iou:   the source kept: judge-feature cosine and alpha IoU against the source, over all edits
    """

    def __init__(self, edits, judge_dir: str | Path | None = None):
        from ..settings import default_judge_dir
        from .judge import load_judge

        self.edits = edits
        self.judge, _, labels = load_judge(judge_dir or default_judge_dir())
        self.index = {label: i for i, label in enumerate(labels)}

    def __call__(self, outs: list[Image.Image]) -> dict[str, float]:
        from .judge import judge_outputs

        sources = [s for s, _ in self.edits]
        outs = [o if o.size == s.size else o.convert("RGBA").resize(s.size, Image.LANCZOS) for o, s in zip(outs, sources)]
        feats, logits = judge_outputs(self.judge, from_pil([*sources, *outs]))
        feats = torch.nn.functional.normalize(feats, dim=1)
        k = len(sources)
        top = logits.topk(5, dim=1).indices.tolist()
        changing = [i for i, (_, e) in enumerate(self.edits) if e.kind not in SAME_CLASS]
        hit = [self.index.get(self.edits[i][1].target_label) in top[k + i] for i in changing]
        level = [self.index.get(self.edits[i][1].target_label) in top[i] for i in changing]
        return {"edit_top5": float(np.mean(hit)) if hit else None,
                "edit_gain": float(np.mean(hit) - np.mean(level)) if hit else None, "n_changing": len(hit),
                "cos": float(np.mean([float(feats[i] @ feats[k + i]) for i in range(k)])),
                "iou": float(np.mean([alpha_iou(s, o) for s, o in zip(sources, outs)])),
                "per_edit": [{"kind": e.kind, "instruction": e.instruction, "target": e.target_label,
                              "target_top5": self.index.get(e.target_label) in top[k + i],
                              "cos": float(feats[i] @ feats[k + i])} for i, (_, e) in enumerate(self.edits)]}


def instruct_edits(model, edits, *, image_scale: float, text_scale: float, steps: int = 20) -> tuple[list, float]:
    """The instruction model's edits, and seconds per edit."""
    from ..generate import encode_image, generate, make_request

    t0, outs = time.time(), []
    for k, (src, e) in enumerate(edits):
        req = make_request(prompt=e.instruction, seed=k, steps=steps, cfg_scale=text_scale, image_cfg_scale=image_scale,
                           source_image=encode_image(src))
        outs.append(generate(model, req).images[0])
    return outs, (time.time() - t0) / max(1, len(edits))


def prompt_to_prompt_edits(base, edits, *, steps: int = 20, cfg_scale: float = 5.0) -> tuple[list, float]:
    """The baseline: null-text inversion of the source under its caption, then prompt-to-prompt to the target."""
    from ..generate import encode_image, generate, make_request

    t0, outs = time.time(), []
    for k, (src, e) in enumerate(edits):
        req = make_request(prompt=e.source, seed=k, steps=steps, cfg_scale=cfg_scale, sampler="ddim",
                           init_image=encode_image(src), edit={"target": e.target, "inversion": "null-text"})
        outs.append(generate(base, req).images[0])
    return outs, (time.time() - t0) / max(1, len(edits))


def evaluate_instruct(model, data: str | Path, *, n: int = 24, steps: int = 20, image_scale: float | None = None,
                      text_scale: float | None = None, judge_dir=None, seed: int = 0) -> dict[str, Any]:
    """The scores of ``model`` at one (s_I, s_T) (default: its own), with the sources' own as reference."""
    edits = held_out_edits(data, n, seed)
    score = Scorer(edits, judge_dir)
    s_i = model.defaults.image_cfg_scale if image_scale is None else image_scale
    s_t = model.defaults.cfg_scale if text_scale is None else text_scale
    outs, seconds = instruct_edits(model, edits, image_scale=s_i, text_scale=s_t, steps=steps)
    return {"n": len(edits), "image_scale": s_i, "text_scale": s_t, **score(outs), "seconds_per_edit": seconds,
            "sources": score([s for s, _ in edits])}
