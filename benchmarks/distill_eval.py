"""Quality against network evaluations (docs/distillation.md): few-step students against their teacher.

    python benchmarks/distill_eval.py --only teacher                       # the teacher's rows (no student needed)
    python benchmarks/distill_eval.py --student lcm=runs/distill-lcm/model --student pd4=runs/distill-pd/stages/4step:4

Every point is `dreamlab eval`'s score (FID, KID and judge top-1/top-5 on the 100 held-out prompts x 2, CFG
4, seed 0), measured with one judge and one set of real features for all of them. The teacher (the default
model, its CFG costing two UNet rows a step) runs DPM++ 2M and DDIM at ``--teacher-steps``; each student at
``--steps`` with its own sampler and schedule (one row a step: guidance is folded in). A student given as
``name=DIR:N`` is scored at N steps only (a progressive stage knows its own grid). Results are cached in
``--json`` by (model hash, sampler, steps, settings), so the script resumes and adds only what is new; the
plot (FID and top-5 against UNet rows per image) is redrawn from the whole file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
from pathlib import Path


def _rows(kind: str, steps: int) -> int:
    return steps * (2 if kind == "teacher" else 1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=None, help="the teacher model folder (default: the shipped default model)")
    p.add_argument("--teacher-steps", default="1,2,4,8,30")
    p.add_argument("--teacher-samplers", default="dpmpp_2m,ddim")
    p.add_argument("--teacher-schedules", default="karras,trailing",
                   help="the teacher's step grids: its default (karras) and the few-step one (trailing)")
    p.add_argument("--student", action="append", default=[], help="NAME=DIR or NAME=DIR:STEPS (repeatable)")
    p.add_argument("--steps", default="1,2,4,8", help="student step counts")
    p.add_argument("--only", choices=("teacher", "students"), help="score only these")
    p.add_argument("--data", default="~/.cache/dreamlab/data/emoji")
    p.add_argument("--prompts", type=int, default=100)
    p.add_argument("--json", default="docs/distill-results.json")
    p.add_argument("--plot", default="docs/images/distill-quality.png")
    args = p.parse_args()

    from dreamlab.eval.evaluate import _Evaluator
    from dreamlab.loading.files import sha256_file
    from dreamlab.loading.model import load_model
    from dreamlab.settings import EvalConfig

    @functools.cache
    def described(folder):
        """(the model's defaults, its UNet's sha256): one load per folder for both."""
        model = load_model(folder)
        unet = Path(model.source) / "unet" / "diffusion_pytorch_model.safetensors"
        return model.defaults, sha256_file(unet) if unet.exists() else str(model.source)

    out = Path(args.json)
    results = json.loads(out.read_text()) if out.exists() else []
    done = {r["key"] for r in results}
    todo = []  # (kind, name, folder, sampler, schedule, steps)
    if args.only != "students":
        for schedule in args.teacher_schedules.split(","):
            for sampler in args.teacher_samplers.split(","):
                for n in (int(s) for s in args.teacher_steps.split(",")):
                    todo.append(("teacher", f"teacher {sampler} {schedule}", args.teacher, sampler, schedule, n))
    if args.only != "teacher":
        for spec in args.student:
            name, _, rest = spec.partition("=")
            folder, _, fixed = rest.partition(":")
            d = described(folder)[0]
            for n in ([int(fixed)] if fixed else [int(s) for s in args.steps.split(",")]):
                todo.append(("student", name, folder, d.sampler, d.schedule, n))

    base = EvalConfig(data=args.data, prompts=args.prompts)
    ev = None
    for kind, name, folder, sampler, schedule, n in todo:
        unet_sha = described(folder)[1]
        grid = "" if kind == "teacher" and schedule == "karras" else f"{schedule}/"  # (karras: the first teacher rows)
        key = f"{unet_sha[:16]}/{grid}{sampler}/{n}/{args.prompts}x{base.per_prompt}/cfg{base.cfg_scale}/seed{base.seed}"
        if key in done:
            continue
        ev = ev or _Evaluator(base)
        ev.cfg = dataclasses.replace(base, sampler=sampler, schedule=schedule, steps=n)
        r = ev.score(folder)
        row = {"key": key, "kind": kind, "name": name, "model": str(folder or "default"), "sampler": sampler, "schedule": schedule, "steps": n,
               "unet_rows": _rows(kind, n), **r["model"], "seconds_per_image": r["seconds_per_image"],
               "ceiling": r["real_held_out"]}
        results.append(row)
        done.add(key)
        out.write_text(json.dumps(results, indent=1))  # progress survives an interrupted run
        print(json.dumps({k: v for k, v in row.items() if k != "ceiling"}), flush=True)
    plot(results, Path(args.plot))


FID_TOP = 200  # the FID axis stops here (few-step karras DPM++ goes far above)


def plot(results: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dest.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    series: dict[str, list[dict]] = {}
    for r in results:
        series.setdefault(r["name"], []).append(r)
    for name, rows in sorted(series.items()):
        rows.sort(key=lambda r: r["unet_rows"])
        style = "s--" if name.startswith("teacher") else "o-"
        for ax, metric in zip(axes, ("fid", "top5")):
            ys = [min(r[metric], FID_TOP) if metric == "fid" else r[metric] for r in rows]
            ax.plot([r["unet_rows"] for r in rows], ys, style, label=name)
            for r in rows:  # off the FID scale: drawn at its top, with the value
                if metric == "fid" and r[metric] > FID_TOP:
                    ax.annotate(f"{r[metric]:.0f}", (r["unet_rows"], FID_TOP), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ref = next((r for r in results if r["name"] == "teacher dpmpp_2m karras" and r["steps"] == 30), None)
    for ax, metric, label in zip(axes, ("fid", "top5"), ("FID (lower is better)", "judge top-5 (higher is better)")):
        if ref:
            goal = ref[metric] * (1.15 if metric == "fid" else 0.85)
            ax.axhline(goal, color="gray", ls=":", label="within 15% of the teacher at 30 steps")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("UNet rows per image (teacher CFG: 2 a step)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("Few-step students against their teacher (100 held-out prompts x 2, CFG 4)")
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
