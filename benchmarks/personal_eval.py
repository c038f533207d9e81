"""Measure personalization on the shipped default model (docs/personalization.md).

    python benchmarks/personal_eval.py --runs ~/.cache/dreamlab/runs/personal --out docs/images --json docs/personalization-results.json
    python benchmarks/personal_eval.py --curve fluent-cat,fluent-style --curve-steps 800   # quality against steps
    python benchmarks/personal_eval.py --imagic                                              # Imagic eta grid

Data: `dreamlab data personal` (Fluent Emoji flat and OpenMoji sets the model never saw). For every set and
method (textual inversion, LoRA, DreamBooth-LoRA with prior preservation), train on the set's images, then
measure with the judge (the emoji classifier shipped beside the model) in place of DreamBooth's DINO and CLIP:

- subject fidelity: mean judge-feature cosine between generated images and the set's images, for the
  learned prompt (the identifier, or the token) with the set's context prompts; the baseline is the base
  model drawing the class prompt with the same contexts (for a style: the same emoji without the style).
- prompt fidelity: for a style, the judge's top-5 names the emoji of a held-out prompt ("strawberry, wcw
  style"); for a subject, the cosine between its context images and the base model's images of the same
  context on the class ("a cat face with a crown"): the context still shows.
- palette distance: L1 between the colour histograms of the generated images and the set's (0..2, lower
  is closer), against the base model's: the judge is trained to name an emoji whatever its style (Noto
  and Twemoji alike), so its features barely see a style; colours do.
- prior: (subjects, LoRA and DreamBooth-LoRA) the class prompt alone after fine-tuning, its cosine to the
  base model's class images: 1 = the class kept its look, lower = the subject leaked into the class.
Trainings and scores are kept in --runs and reused, so the script resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ti", "lora", "dreambooth")
SEEDS = (0, 1)


def _judge():
    from dreamlab.eval.judge import load_judge

    judge, _, labels = load_judge(ROOT / "src/dreamlab/weights/judge")
    return judge, {label: i for i, label in enumerate(labels)}


def _tensor(images) -> torch.Tensor:
    arr = np.stack([np.asarray(im.convert("RGBA"), dtype=np.float32) for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1


def _features(judge, images) -> tuple[torch.Tensor, torch.Tensor]:
    from dreamlab.eval.judge import judge_outputs

    f, logits = judge_outputs(judge, _tensor(images))
    return torch.nn.functional.normalize(f, dim=-1), logits


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a @ b.T).mean())


def _palette(images) -> np.ndarray:
    """The mean colour histogram (8 bins a channel) of the opaque pixels of ``images``, normalised."""
    h = np.zeros(512)
    for im in images:
        a = np.asarray(im.convert("RGBA"))
        rgb = a[a[..., 3] > 128][:, :3] // 32
        idx = rgb[:, 0] * 64 + rgb[:, 1] * 8 + rgb[:, 2]
        h += np.bincount(idx, minlength=512) / max(1, len(idx))
    return h / max(1, len(images))


def palette_distance(images, refs) -> float:
    """L1 distance (0..2) between the colour histograms of two image sets: the look a judge trained to
    ignore style (Noto against Twemoji) does not see. Lower is closer."""
    return float(np.abs(_palette(images) - _palette(refs)).sum())


def _prompts(s, method: str) -> tuple[str, list[str]]:
    """(training prompt, evaluation prompts) of a set for a method: textual inversion writes <id>."""
    ident = s.identifier
    word = f"<{ident}>" if method == "ti" else ident
    fix = lambda p: p.replace(ident, word)  # noqa: E731
    train = f"a {word} {s.class_noun}" if s.kind == "subject" else f"{{caption}}, {word} style"
    return train, [fix(p) for p in s.eval_prompts]


def train(s, method: str, steps: int, runs: Path, snapshot_every: int = 0) -> tuple[Path, float]:
    """Train (or reuse) the adapter of ``method`` on set ``s``; (its folder, training seconds)."""
    out = runs / f"{s.name}-{method}-{steps}"
    done = out / ("learned_embeds.safetensors" if method == "ti" else "pytorch_lora_weights.safetensors")
    if not done.exists():
        train_prompt, _ = _prompts(s, method)
        if method == "ti":
            from dreamlab.settings import EmbeddingConfig
            from dreamlab.train.embedding import train_embedding

            train_embedding(EmbeddingConfig(images=str(s.folder), token=f"<{s.identifier}>", out=str(out),
                                            init_word=s.class_noun.split()[-1] if s.class_noun else "emoji",
                                            kind="object" if s.kind == "subject" else "style", steps=steps,
                                            snapshot_every=snapshot_every, samples=False))
        else:
            from dreamlab.settings import LoraTrainConfig
            from dreamlab.train.lora import train_lora

            cls = (f"a {s.class_noun}" if s.kind == "subject" else "{caption}") if method == "dreambooth" else None
            train_lora(LoraTrainConfig(images=str(s.folder), instance=train_prompt, out=str(out), class_prompt=cls,
                                       class_images=16, steps=steps, snapshot_every=snapshot_every, samples=False))
    meta = json.loads((out / ("dreamlab_embedding.json" if method == "ti" else "dreamlab_lora.json")).read_text())
    return out, float(meta.get("train_seconds", 0.0))


def _generate(model, prompts, patches=(), loras=(), steps=20):
    from dreamlab.generate import generate
    from dreamlab.request import make_request

    images = []
    for p in prompts:
        for seed in SEEDS:
            images += generate(model, make_request(prompt=p, seed=seed, steps=steps, loras=list(loras)), patches=patches).images
    return images


def score(model, judge, labels, s, method: str, folder: Path, base_cache: dict) -> dict:
    """The set's metrics for the adapter in ``folder`` (an embedding or LoRA folder)."""
    _, evals = _prompts(s, method)
    refs, _ = _features(judge, [Image.open(p) for p in s.images])
    key = s.name
    if key not in base_cache:  # the base model on the class with the same contexts
        base_imgs = _generate(model, s.eval_class_prompts)
        base_cls = _generate(model, [f"a {s.class_noun}"]) if s.kind == "subject" else []
        base_cache[key] = (base_imgs, base_cls)
    base_imgs, base_cls = base_cache[key]
    bf, _ = _features(judge, base_imgs)
    if method == "ti":
        model.adapters.register(folder, "embedding")
        loras = []
    else:
        name = model.adapters.register(folder, "lora")
        loras = [{"name": name, "scale": 1.0}]
    try:
        imgs = _generate(model, evals, loras=loras)
        cls_imgs = _generate(model, [f"a {s.class_noun}"], loras=loras) if s.kind == "subject" and method != "ti" else []
    finally:
        model.adapters.registered["embedding"].clear()
        model.adapters.registered["lora"].clear()
    gf, logits = _features(judge, imgs)
    ref_imgs = [Image.open(p) for p in s.images]
    row = {"set": s.name, "kind": s.kind, "method": method, "subject_fidelity": _cos(gf, refs),
           "base_subject_fidelity": _cos(bf, refs), "palette_distance": palette_distance(imgs, ref_imgs),
           "base_palette_distance": palette_distance(base_imgs, ref_imgs)}
    if s.kind == "style":
        names = [p.rsplit(",", 1)[0].strip() for p in s.eval_class_prompts for _ in SEEDS]
        idx = torch.tensor([labels.get(n, -1) for n in names])
        top5 = logits.topk(5, dim=-1).indices
        ok = [(int(i) in top5[k].tolist()) for k, i in enumerate(idx) if int(i) >= 0]
        _, base_logits = _features(judge, base_imgs)
        base_top5 = base_logits.topk(5, dim=-1).indices
        base_ok = [(int(i) in base_top5[k].tolist()) for k, i in enumerate(idx) if int(i) >= 0]
        row.update(prompt_top5=float(np.mean(ok)), base_prompt_top5=float(np.mean(base_ok)))
    else:
        # context kept: each image against the base model's image of the same context and seed
        row["prompt_fidelity"] = float((gf * bf).sum(-1).mean())
        if cls_imgs:
            cf, _ = _features(judge, cls_imgs)
            bcf, _ = _features(judge, base_cls)
            row["prior_class_cosine"] = float((cf * bcf).sum(-1).mean())
            row["class_subject_cosine"] = _cos(cf, refs)
    row["sample"] = imgs[0]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=str(Path("~/.cache/dreamlab/runs/personal").expanduser()))
    ap.add_argument("--out", default=str(ROOT / "docs/images"))
    ap.add_argument("--json", default=str(ROOT / "docs/personalization-results.json"))
    ap.add_argument("--sets", default="", help="comma-separated set names (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--curve", default="", help="sets to score against training steps (snapshots)")
    ap.add_argument("--curve-steps", type=int, default=800)
    ap.add_argument("--imagic", action="store_true", help="the Imagic eta grid on 6 held-out images instead")
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from dreamlab.data.personal import load_sets
    from dreamlab.loading.model import load_model

    sets = load_sets()
    if args.sets:
        sets = [s for s in sets if s.name in args.sets.split(",")]
    runs = Path(args.runs).expanduser()
    runs.mkdir(parents=True, exist_ok=True)
    model = load_model()
    judge, labels = _judge()
    results_file = Path(args.json)
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    base_cache: dict = {}
    samples: dict = {}

    if args.imagic:
        results["imagic"] = imagic_grid(model, judge, labels, Path(args.out) / "imagic-grid.png")
        results_file.write_text(json.dumps(results, indent=1) + "\n")
        return

    if args.curve:
        curve = results.setdefault("curve", {})
        for s in [s for s in sets if s.name in args.curve.split(",")]:
            for method in args.methods.split(","):
                folder, seconds = train(s, method, args.curve_steps, runs, snapshot_every=100)
                points = []
                for snap in sorted((folder / "snapshots").glob("step-*")) + [folder]:
                    step = int(snap.name.split("-")[1]) if snap.name.startswith("step-") else args.curve_steps
                    row = score(model, judge, labels, s, method, snap, base_cache)
                    row.pop("sample")
                    points.append({"step": step, "seconds": seconds * step / args.curve_steps, **row})
                    print(json.dumps(points[-1]))
                curve[f"{s.name}/{method}"] = points
                results_file.write_text(json.dumps(results, indent=1) + "\n")
        _plot_curve(curve, Path(args.out) / "personalization-curve.png")
        return

    rows = results.setdefault("rows", {})
    for s in sets:
        for method in args.methods.split(","):
            key = f"{s.name}/{method}/{args.steps}"
            t0 = time.time()
            folder, seconds = train(s, method, args.steps, runs)
            row = score(model, judge, labels, s, method, folder, base_cache)
            samples[(s.name, method)] = row.pop("sample")
            rows[key] = {**row, "train_seconds": seconds, "steps": args.steps}
            print(json.dumps(rows[key]), f"({time.time() - t0:.0f} s)", flush=True)
            results_file.write_text(json.dumps(results, indent=1) + "\n")
    results["summary"] = summary(rows, args.steps)
    results_file.write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["summary"], indent=1))
    if samples:
        _sheet(sets, samples, Path(args.out) / "personalization-grid.png")


