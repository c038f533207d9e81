"""Measure instruction editing (docs/control.md): the shipped (or a given) InstructPix2Pix model on held-out
real emoji, over a grid of image and text guidance, against prompt-to-prompt with null-text inversion.

    python benchmarks/instruct_eval.py --model src/dreamlab/weights/instruct --n 24 --json docs/instruct-results.json

The sources are emoji of the test split (never rendered into the training pairs: `dreamlab data instruct`
draws its edits from the training split), each with one edit drawn from the catalog of its kinds
(colour, swap, expression, tone, style, add, remove). For every (s_I, s_T) of the grid and for the
baseline: edit achieved (the judge's top-5 names the target emoji; for tone and style edits, whose
target is the same emoji, that it is still recognised) and the source kept (cosine of the judge's
features and IoU of the alpha masks against the source), and seconds per edit. The baseline inverts the
real source with null-text inversion under its caption, then edits the caption (prompt-to-prompt), so it
is told the source caption the instruction model never sees. Writes the paper's trade-off plot
(docs/images/instruct-tradeoff.png) and a grid of edits (docs/images/instruct-grid.png).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="instruct", help="the instruction model (default: the shipped one)")
    p.add_argument("--data", default="~/.cache/dreamlab/data/emoji")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--image-scales", default="1.0,1.5,2.0,3.0")
    p.add_argument("--text-scales", default="3,5,7.5")
    p.add_argument("--no-baseline", action="store_true", help="skip prompt-to-prompt with null-text inversion")
    p.add_argument("--images", default="docs/images")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()

    from dreamlab.eval.instruct import Scorer, held_out_edits, instruct_edits, prompt_to_prompt_edits
    from dreamlab.images import labelled_grid
    from dreamlab.loading.model import load_model

    model, base = load_model(args.model), load_model()
    edits = held_out_edits(args.data, args.n, args.seed)
    score = Scorer(edits)
    results = {"n": len(edits), "steps": args.steps, "model": model.source, "kinds": {}, "grid": [],
               "sources": score([s for s, _ in edits])}
    for _, e in edits:
        results["kinds"][e.kind] = results["kinds"].get(e.kind, 0) + 1
    picked: dict = {}
    for s_i in (float(v) for v in args.image_scales.split(",")):
        for s_t in (float(v) for v in args.text_scales.split(",")):
            outs, seconds = instruct_edits(model, edits, image_scale=s_i, text_scale=s_t, steps=args.steps)
            row = {"image_scale": s_i, "text_scale": s_t, **score(outs), "seconds_per_edit": seconds}
            results["grid"].append(row)
            picked[(s_i, s_t)] = outs
            print(json.dumps(row), flush=True)
    if not args.no_baseline:
        outs, seconds = prompt_to_prompt_edits(base, edits, steps=args.steps)
        results["prompt_to_prompt_null_text"] = {**score(outs), "seconds_per_edit": seconds}
        picked["p2p"] = outs
        print(json.dumps(results["prompt_to_prompt_null_text"]), flush=True)

    images = Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    _plot(results, images / "instruct-tradeoff.png")
    show = min(8, len(edits))
    default = (model.defaults.image_cfg_scale, model.defaults.cfg_scale)
    rows = [("source", [s for s, _ in edits][:show]), (f"s_I {default[0]:g}, s_T {default[1]:g}", picked.get(default, [])[:show])]
    if "p2p" in picked:
        rows.append(("p2p + null-text", picked["p2p"][:show]))
    cells, captions = [], []
    for name, ims in rows:
        for k, im in enumerate(ims):
            cells.append(im)
            captions.append(edits[k][1].instruction[:22] if name == "source" else name)
    labelled_grid(cells, captions, cols=show).save(images / "instruct-grid.png")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "grid"}, indent=1))


def _plot(results: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for s_t in sorted({r["text_scale"] for r in results["grid"]}):
        pts = sorted((r for r in results["grid"] if r["text_scale"] == s_t), key=lambda r: r["image_scale"])
        ax.plot([r["cos"] for r in pts], [r["edit_top5"] for r in pts], marker="o", label=f"s_T = {s_t:g}")
        for r in pts:
            ax.annotate(f"{r['image_scale']:g}", (r["cos"], r["edit_top5"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if "prompt_to_prompt_null_text" in results:
        b = results["prompt_to_prompt_null_text"]
        ax.scatter([b["cos"]], [b["edit_top5"]], marker="*", s=120, color="k", label="prompt-to-prompt + null-text")
    ax.axhline(results["sources"]["edit_top5"], color="grey", ls="--", lw=1, label="the unedited sources")
    ax.set_xlabel("similarity to the source (judge-feature cosine)")
    ax.set_ylabel("edit achieved (judge top-5 of the target)")
    ax.set_title(f"Instruction editing on {results['n']} held-out emoji (labels: s_I)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
