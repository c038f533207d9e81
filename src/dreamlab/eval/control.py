"""How well a ControlNet controls (docs/control.md): on held-out emoji, its own condition maps are
given as controls, and the output is compared with them and scored as the main evaluation scores.

- canny: edge F1 between the control edges and the output's Canny edges, with a tolerance of one pixel
  (precision: output edges within one pixel of a control edge; recall: control edges within one pixel of
  an output edge);
- shape: IoU of the control silhouette and the output's alpha;
- both: FID on the judge's features against the held-out real images, and the judge's top-5 for the
  prompted emoji, with and without the ControlNet and over the control scale.

``dreamlab control-eval --controlnet DIR`` scores one ControlNet; ``--run RUN`` scores every snapshot of
a training run (fidelity against steps: does the paper's "sudden convergence" show?).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def edge_f1(control: np.ndarray, output: np.ndarray, tol: int = 1) -> float:
    """F1 of two boolean edge maps, each edge pixel matched within ``tol`` pixels."""
    if not control.any() and not output.any():
        return 1.0
    precision = (output & dilate(control, tol)).sum() / max(1, output.sum())
    recall = (control & dilate(output, tol)).sum() / max(1, control.sum())
    return float(2 * precision * recall / max(1e-12, precision + recall))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def fidelity(condition: str, control: np.ndarray, image: Image.Image) -> float:
    from ..control.conditions import get_condition

    h, w = control.shape[:2]
    if image.size != (w, h):  # a model of another size: its image at the map's size
        image = image.convert("RGBA").resize((w, h), Image.LANCZOS)
    out = get_condition(condition).preprocess(np.asarray(image.convert("RGBA")))[..., 0] > 0.5
    ctrl = control[..., 0] > 0.5
    return edge_f1(ctrl, out) if condition == "canny" else iou(ctrl, out)


def evaluate_controlnet(model, folder: Path | None, condition: str, data: str, *, n: int = 48, scales=(1.0,),
                        steps: int = 20, cfg_scale: float = 5.0, prompt: bool = True, judge_dir=None) -> dict:
    """Scores of ``folder`` (None: the model without ControlNet, against the same maps) per scale."""
    import torch

    from ..control.conditions import get_condition
    from ..data.captions import canonical_caption
    from ..data.dataset import EmojiDataset, to_rgba_uint8
    from ..eval.evaluate import _images, default_judge_dir, held_out_prompts
    from ..eval.judge import judge_outputs, load_judge
    from ..eval.metrics import fid
    from ..generate import encode_image, generate, make_request
    from ..images import from_pil

    test = EmojiDataset(Path(data).expanduser(), split="test")
    records = held_out_prompts(test, n)
    judge, bases, _ = load_judge(judge_dir or default_judge_dir())
    pos = {b: i for i, b in enumerate(bases)}
    real = _images(test, records)
    real_feats, _ = judge_outputs(judge, real)
    cond = get_condition(condition)
    maps = [cond.preprocess(to_rgba_uint8(x)) for x in real]
    if folder is not None:
        model.use_controlnet(folder)
    out = {}
    for scale in scales if folder is not None else (0.0,):
        images, fids = [], []
        for k, (r, m) in enumerate(zip(records, maps)):
            hint = Image.fromarray((m[..., 0] * 255).astype(np.uint8), "L")
            controls = [{"condition": condition, "image": encode_image(hint), "scale": scale}] if folder is not None else []
            req = make_request(prompt=canonical_caption(r) if prompt else "", seed=k, steps=steps, cfg_scale=cfg_scale,
                               controls=controls)
            images.append(generate(model, req).images[0])
            fids.append(fidelity(condition, m, images[-1]))
        feats, logits = judge_outputs(judge, from_pil(images))
        labels = torch.tensor([pos[r["base"]] for r in records])
        top5 = float((logits.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean())
        out[f"{scale:g}"] = {"fidelity": float(np.mean(fids)), "fid": fid(feats, real_feats), "top5": top5, "n": len(records)}
    return out


def evaluate_run(model, run: Path, condition: str, data: str, **kw) -> list[dict]:
    """Fidelity of every snapshot of a run (scale 1), cached per settings in ``run/fidelity-*.jsonl``, and a plot."""
    tag = f"n{kw.get('n', 48)}-steps{kw.get('steps', 20)}-{'caption' if kw.get('prompt', True) else 'empty'}"
    cache = run / f"fidelity-{tag}.jsonl"
    done = {json.loads(line)["step"]: json.loads(line) for line in cache.read_text().splitlines()} if cache.exists() else {}
    points = [done.get(0) or {"step": 0, **evaluate_controlnet(model, None, condition, data, **kw)["0"]}]
    if 0 not in done:
        with open(cache, "a") as f:
            f.write(json.dumps(points[0]) + "\n")
    for snap in sorted((run / "snapshots").glob("step-*")):
        step = int(snap.name.split("-")[1])
        if step not in done:
            done[step] = {"step": step, **evaluate_controlnet(model, snap, condition, data, **kw)["1"]}
            with open(cache, "a") as f:
                f.write(json.dumps(done[step]) + "\n")
        points.append(done[step])
    _plot(points, run / f"fidelity-{tag}.png", condition)
    return points


def _plot(points: list[dict], dest: Path, condition: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [p["step"] for p in points]
    ax.plot(steps, [p["fidelity"] for p in points], marker="o")
    ax.set_xlabel("training step (batch 32)")
    ax.set_ylabel("edge F1" if condition == "canny" else "silhouette IoU")
    ax.set_title(f"ControlNet ({condition}): control fidelity on held-out maps")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("control-eval", help="control fidelity, FID and alignment of a ControlNet (or of a run's snapshots)")
    p.add_argument("--condition", default="canny")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--controlnet", help="a ControlNet folder")
    what.add_argument("--run", help="a `dreamlab train controlnet` run: every snapshot")
    p.add_argument("--data", default="~/.cache/dreamlab/data/emoji")
    p.add_argument("--n", type=int, default=48, help="held-out images")
    p.add_argument("--scales", default="1", help="comma-separated control scales (with --controlnet)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-prompt", action="store_true", help="empty prompts: the map alone")
    p.add_argument("--json", help="write the scores here")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..loading.model import load_model

    model = load_model()
    kw = {"n": args.n, "steps": args.steps, "prompt": not args.no_prompt}
    if args.run:
        result = evaluate_run(model, Path(args.run).expanduser(), args.condition, args.data, **kw)
    else:
        base = evaluate_controlnet(model, None, args.condition, args.data, **kw)
        scored = evaluate_controlnet(model, Path(args.controlnet).expanduser(), args.condition, args.data,
                                     scales=tuple(float(s) for s in args.scales.split(",")), **kw)
        result = {"without": base["0"], "with": scored}
    print(json.dumps(result, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