IMAGIC = [  # (source: a held-out emoji of the test split, or a Fluent image the model never saw; target)
    ("crying face", "smiling face"), ("face with tears of joy", "winking face"), ("crying cat", "grinning cat"),
    ("pear", "green apple"), ("rocket", "airplane"), ("fluent:grinning-face", "winking face"),
]
ETAS = (0.0, 0.6, 0.8, 1.0, 1.2)


def _source(label: str) -> bytes:
    import io

    if label.startswith("fluent:"):
        return (Path("~/.cache/dreamlab/data/personal/fluent-face").expanduser() / f"{label[7:]}.png").read_bytes()
    from dreamlab.data.catalog import DEFAULT_DATA_DIR

    root = Path(DEFAULT_DATA_DIR).expanduser()
    rows = [json.loads(x) for x in (root / "metadata.jsonl").read_text().splitlines()]
    i = next(r["index"] for r in rows if r["label"] == label and r["split"] == "test" and r["style"] == "google")
    buf = io.BytesIO()
    Image.fromarray(np.load(root / "images.npy", mmap_mode="r")[i].copy(), "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def imagic_grid(model, judge, labels, path: Path) -> dict:
    """Imagic on 6 images: the source and each eta, the judge's top-5 for the target and the cosine to the
    source at each eta, and the seconds of preparation (embedding + fine-tuning) and of each edit."""
    import io

    from dreamlab.generate import generate
    from dreamlab.images import labelled_grid
    from dreamlab.imagic import prepare
    from dreamlab.request import make_request

    images, names, out = [], [], {"etas": list(ETAS), "rows": []}
    for source, target in IMAGIC:
        data = _source(source)
        src = Image.open(io.BytesIO(data))
        t0 = time.time()
        folder = prepare(model, data, target, cache=Path("~/.cache/dreamlab/runs/personal/imagic").expanduser())
        prep = time.time() - t0
        name = model.adapters.register(folder, "imagic")
        row_imgs, t1 = [], time.time()
        for eta in ETAS:
            row_imgs += generate(model, make_request(prompt=target, seed=0, imagic={"name": name, "eta": eta})).images
        per_edit = (time.time() - t1) / len(ETAS)
        sf, _ = _features(judge, [src])
        gf, logits = _features(judge, row_imgs)
        top5 = logits.topk(5, dim=-1).indices
        k = labels.get(target, -1)
        out["rows"].append({"source": source, "target": target, "prepare_seconds": round(prep, 1),
                            "edit_seconds": round(per_edit, 2),
                            "target_top5": [bool(k in t.tolist()) for t in top5],
                            "source_cosine": [round(float(c), 3) for c in (gf @ sf.T).squeeze(1)]})
        print(json.dumps(out["rows"][-1]), flush=True)
        images += [src, *row_imgs]
        names += [f"{source.removeprefix('fluent:')} -> {target}"] + [f"eta {e:g}" for e in ETAS]
    out["mean_target_top5"] = [float(np.mean([r["target_top5"][j] for r in out["rows"]])) for j in range(len(ETAS))]
    out["mean_source_cosine"] = [float(np.mean([r["source_cosine"][j] for r in out["rows"]])) for j in range(len(ETAS))]
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, names, cols=1 + len(ETAS)).save(path)
    return out


