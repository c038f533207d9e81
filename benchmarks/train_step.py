"""Training-step speed of the default UNet: float32 vs. bfloat16 autocast (``--mixed-precision bf16``).

One process builds the default denoiser (``UNetConfig`` defaults, 11.5M parameters, random weights) and
times full training steps (forward, v-prediction loss, backward, AdamW step) at the default batch of 32
4x16x16 latents with 24 384-d text tokens, the two precisions interleaved round by round (alternating
which goes first); medians are reported with their ratio. It also reports how far the bf16 forward's
output is from the float32 one on the same input (relative RMS), which says what the autocast costs in
accuracy.

    python benchmarks/train_step.py [--rounds 7] [--steps 3] [--threads 2] [--batch 32] [--device cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from dreamlab.train.unet import UNetConfig, build_unet


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round and precision")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    torch.manual_seed(0)
    unet = build_unet(UNetConfig(data="", vae="", out="")).to(dev).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    B = args.batch
    x = torch.randn(B, 4, 16, 16, device=dev)
    t = torch.randint(1000, (B,), device=dev)
    tokens = torch.randn(B, 24, 384, device=dev)
    mask = torch.ones(B, 24, dtype=torch.long, device=dev)
    target = torch.randn_like(x)

    def forward(bf16: bool) -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample.float()

    def step(bf16: bool) -> None:
        loss = (forward(bf16) - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def timed(bf16: bool) -> float:
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(bf16)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    with torch.no_grad():
        ref, low = forward(False), forward(True)
        rel_rms = float((low - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt())
    step(False), step(True)  # warm-up
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for bf16 in order:
            times["bf16" if bf16 else "fp32"].append(timed(bf16))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "device": str(dev),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "batch": B,
        "rounds": args.rounds,
        "seconds_per_step": med,
        "images_per_s": {k: B / v for k, v in med.items()},
        "speedup_bf16": med["fp32"] / med["bf16"],
        "bf16_output_relative_rms_error": rel_rms,
        "torch": torch.__version__,
    }
    print(f"fp32 {med['fp32']:.3f} s/step ({B / med['fp32']:.1f} images/s), bf16 autocast {med['bf16']:.3f} s/step "
          f"({B / med['bf16']:.1f} images/s): {result['speedup_bf16']:.2f}x; bf16 output relative RMS error {rel_rms:.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
