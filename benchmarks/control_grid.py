"""The lecture's ControlNet figure: one held-out control map under several prompts (docs/control.md).

    python benchmarks/control_grid.py --condition shape --out docs/images/controlnet-shape-grid.png

The map is computed from one held-out image (the test split) with the condition's preprocessing; each
prompt is generated with the shipped ControlNet at --scale, seed 0, the model's default steps; the last
two cells are two of the prompts without the ControlNet, for comparison.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PROMPTS = ["red apple", "sun", "cat face", "full moon", "soccer ball", "grinning face"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--condition", default="canny")
    p.add_argument("--data", default="~/.cache/dreamlab/data/emoji")
    p.add_argument("--label", default="face with tears of joy", help="the held-out emoji whose map is used")
    p.add_argument("--style", default="google")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--prompts", default=",".join(PROMPTS))
    p.add_argument("--out", required=True)
    args = p.parse_args()

    from dreamlab.control.conditions import get_condition
    from dreamlab.data.dataset import EmojiDataset
    from dreamlab.generate import encode_image, generate, make_request
    from dreamlab.images import labelled_grid
    from dreamlab.loading.model import load_model

    test = EmojiDataset(Path(args.data).expanduser(), split="test")
    k = next((i for i, r in enumerate(test.records) if r["label"] == args.label and r["style"] == args.style
              and not r.get("skin_tone")), 0)
    rgba = test.rgba(k)
    m = get_condition(args.condition).preprocess(rgba)
    hint = Image.fromarray((m[..., 0] * 255).astype(np.uint8), "L")
    model = load_model()
    prompts = [s.strip() for s in args.prompts.split(",") if s.strip()]
    cells = [Image.fromarray(rgba, "RGBA"), hint.convert("RGBA")]
    captions = [f"held out: {test.records[k]['label'][:14]}", f"{args.condition} map"]
    control = [{"condition": args.condition, "image": encode_image(hint), "scale": args.scale}]
    for prompt in prompts:
        cells.append(generate(model, make_request(prompt=prompt, seed=0, controls=control)).images[0])
        captions.append(prompt)
    for prompt in prompts[:2]:
        cells.append(generate(model, make_request(prompt=prompt, seed=0)).images[0])
        captions.append(f"{prompt} (no control)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(cells, captions, cols=len(cells) // 2 if len(cells) % 2 == 0 else 5).save(args.out)
    print(f"{args.out}: {len(cells)} cells, map of {test.records[k]['label']} ({args.style})")


if __name__ == "__main__":
    main()