def summary(rows: dict, steps: int) -> dict:
    out = {}
    for method in METHODS:
        for kind in ("subject", "style"):
            rs = [r for k, r in rows.items() if r["method"] == method and r["kind"] == kind and r["steps"] == steps]
            if not rs:
                continue
            keys = [k for k in rs[0] if isinstance(rs[0][k], float)]
            out[f"{method}/{kind}"] = {"n": len(rs), **{k: round(float(np.mean([r[k] for r in rs if k in r])), 3) for k in keys}}
    return out


def _sheet(sets, samples, path: Path) -> None:
    from dreamlab.images import labelled_grid

    images, labels = [], []
    for s in sets:
        images.append(Image.open(s.images[0]))
        labels.append(f"{s.name} (a training image)")
        for m in METHODS:
            if (s.name, m) in samples:
                images.append(samples[(s.name, m)])
                labels.append(m)
    path.parent.mkdir(parents=True, exist_ok=True)
    labelled_grid(images, labels, cols=1 + len(METHODS)).save(path)


def _plot_curve(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, points in curve.items():
        ax.plot([p["seconds"] / 60 for p in points], [p["subject_fidelity"] for p in points], marker="o", label=key)
        ax.axhline(points[0]["base_subject_fidelity"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xlabel("training minutes (1 CPU thread, beside another run)")
    ax.set_ylabel("subject fidelity (judge cosine)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
