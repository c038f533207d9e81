"""Measure composition on the shipped default model (docs/composition.md).

    python benchmarks/composition_eval.py --out docs/images --json runs/composition.json

1. A bento-box scene from the emoji vocabulary and four more: the harmonised scene, its layers.
2. Per-layer alignment: the judge's top-5 for each layer's crop over generated layouts, against one
   prompt naming every object (which the model cannot place).
3. Illusions: the judge's top-5 for each view's prompt over prompt pairs and views; and how equivariant
   the latent space is under each view (decode(view(z)) against view(decode(z))).
4. ILVR: the distance of the result's N-downsampled image to the reference's, per N, and the spread.
5. Seconds per 128x128 and 256x256 canvas (MultiDiffusion windows of 64).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval_common import setup

FOODS = ["cooked rice", "sushi", "fried shrimp", "rice ball", "ginger root", "dango", "oden", "fish cake with swirl",
         "curry rice", "spaghetti", "bread", "cheese wedge", "croissant", "egg", "shortcake", "doughnut", "cookie",
         "carrot", "broccoli", "tomato", "avocado", "hot dog", "taco", "sandwich", "french fries", "red apple"]
SCENES = [
    ("a bento box with rice, sushi, shrimp and ginger", ["bento box"], ["cooked rice", "sushi", "fried shrimp", "ginger root"]),
    ("a breakfast", ["bowl with spoon"], ["croissant", "egg", "bread"]),
    ("a picnic", ["basket"], ["red apple", "sandwich", "cheese wedge"]),
    ("a party", ["wrapped gift"], ["balloon", "party popper", "shortcake"]),
    ("a winter day", ["snowman"], ["evergreen tree", "cloud", "house"]),
]
PAIRS = [("grinning face", "red heart"), ("cat face", "dog face"), ("sun", "full moon"), ("red apple", "green apple"),
         ("rocket", "star"), ("pizza", "cookie"), ("snowman", "evergreen tree"), ("fire", "droplet"),
         ("rabbit face", "mouse face"), ("winking face", "angry face"), ("banana", "carrot"), ("tiger face", "lion"),
         ("cloud", "umbrella"), ("doughnut", "bagel"), ("panda", "penguin"), ("basketball", "soccer ball"),
         ("crying face", "thinking face"), ("pear", "lemon"), ("house", "tent"), ("frog", "turtle")]


def _t(ims):
    from dreamlab.images import from_pil

    return from_pil(ims)


def _layout(container: str, foods: list[str], size: int, rng: random.Random) -> list[dict]:
    """A container filling the canvas (kept low) and foods on a grid inside it."""
    layers = [{"prompt": container, "box": [0, 0, size, size], "strength": 0.15}]
    k = len(foods)
    cols = 2
    cell = size // 2
    inset = size // 16
    for i, food in enumerate(foods):
        x, y = (i % cols) * cell, (i // cols) * cell
        if k == 3 and i == 2:
            x = cell // 2
        layers.append({"prompt": food, "box": [x + inset, y + inset, x + cell - inset, y + cell - inset],
                       "strength": 0.25, "seed": rng.randrange(10**6)})
    return layers


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="docs/images")
    p.add_argument("--json", default="runs/composition.json")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layouts", type=int, default=20)
    p.add_argument("--skip", default="")
    args = p.parse_args()

    from dreamlab.eval.judge import judge_outputs
    from dreamlab.generate import encode_image, generate, make_request
    from dreamlab.images import grid, labelled_grid, on_background

    model, judge, index, out, skip, results = setup(args)
    base = dict(steps=args.steps, cfg_scale=5.0)

    def top5(images, names) -> list[float]:
        _, logits = judge_outputs(judge, _t(images))
        return [float(index[n] in logits[i].topk(5).indices.tolist()) for i, n in enumerate(names)]

    if "scenes" not in skip:
        sheets = []
        rng = random.Random(0)
        for k, (prompt, container, foods) in enumerate(SCENES):
            layers = _layout(container[0], foods, 128, rng)
            res = generate(model, make_request(prompt=prompt, width=128, height=128, seed=k, **base, collage={"layers": layers}))
            row = [res.sources[0], res.images[0]] + [im.crop(tuple(layer["box"])).resize((128, 128), Image.NEAREST)
                                                   for im, layer in zip(res.layers[0], layers)]
            names = ["layers restacked", "harmonised"] + [layer["prompt"] for layer in layers]
            sheets.append(labelled_grid(row, names, cols=len(row), scale=1))
        w = max(s.width for s in sheets)
        sheet = Image.new("RGB", (w, sum(s.height for s in sheets)), "white")
        y = 0
        for s in sheets:
            sheet.paste(s, (0, y))
            y += s.height
        sheet.save(out / "composition-scenes.png")

    if "layers" not in skip:
        rng = random.Random(1)
        hits_layers, hits_single, hits_raw, secs = [], [], [], []
        for n in range(args.layouts):
            foods = rng.sample(FOODS, 4)
            layers = [{"prompt": f, "box": [(i % 2) * 64, (i // 2) * 64, (i % 2) * 64 + 64, (i // 2) * 64 + 64], "strength": 0.25}
                      for i, f in enumerate(foods)]
            t = time.time()
            res = generate(model, make_request(prompt="a table of food", width=128, height=128, seed=n, **base,
                                               collage={"layers": layers}))
            secs.append(time.time() - t)
            one = generate(model, make_request(prompt=", ".join(foods), width=128, height=128, seed=n, window=64, **base)).images[0]
            crops = [res.images[0].crop(tuple(layer["box"])) for layer in layers]
            raw = [res.sources[0].crop(tuple(layer["box"])) for layer in layers]
            single = [one.crop(tuple(layer["box"])) for layer in layers]
            hits_layers += top5(crops, foods)
            hits_raw += top5(raw, foods)
            hits_single += top5(single, foods)
        results["layers"] = {"harmonised": float(np.mean(hits_layers)), "restacked layers": float(np.mean(hits_raw)),
                             "one prompt naming all (windows)": float(np.mean(hits_single)), "n_layers": len(hits_layers),
                             "seconds_per_collage": float(np.median(secs))}
        print(json.dumps(results["layers"], indent=1))

    if "illusions" not in skip:
        from dreamlab.compose.views import VIEWS

        by_view = {}
        shown = []
        for view in ("rotate180", "flip", "rotate90"):
            hits = []
            for k, (a, b) in enumerate(PAIRS):
                if a not in index or b not in index:
                    continue
                im = generate(model, make_request(prompt=a, seed=k, **base, illusion={"prompts": [a, b], "views": ["identity", view]})).images[0]
                turned = _t([im])
                turned = VIEWS[view].apply(turned)
                from dreamlab.images import to_pil

                hits.append(top5([im, to_pil(turned)[0]], [a, b]))
                if k < 4 and view == "rotate180":
                    shown += [im, to_pil(turned)[0]]
            h = np.array(hits)
            by_view[view] = {"first prompt": float(h[:, 0].mean()), "under the view": float(h[:, 1].mean()),
                             "both": float((h.sum(1) == 2).mean()), "pairs": len(hits)}
        # latent equivariance: decode(view(z)) against view(decode(z)), relative to the image's own size
        z = model.space.encode(_t([generate(model, make_request(prompt=p, seed=0, **base)).images[0] for p in ("cat face", "red heart")]))
        eq = {}
        for name in ("flip", "rotate180", "rotate90", "mirror"):
            v = VIEWS[name]
            with torch.no_grad():
                a, b = model.space.decode(v.apply(z)), v.apply(model.space.decode(z))
            eq[name] = float((a - b).abs().mean() / b.abs().mean())
        results["illusions"] = by_view
        results["latent_equivariance_relative_error"] = eq
        labelled_grid(shown, [f"{a}" if i % 2 == 0 else f"rotated: {b}" for i, (a, b) in enumerate([p for p in PAIRS[:4] for _ in (0, 1)])],
                      cols=8).save(out / "composition-illusions.png")
        print(json.dumps(by_view, indent=1), json.dumps(eq))

    if "ilvr" not in skip:
        ref = generate(model, make_request(prompt="red heart", seed=3, **base)).images[0]
        ref.save("/tmp/ilvr-ref.png")
        r8 = torch.nn.functional.avg_pool2d(_t([ref]), 8)
        ilvr, row = {}, [ref]
        free = [generate(model, make_request(prompt="", seed=s, **base)).images[0] for s in range(4)]
        ilvr["none"] = float(np.mean([(torch.nn.functional.avg_pool2d(_t([im]), 8) - r8).abs().mean() for im in free]))
        for n in (8, 16, 32):
            ims = [generate(model, make_request(prompt="", seed=s, **base, ilvr={"reference": encode_image(ref), "factor": n})).images[0]
                   for s in range(4)]
            down = [float((torch.nn.functional.avg_pool2d(_t([im]), n) - torch.nn.functional.avg_pool2d(_t([ref]), n)).abs().mean()) for im in ims]
            ilvr[str(n)] = {"error_at_N": float(np.mean(down)), "spread": float(_t(ims).std(0).mean())}
            row += ims[:2]
        results["ilvr"] = ilvr
        grid([on_background(im) for im in row], cols=len(row), scale=2).save(out / "composition-ilvr.png")
        print(json.dumps(ilvr, indent=1))

    if "speed" not in skip:
        speed = {}
        for side in (64, 128, 256):
            t = time.time()
            generate(model, make_request(prompt="a field of flowers", width=side, height=side, seed=0, steps=30, cfg_scale=5.0,
                                         window=64 if side > 64 else None))
            speed[str(side)] = time.time() - t
        results["seconds_per_canvas_30_steps"] = speed
        print(speed)

    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
