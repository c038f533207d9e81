"""What still works with a few-step student (docs/distillation.md): img2img, inpainting and the ControlNets,
measured against the teacher on held-out real emoji.

    python benchmarks/student_checks.py --model fast --n 24 --json docs/student-checks.json

- img2img (SDEdit) at strengths 0.2-0.8, the source's own caption as the prompt: how much of the source is
  kept (cosine of the judge's features against the source), whether the emoji is still recognised (top-5),
  and how many network evaluations ran. The student runs all its steps below the strength (``lcm`` keeps
  its steps); the teacher's truncated grid runs ``int(steps * strength)``.
- inpainting: the right half of each emoji repainted from its caption: top-5, and the largest change
  outside the mask (the known region is pasted back at every step, so it stays the source up to the
  autoencoder).
- ControlNets (canny, shape; made for the teacher, offered to its students): `dreamlab control-eval`'s
  fidelity (edge F1, silhouette IoU), FID and top-5 at scales 0 and 1.
- negative prompts: "heart" with and without the negative prompt "red", 8 seeds: the share of opaque pixels
  that are red, the rows a step, and the note a student's result carries (guidance on its scale-1 rows).
- a grid: a few sources, img2img at 0.4 and 0.7, inpainting, and canny, student beside teacher.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


NEGATIVE_TEST = ("heart, google style", "red")  # (a prompt whose usual colour the negative prompt names)


class _Count:
    """A stage input that counts the network's rows (the UNet evaluations) of a request."""

    def __init__(self):
        self.rows = 0

    def model_wrapper(self, i, noise, sigmas):
        def wrap(call):
            self.rows += call.x_t.shape[0]
            return call

        return wrap


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fast", help="the student (default: the shipped one)")
    p.add_argument("--teacher-steps", type=int, default=20)
    p.add_argument("--data", default="~/.cache/dreamlab/data/emoji")
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--strengths", default="0.2,0.4,0.6,0.8")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: img2img,inpaint,control,negative")
    p.add_argument("--json", default=None)
    p.add_argument("--grid", default="docs/images/student-checks.png")
    args = p.parse_args()

    import numpy as np
    import torch
    from PIL import Image

    from dreamlab.data.captions import canonical_caption
    from dreamlab.data.dataset import EmojiDataset, to_rgba_uint8
    from dreamlab.eval.control import evaluate_controlnet
    from dreamlab.eval.evaluate import _images, held_out_prompts
    from dreamlab.eval.judge import judge_outputs, load_judge
    from dreamlab.generate import generate
    from dreamlab.eval.metrics import topk_accuracy
    from dreamlab.images import from_pil, labelled_grid
    from dreamlab.loading.model import load_model
    from dreamlab.request import encode_image, make_request
    from dreamlab.settings import default_judge_dir

    skip = set(filter(None, args.skip.split(",")))
    student, teacher = load_model(args.model), load_model()
    judge, bases, _ = load_judge(default_judge_dir())
    pos = {b: i for i, b in enumerate(bases)}
    test = EmojiDataset(Path(args.data).expanduser(), split="test")
    records = held_out_prompts(test, args.n)
    real = _images(test, records)
    sources = [Image.fromarray(to_rgba_uint8(x), "RGBA") for x in real]
    f_src, _ = judge_outputs(judge, real)
    labels = torch.tensor([pos[r["base"]] for r in records])
    models = {"student": (student, {}), "teacher": (teacher, {"steps": args.teacher_steps})}
    results: dict = {"student": student.source, "teacher": teacher.source, "n": len(records),
                     "student_defaults": {"sampler": student.defaults.sampler, "steps": student.defaults.steps},
                     "teacher_steps": args.teacher_steps}
    shown: dict = {}

    def score(images: list) -> dict:
        feats, logits = judge_outputs(judge, from_pil(images))
        cos = torch.nn.functional.cosine_similarity(feats, f_src, dim=1).mean()
        return {"cosine_to_source": float(cos), "top5": topk_accuracy(logits, labels, ks=(5,))[5]}

    def generate_all(model, requests: list[dict]) -> tuple[list, dict]:
        """One image per request's fields, with the UNet rows per image, the seconds and the notes."""
        images, rows, notes, t0 = [], 0, set(), time.perf_counter()
        for fields in requests:
            count = _Count()
            res = generate(model, make_request(**fields), inputs=[count])
            images.append(res.images[0])
            rows += count.rows
            notes.update(res.notes)
        return images, {"unet_rows_per_image": rows / len(requests), "seconds_per_image": (time.perf_counter() - t0) / len(requests),
                        "notes": sorted(notes)}

    def run(model, extra: dict, **fields) -> tuple[list, dict]:
        """Each held-out source, asked for with its caption (img2img, inpainting)."""
        return generate_all(model, [dict(prompt=canonical_caption(r), seed=k, init_image=encode_image(src), **extra, **fields)
                                    for k, (r, src) in enumerate(zip(records, sources))])

    if "img2img" not in skip:
        results["img2img"] = []
        for s in (float(v) for v in args.strengths.split(",")):
            for name, (model, extra) in models.items():
                images, info = run(model, extra, strength=s)
                row = {"who": name, "strength": s, **score(images), **info}
                results["img2img"].append(row)
                shown[(name, f"img2img {s:g}")] = images
                print(json.dumps(row), flush=True)
    if "inpaint" not in skip:
        mask = Image.new("L", sources[0].size, 0)
        mask.paste(255, (sources[0].width // 2, 0, sources[0].width, sources[0].height))
        results["inpaint"] = []
        for name, (model, extra) in models.items():
            images, info = run(model, extra, mask_image=encode_image(mask), strength=1.0)
            keep = np.asarray(mask) == 0
            outside = max(float(np.abs(np.asarray(a.convert("RGBA"), dtype=np.float32) - np.asarray(b, dtype=np.float32))[keep].max())
                          for a, b in zip(images, sources))
            row = {"who": name, **score(images), "max_change_outside_mask": outside / 255, **info}
            results["inpaint"].append(row)
            shown[(name, "inpaint right half")] = images
            print(json.dumps(row), flush=True)
    if "negative" not in skip:
        results["negative"] = []
        for name, (model, extra) in models.items():
            for negative in ("", NEGATIVE_TEST[1]):
                images, info = generate_all(model, [dict(prompt=NEGATIVE_TEST[0], negative_prompt=negative, seed=k, **extra)
                                                    for k in range(8)])
                px = np.stack([np.asarray(im.convert("RGBA"), dtype=np.int32) for im in images])
                opaque = px[..., 3] > 128
                red = (px[..., 0] > px[..., 1] + 40) & (px[..., 0] > px[..., 2] + 40) & opaque
                row = {"who": name, "negative_prompt": negative or None, "red_share": float(red.sum() / max(1, opaque.sum())),
                       "unet_rows_per_image": info["unet_rows_per_image"], "notes": info["notes"]}
                results["negative"].append(row)
                shown[(name, f"negative {negative or '-'}")] = images
                print(json.dumps(row), flush=True)
    if "control" not in skip:
        weights = Path(__file__).resolve().parents[1] / "src/dreamlab/weights/controlnets"
        results["control"] = {}
        for cond in ("canny", "shape"):
            for prompt in (False, True):  # the map alone (where a ControlNet shows), and with the caption
                for name, (model, extra) in models.items():
                    steps = extra.get("steps", model.defaults.steps)
                    scored = evaluate_controlnet(model, weights / cond, cond, args.data, n=args.n, scales=(0.0, 1.0), steps=steps,
                                                 cfg_scale=model.defaults.cfg_scale or 5.0, prompt=prompt)
                    key = f"{cond}/{name}/{'caption' if prompt else 'empty prompt'}"
                    results["control"][key] = scored
                    print(key, json.dumps(scored), flush=True)

    if shown and len(shown) > 2:  # (a run of the ControlNets alone keeps the grid)
        show = min(6, len(sources))
        cells, captions = list(sources[:show]), ["source"] * show
        for (name, what), images in shown.items():
            cells += images[:show]
            captions += [f"{name}: {what}"[:24]] * show
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        labelled_grid(cells, captions, cols=show).save(args.grid)
    if args.json:  # parts left out (--skip) keep their earlier results
        old = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
        Path(args.json).write_text(json.dumps({**old, **results}, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k not in ("img2img", "inpaint", "control", "negative")}, indent=1))


if __name__ == "__main__":
    main()
