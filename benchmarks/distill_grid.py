"""The figure of docs/distillation.md: the same prompts and seeds from the teacher and from each student at
each step count, one row per setting.

    python benchmarks/distill_grid.py --student consistency=src/dreamlab/weights/fast \\
        --student progressive=runs/distill-pd/stages/{n}step --out docs/images/distill-grid.png

A student folder may hold ``{n}``: a progressive run has one folder per step count (its stages).
"""

from __future__ import annotations

import argparse
from pathlib import Path

PROMPTS = ("red apple, twitter style", "grinning cat, google style", "rocket, twitter style", "snowman, google style",
           "waving hand, google style", "sun, twitter style", "pizza, google style", "red heart, twitter style")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--student", action="append", default=[], help="NAME=DIR (DIR may hold {n})")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--cfg", type=float, default=4.0)
    p.add_argument("--out", default="docs/images/distill-grid.png")
    args = p.parse_args()

    from dreamlab.generate import generate
    from dreamlab.images import labelled_grid
    from dreamlab.loading.model import load_model
    from dreamlab.request import make_request

    def row(model, label: str, **fields) -> tuple[list, list]:
        ims = [generate(model, make_request(prompt=text, seed=k, cfg_scale=args.cfg, **fields)).images[0]
               for k, text in enumerate(PROMPTS)]
        return ims, [label] * len(ims)

    cells, captions = [], []
    teacher = load_model()
    for label, fields in (("teacher 30 dpmpp", {"steps": 30}), ("teacher 4 ddim", {"steps": 4, "sampler": "ddim", "schedule": "trailing"})):
        ims, caps = row(teacher, label, **fields)
        cells += ims
        captions += caps
    for spec in args.student:
        name, _, folder = spec.partition("=")
        for n in (int(s) for s in args.steps.split(",")):
            path = Path(folder.format(n=n)).expanduser()
            if not path.exists():
                continue
            ims, caps = row(load_model(path), f"{name} {n}", steps=n)
            cells += ims
            captions += caps
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(cells, captions, cols=len(PROMPTS)).save(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
