"""CPU inference speed of the default model: what pays (docs/benchmarks.md, "Inference speed").

    python benchmarks/speed.py --json docs/speed-results.json

In one process, for each variant, the warm wall time of ``generate`` (median of --runs after a warm-up)
for one 64x64 image at 30 steps with CFG (2 UNet rows a step), at 4 steps without CFG (1 row a step: what
a distilled student costs), and for a batch of 8 at 4 steps; with each variant's ratio to the baseline
measured in the same process, and the largest pixel difference from the baseline's image (a variant that
changes the image is a quality question too). Variants:

- ``baseline``: float32, contiguous tensors, torch's threads (``--threads``)
- ``channels_last``: the UNet and VAE in channels-last memory format
- ``bf16``: ``torch.autocast("cpu", torch.bfloat16)`` around sampling (the CPU has AVX512-BF16 or not)
- ``compile``: ``torch.compile`` of the UNet (inductor; compile time reported apart)
- ``threads=1``: one intra-op thread
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import nullcontext

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch
from timing import cpu_name, warm_times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default="baseline,channels_last,bf16,compile,threads=1")
    p.add_argument("--json")
    args = p.parse_args()

    from dreamlab.generate import generate, make_request
    from dreamlab.loading.model import load_model

    torch.set_num_threads(args.threads)
    cases = {"30 steps, CFG 5 (batch 1)": dict(steps=30, cfg_scale=5.0, batch=1),
             "4 steps, no CFG (batch 1)": dict(steps=4, cfg_scale=1.0, batch=1),
             "4 steps, no CFG (batch 8)": dict(steps=4, cfg_scale=1.0, batch=8)}
    results: dict = {"threads": args.threads, "cpu": cpu_name(), "torch": torch.__version__, "variants": {}}
    reference: dict = {}
    for variant in args.variants.split(","):
        model = load_model()
        ctx, note, t_compile = nullcontext, "", None
        torch.set_num_threads(1 if variant == "threads=1" else args.threads)
        if variant == "channels_last":
            model.unet.to(memory_format=torch.channels_last)
            model.space.vae.to(memory_format=torch.channels_last)
        elif variant == "bf16":
            ctx = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
        elif variant == "compile":
            unet = model.unet
            compiled = torch.compile(unet)
            model.unet = compiled
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    generate(model, make_request(prompt="red apple", seed=0, steps=2))
            except Exception as e:  # no compiler, or inductor refuses: say so and skip
                results["variants"][variant] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
                print(variant, results["variants"][variant], flush=True)
                continue
            t_compile = time.perf_counter() - t0
        row: dict = {}
        for name, kw in cases.items():
            req = make_request(prompt="red apple", seed=1, **kw)
            with ctx():
                median, times, out = warm_times(lambda: generate(model, req), args.runs)
            pixels = out.pixels
            if variant == "baseline":
                reference[name] = (median, pixels)
            base_t, base_px = reference.get(name, (None, None))
            row[name] = {"seconds_median": median, "seconds": times, "per_image": median / kw["batch"],
                         "ratio_to_baseline": median / base_t if base_t else None,
                         "max_pixel_diff": float((pixels - base_px).abs().max()) if base_px is not None else None}
        if t_compile is not None:
            row["compile_seconds"] = t_compile
        results["variants"][variant] = row
        print(variant, json.dumps({k: (v["per_image"], v["ratio_to_baseline"]) if isinstance(v, dict) else v
                                   for k, v in row.items()}), note, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
