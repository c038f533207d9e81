"""What the evaluation benchmarks share: the shipped model and judge, an output folder, skipped parts."""

from __future__ import annotations

import argparse
from pathlib import Path


def setup(args: argparse.Namespace):
    """(model, judge, label -> class index, output folder, parts to skip, results seeded with the steps)."""
    from dreamlab.eval.judge import load_judge
    from dreamlab.loading.model import load_model

    model = load_model()
    judge, _, labels = load_judge(Path(__file__).resolve().parents[1] / "src/dreamlab/weights/judge")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return model, judge, {label: i for i, label in enumerate(labels)}, out, set(args.skip.split(",")), {"steps": args.steps}
