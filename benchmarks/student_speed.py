"""Warm seconds per image of a few-step student at each step count, batch 1 and 8, against its teacher at
its default 30 steps with CFG, measured in the same process (docs/benchmarks.md, "Students").

    python benchmarks/student_speed.py --model fast --json docs/student-speed.json

Each figure is the median of --runs warm ``generate`` calls (after one warm-up call per setting) for one
64x64 image, or for a batch of 8 divided by 8; the ratio column divides by the teacher's 30-step figure at
the same batch. The student's steps run one UNet row each (guidance folded in); the teacher's run two.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from timing import cpu_name, warm_times  # noqa: E402  (benchmarks/timing.py, beside this script)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fast")
    p.add_argument("--steps", default="1,2,4,8")
    p.add_argument("--teacher-steps", type=int, default=30)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    args = p.parse_args()

    import torch

    from dreamlab.generate import generate
    from dreamlab.loading.model import load_model
    from dreamlab.request import make_request

    torch.set_num_threads(args.threads)
    student, teacher = load_model(args.model), load_model()

    def per_image(model, steps: int, batch: int) -> float:
        req = make_request(prompt="red apple, twitter style", seed=1, steps=steps, batch=batch)
        return warm_times(lambda: generate(model, req), args.runs)[0] / batch

    rows = []
    for batch in (1, 8):
        base = per_image(teacher, args.teacher_steps, batch)
        rows.append({"who": "teacher", "sampler": teacher.defaults.sampler, "steps": args.teacher_steps, "batch": batch,
                     "unet_rows": 2 * args.teacher_steps, "seconds_per_image": base, "ratio": 1.0})
        print(json.dumps(rows[-1]), flush=True)
        for n in (int(s) for s in args.steps.split(",")):
            s = per_image(student, n, batch)
            rows.append({"who": "student", "sampler": student.defaults.sampler, "steps": n, "batch": batch, "unet_rows": n,
                         "seconds_per_image": s, "ratio": s / base})
            print(json.dumps(rows[-1]), flush=True)
    out = {"student": str(student.source), "threads": args.threads, "runs": args.runs, "cpu": cpu_name(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print("| | steps | UNet rows | batch 1: s/image | ratio | batch 8: s/image | ratio |\n|---|---|---|---|---|---|---|")
    for r1 in (r for r in rows if r["batch"] == 1):
        r8 = next(r for r in rows if r["batch"] == 8 and r["who"] == r1["who"] and r["steps"] == r1["steps"])
        print(f"| {r1['who']} ({r1['sampler']}) | {r1['steps']} | {r1['unet_rows']} | {r1['seconds_per_image']:.3f} | "
              f"{r1['ratio']:.3f} | {r8['seconds_per_image']:.3f} | {r8['ratio']:.3f} |")


if __name__ == "__main__":
    main()
