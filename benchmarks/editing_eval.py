"""Measure text-driven editing on the shipped default model (docs/editing.md).

    python benchmarks/editing_eval.py --out docs/images --json runs/editing.json

1. A grid like the lecture's: sources, each with six edits (object swaps, a colour or expression, an
   added word, a reweighted word), prompt-to-prompt beside plain regeneration with the same seed.
2. Over the (source, edit) pairs below: structure kept (IoU of the alpha masks, and the cosine of the
   judge's features, against the source) and edit achieved (the judge's top-5 names the target), for
   prompt-to-prompt, same-seed regeneration and SDEdit at two strengths.
3. Inversion of held-out real emoji: reconstruction PSNR for DDIM and null-text at CFG 1 and 5, and
   seconds per image.
4. DiffEdit: IoU of the automatic mask against the true changed region (the edited emoji's silhouette),
   on composites of two emoji side by side, the left one named differently in the target.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval_common import setup

PAIRS = [  # (source, target): colours, swaps within a category, expressions
    ("red apple", "green apple"), ("red heart", "blue heart"), ("red heart", "green heart"),
    ("yellow heart", "purple heart"), ("blue heart", "orange heart"), ("red circle", "blue circle"),
    ("green circle", "yellow circle"), ("white heart", "black heart"), ("brown heart", "red heart"),
    ("cat face", "dog face"), ("dog face", "tiger face"), ("mouse face", "rabbit face"), ("cow face", "pig face"),
    ("monkey face", "cat face"), ("pear", "lemon"), ("banana", "carrot"), ("strawberry", "cherries"),
    ("peach", "tangerine"), ("pizza", "hamburger"), ("cookie", "doughnut"), ("rocket", "airplane"),
    ("bus", "taxi"), ("sun", "full moon"), ("soccer ball", "basketball"), ("basketball", "baseball"),
    ("rose", "tulip"), ("sunflower", "hibiscus"), ("grinning face", "winking face"), ("grinning face", "angry face"),
    ("smiling face", "crying face"), ("sleeping face", "thinking face"), ("cat face", "tiger face"),
]

GRID = [  # source, then six edits: (target, edit options), kind
    ("cat face", [("dog face", {}, "swap"), ("tiger face", {}, "swap"), ("rabbit face", {}, "swap"),
                  ("pig face", {}, "swap"), ("cat face, twitter style", {}, "added words"),
                  ("cat face", {"reweight": {"cat": 3.0}}, "cat x3")]),
    ("red heart", [("blue heart", {}, "colour"), ("green heart", {}, "colour"), ("yellow heart", {}, "colour"),
                   ("black heart", {}, "colour"), ("red heart, twitter style", {}, "added words"),
                   ("red heart", {"reweight": {"red": 3.0}}, "red x3")]),
    ("grinning face", [("winking face", {}, "expression"), ("angry face", {}, "expression"),
                       ("crying face", {}, "expression"), ("thinking face", {}, "expression"),
                       ("grinning face, twitter style", {}, "added words"),
                       ("grinning face", {"reweight": {"grinning": 3.0}}, "grinning x3")]),
]


def _rgba(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGBA"))


def _tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.from_numpy(np.stack([_rgba(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def alpha_iou(a: Image.Image, b: Image.Image) -> float:
    ma, mb = _rgba(a)[..., 3] > 127, _rgba(b)[..., 3] > 127
    union = (ma | mb).sum()
    return float((ma & mb).sum() / union) if union else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/images")
    p.add_argument("--json", default="runs/editing.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=1, help="seeds per pair")
    p.add_argument("--inversions", type=int, default=6, help="held-out images to invert")
    p.add_argument("--data", default="~/.cache/dreamlab/data/emoji")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: grid,pairs,inversion,diffedit")
    args = p.parse_args()
    os.environ.setdefault("DREAMLAB_CACHE", "/tmp/dreamlab-editing-cache")

    from dreamlab.eval.judge import judge_outputs
    from dreamlab.generate import encode_image, generate, make_request
    from dreamlab.images import labelled_grid

    model, judge, index, out, skip, results = setup(args)
    base = dict(steps=args.steps, cfg_scale=5.0)

    if "grid" not in skip:
        images, captions = [], []
        for source, edits in GRID:
            for method in ("p2p", "regen"):
                src = generate(model, make_request(prompt=source, seed=0, **base)).images[0]
                images.append(src)
                captions.append(source if method == "p2p" else "(same seed)")
                for target, options, kind in edits:
                    if method == "p2p":
                        im = generate(model, make_request(prompt=source, seed=0, **base, edit={"target": target, **options})).images[0]
                    else:
                        im = generate(model, make_request(prompt=target, seed=0, **base)).images[0]
                    images.append(im)
                    captions.append(f"{kind}: {target.split(',')[0][:14]}" if method == "p2p" else f"regen: {target[:15]}")
        labelled_grid(images, captions, cols=7).save(out / "editing-grid.png")
        print(f"grid -> {out / 'editing-grid.png'}")

    if "pairs" not in skip:
        methods = ("prompt-to-prompt", "regeneration", "SDEdit 0.5", "SDEdit 0.75")
        rows = {m: {"iou": [], "cos": [], "top5": []} for m in methods}
        t0 = time.time()
        for source, target in PAIRS:
            for seed in range(args.seeds):
                src = generate(model, make_request(prompt=source, seed=seed, **base)).images[0]
                outs = {
                    "prompt-to-prompt": generate(model, make_request(prompt=source, seed=seed, **base, edit={"target": target})).images[0],
                    "regeneration": generate(model, make_request(prompt=target, seed=seed, **base)).images[0],
                }
                for s in (0.5, 0.75):
                    outs[f"SDEdit {s}"] = generate(model, make_request(prompt=target, seed=seed, **base, init_image=encode_image(src),
                                                                       strength=s)).images[0]
                feats, logits = judge_outputs(judge, _tensor([src, *outs.values()]))
                feats = torch.nn.functional.normalize(feats, dim=1)
                for k, (m, im) in enumerate(outs.items(), 1):
                    rows[m]["iou"].append(alpha_iou(src, im))
                    rows[m]["cos"].append(float(feats[0] @ feats[k]))
                    rows[m]["top5"].append(float(index[target] in logits[k].topk(5).indices.tolist()))
        results["pairs"] = {m: {k: float(np.mean(v)) for k, v in r.items()} for m, r in rows.items()}
        results["pairs_n"] = len(PAIRS) * args.seeds
        results["pairs_seconds"] = time.time() - t0
        print(json.dumps(results["pairs"], indent=1))

    if "inversion" not in skip:
        from dreamlab.data.captions import canonical_caption
        from dreamlab.data.dataset import EmojiDataset, to_rgba_uint8

        ds = EmojiDataset(Path(args.data).expanduser(), split="test")
        picks = [ds[i * (len(ds) // args.inversions)] for i in range(args.inversions)]
        inv = {}
        sheet, names = [], []
        for method in ("ddim", "null-text"):
            for cfg in (1.0, 5.0):
                psnrs, secs = [], []
                for j, (x, meta) in enumerate(picks):
                    real = Image.fromarray(to_rgba_uint8(x))
                    path = Path(os.environ["DREAMLAB_CACHE"]) / f"real-{j}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    real.save(path)
                    prompt = canonical_caption(meta)
                    t = time.time()
                    rec = generate(model, make_request(prompt=prompt, seed=0, steps=args.steps, cfg_scale=cfg,
                                                       init_image=encode_image(path),
                                                       edit={"target": prompt, "inversion": method})).images[0]
                    secs.append(time.time() - t)
                    a, b = _rgba(rec).astype(np.float32), _rgba(real).astype(np.float32)
                    psnrs.append(float(10 * np.log10(255**2 / max(1e-9, ((a - b) ** 2).mean()))))
                    if cfg == 5.0 and j < 4:
                        sheet += [real, rec] if method == "ddim" else [rec]
                        names += [prompt.split(",")[0][:16], f"{method} cfg 5"] if method == "ddim" else [f"{method} cfg 5"]
                inv[f"{method} cfg {cfg:g}"] = {"psnr": float(np.mean(psnrs)), "seconds": float(np.median(secs))}
        results["inversion"] = inv
        order = [i for j in range(4) for i in (2 * j, 2 * j + 1, 8 + j)]
        labelled_grid([sheet[i] for i in order], [names[i] for i in order], cols=6).save(out / "editing-inversion.png")
        print(json.dumps(inv, indent=1))

    if "diffedit" not in skip:
        # two emoji side by side, the left one to be edited: the true changed region is its silhouette
        swaps = [("red heart", "blue heart", "cat face"), ("cat face", "dog face", "red apple"),
                 ("red apple", "green apple", "dog face"), ("sun", "full moon", "banana"),
                 ("grinning face", "angry face", "pizza"), ("pizza", "hamburger", "rocket"),
                 ("rocket", "airplane", "sun"), ("pear", "lemon", "grinning face")]
        figure, scores = [], {}
        for threshold in (0.5, 0.25):
            ious = []
            for k, (left, target, right) in enumerate(swaps):
                a = generate(model, make_request(prompt=left, seed=k, **base)).images[0]
                b = generate(model, make_request(prompt=right, seed=k, **base)).images[0]
                comp = Image.new("RGBA", (128, 64), (0, 0, 0, 0))
                comp.alpha_composite(a, (0, 0))
                comp.alpha_composite(b, (64, 0))
                path = Path(os.environ["DREAMLAB_CACHE"]) / f"composite-{k}.png"
                comp.save(path)
                res = generate(model, make_request(prompt=f"{left} and {right}", seed=k, **base, width=128, height=64,
                                                   init_image=encode_image(path), sampler="ddim",
                                                   edit={"target": f"{target} and {right}", "auto_mask": True,
                                                         "mask_threshold": threshold}))
                m = np.asarray(res.masks[0]) > 0
                truth = np.zeros_like(m)
                truth[:, :64] = _rgba(a)[..., 3] > 127
                ious.append(float((m & truth).sum() / max(1, (m | truth).sum())))
                if k < 4 and threshold == 0.25:
                    figure += [comp, res.masks[0].convert("RGBA"), res.images[0]]
            scores[f"{threshold:g}"] = {"iou": float(np.mean(ious)), "ious": ious}
        results["diffedit"] = scores
        labelled_grid(figure, ["composite", "auto mask", "edit"] * 4, cols=6, scale=2).save(out / "editing-diffedit.png")
        print("DiffEdit", json.dumps({k: v["iou"] for k, v in scores.items()}))

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
