"""`dreamlab eval`: FID, KID and prompt alignment of a model, and the same for held-out real images
(the ceiling), all measured by the judge.

Prompts are the canonical captions ("red apple, twitter style") of the held-out (test split) images;
alignment counts a generated image as correct when the judge's top-1 / top-5 classes contain the
prompt's emoji. FID/KID compare generated images with the held-out real ones; the ceiling compares an
equal number of training images with them.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data.captions import canonical_caption
from ..data.dataset import EmojiDataset
from .judge import judge_outputs, load_judge
from .metrics import fid, kid, topk_accuracy


@dataclass
class EvalConfig:
    data: str
    judge: str
    model: str | None = None
    prompts: int = 100  # distinct held-out prompts
    per_prompt: int = 2
    steps: int = 20
    sampler: str = "dpmpp_2m"
    cfg_scale: float = 4.0
    seed: int = 0


def _images(ds: EmojiDataset, records: list[dict]) -> torch.Tensor:
    idx = np.array([r["index"] for r in records])
    return torch.from_numpy(np.asarray(ds.images[idx])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)


def held_out_prompts(test: EmojiDataset, n: int) -> list[dict]:
    """One record per (base emoji, style) of the test split, base images first, in a fixed order."""
    seen, chosen = set(), []
    for r in sorted(test.records, key=lambda r: (r["skin_tone"] is not None, r["base"], r["style"])):
        key = (r["base"], r["style"])
        if key not in seen:
            seen.add(key)
            chosen.append(r)
    return chosen[:n]


def evaluate(cfg: EvalConfig) -> dict:
    from tqdm import tqdm

    from ..generate import generate, make_request
    from ..loading.model import load_model

    judge, bases, _ = load_judge(cfg.judge)
    pos = {b: i for i, b in enumerate(bases)}
    test = EmojiDataset(Path(cfg.data), split="test")
    train = EmojiDataset(Path(cfg.data), split="train")
    real_test = _images(test, test.records)
    f_test, l_test = judge_outputs(judge, real_test)
    y_test = torch.tensor([pos[r["base"]] for r in test.records])
    g = torch.Generator().manual_seed(cfg.seed)
    sub = torch.randperm(len(train.records), generator=g)[: len(test.records)].tolist()
    f_train, _ = judge_outputs(judge, _images(train, [train.records[i] for i in sub]))
    ceiling = {
        "fid": fid(f_train, f_test),
        "kid": kid(f_train, f_test)[0],
        **{f"top{k}": v for k, v in topk_accuracy(l_test, y_test).items()},
    }

    model = load_model(cfg.model)
    prompts = held_out_prompts(test, cfg.prompts)
    generated, labels = [], []
    t0 = time.time()
    for i, r in enumerate(tqdm(prompts, desc="generating", leave=False)):
        req = make_request(prompt=canonical_caption(r), seed=cfg.seed + i * cfg.per_prompt, batch=cfg.per_prompt,
                           steps=cfg.steps, sampler=cfg.sampler, cfg_scale=cfg.cfg_scale)
        res = generate(model, req)
        generated.append(res.pixels)
        labels += [pos[r["base"]]] * cfg.per_prompt
    seconds = time.time() - t0
    gen = torch.cat(generated)
    f_gen, l_gen = judge_outputs(judge, gen)
    result = {
        "model": {"fid": fid(f_gen, f_test), "kid": kid(f_gen, f_test)[0],
                  **{f"top{k}": v for k, v in topk_accuracy(l_gen, torch.tensor(labels)).items()}},
        "real_held_out": ceiling,
        "n_generated": len(gen),
        "n_real_held_out": len(real_test),
        "seconds_per_image": seconds / max(1, len(gen)),
        "settings": {k: v for k, v in cfg.__dict__.items()},
    }
    return result


def format_table(result: dict) -> str:
    rows = [("", "FID", "KID", "top-1", "top-5")]
    for name, key in (("model", "model"), ("held-out real (ceiling)", "real_held_out")):
        m = result[key]
        rows.append((name, f"{m['fid']:.2f}", f"{m['kid']:.4f}", f"{m['top1']:.3f}", f"{m['top5']:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def save_result(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2))
