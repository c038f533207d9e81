"""Sampler-loop overhead: dreamlab's DDIM loop vs. diffusers' StableDiffusionPipeline loop.

Both sides run the SAME randomly initialised ``UNet2DConditionModel`` in one process: N steps of DDIM
(eta = 0, "trailing" spacing, scaled-linear betas) with classifier-free guidance (scale 7.5, cond and
uncond batched in one forward), from the same initial noise, with the same text embeddings.

    ours    dreamlab.core.samplers.sample_ddim with
            classifier_free(Denoiser(UNetModelFn(unet), schedule, Prediction.EPS), uncond, 7.5)
            plus the set-up dreamlab.generate.generate does around it (sigma grid, initial scaling);
            no prompt encoding, no decoding.
    theirs  StableDiffusionPipeline(unet, DDIMScheduler, vae/text encoder/tokenizer = None) called with
            prompt_embeds / negative_prompt_embeds, latents=, output_type="latent"; no prompt encoding,
            no decoding.

Time inside the network is measured with a forward pre-hook / forward hook pair on the UNet (present
on both sides, so it costs both the same); "outside" = wall time - time inside ``unet.forward``, i.e.
everything the loop does around the network (schedulers, guidance arithmetic, tensor plumbing,
Python). Rounds interleave the two sides (alternating which goes first) and medians are reported.

    python benchmarks/sampler_overhead.py [--steps 20] [--rounds 7] [--size small|medium] [--json out.json]
        [--threads 2] [--latent 16] [--null-net] [--profile]

--null-net swaps the network for a trivial function, leaving only the loops' own work (its wall-time ratio is
the ratio of the two loops' overheads); --profile prints a cProfile of one run of each side.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
# On a shared machine an OpenMP worker that spin-waits on a core another process is using stalls every
# parallel region (the tiny UNet's forward went from 20 ms to 0.2-1.3 s with 2 threads); passive waiting
# keeps the timings usable. Must be set before torch is imported; override it from the environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

GUIDANCE = 7.5
# diffusers' timestep_spacing. Not "leading": the pipeline forces steps_offset=1, which shifts leading timesteps
# by one, while dreamlab's grid uses steps_offset=0.
SPACING = "trailing"
BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)


# ----------------------------------------------------------------------------------------------- models


def make_unet(size: str):
    """(unet, cross_attention_dim, text length). Random init, fixed seed."""
    from diffusers import UNet2DConditionModel

    if size == "small":
        from dreamlab.models.tiny import make_tiny_model

        with tempfile.TemporaryDirectory() as tmp:
            root = make_tiny_model(tmp, seed=0)
            unet = UNet2DConditionModel.from_pretrained(root / "unet")
        return unet.eval().requires_grad_(False), int(unet.config.cross_attention_dim), 8
    if size == "medium":
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(64, 128, 256),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            norm_num_groups=32,
            attention_head_dim=8,
            cross_attention_dim=384,
        )
        return unet.eval().requires_grad_(False), 384, 32
    raise ValueError(f"unknown size {size!r}")


class ForwardTimer:
    """Accumulates wall time spent inside ``module.forward`` (pre-hook to hook)."""

    def __init__(self, module: torch.nn.Module):
        self.inside = 0.0
        self.calls = 0
        self._t0 = 0.0
        self._handles = [module.register_forward_pre_hook(self._pre), module.register_forward_hook(self._post)]

    def _pre(self, module, args):
        self._t0 = time.perf_counter()

    def _post(self, module, args, output):
        self.inside += time.perf_counter() - self._t0
        self.calls += 1

    def reset(self) -> None:
        self.inside, self.calls = 0.0, 0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


# ------------------------------------------------------------------------------------------------ sides


def make_ours(unet, schedule, cond, uncond, z, steps: int):
    from dreamlab.core.guidance import classifier_free
    from dreamlab.core.prediction import Denoiser, Prediction
    from dreamlab.core.samplers import prior_std, sample_ddim
    from dreamlab.models.unet import UNetModelFn

    dtype = next(unet.parameters()).dtype

    def run() -> torch.Tensor:
        # What generate() does between encoding the prompts and decoding (ModelBundle.denoiser()).
        sigmas = schedule.sigmas_for(steps, SPACING)
        denoise = Denoiser(UNetModelFn(unet, use_mask=False), schedule, Prediction.EPS, model_dtype=dtype)
        denoise = classifier_free(denoise, uncond, GUIDANCE)
        x = z * prior_std(float(sigmas[0]))
        return sample_ddim(denoise, x, sigmas, cond=cond, eta=0.0)

    return run


def make_theirs(unet, cond_tokens, uncond_tokens, z, steps: int):
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()
    scheduler = DDIMScheduler(
        **BETAS,
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=1,  # what the pipeline would force; unused by "trailing"
        prediction_type="epsilon",
        timestep_spacing=SPACING,
    )
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    side = z.shape[-1] * pipe.vae_scale_factor

    def run() -> torch.Tensor:
        return pipe(
            prompt_embeds=cond_tokens,
            negative_prompt_embeds=uncond_tokens,
            latents=z,
            height=side,
            width=side,
            num_inference_steps=steps,
            guidance_scale=GUIDANCE,
            eta=0.0,
            output_type="latent",
            return_dict=False,
        )[0]

    return run, pipe


# ------------------------------------------------------------------------------------------------- main


def timed(run, timer: ForwardTimer) -> tuple[float, float, int, torch.Tensor]:
    gc.collect()
    timer.reset()
    t0 = time.perf_counter()
    out = run()
    total = time.perf_counter() - t0
    return total, timer.inside, timer.calls, out


def profile(name: str, run, top: int) -> str:
    pr = cProfile.Profile()
    pr.enable()
    run()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(top)
    return f"--- cProfile, {name}, one run, top {top} by tottime ---\n" + s.getvalue()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--size", choices=("small", "medium"), default="small")
    p.add_argument("--latent", type=int, default=16, help="latent height and width (default 16)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--json", metavar="PATH", help="also write the results here")
    p.add_argument("--profile", action="store_true", help="print a cProfile of one run of each side")
    p.add_argument(
        "--null-net",
        action="store_true",
        help="replace unet.forward by a trivial function (output = 0.01 * input) so that the wall time is all loop "
        "overhead: the per-step cost of each loop without the network's noise",
    )
    args = p.parse_args(argv)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    from dreamlab.core.schedules import DiscreteSchedule
    from dreamlab.core.types import Cond

    unet, dim, seq = make_unet(args.size)
    if args.null_net:
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        def null_forward(sample, timestep, encoder_hidden_states=None, *rest, return_dict=True, **kwargs):
            out = sample * 0.01
            return UNet2DConditionOutput(sample=out) if return_dict else (out,)

        unet.forward = null_forward  # nn.Module.__call__ (and so the timing hooks) still wraps it
    n_params = sum(p.numel() for p in unet.parameters())
    schedule = DiscreteSchedule.from_betas(
        BETAS["beta_schedule"], BETAS["num_train_timesteps"], BETAS["beta_start"], BETAS["beta_end"]
    )
    z = torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(1))
    cond_tokens = torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(2))
    uncond_tokens = torch.randn(1, seq, dim, generator=torch.Generator().manual_seed(3))

    ours = make_ours(unet, schedule, Cond(tokens=cond_tokens), Cond(tokens=uncond_tokens), z, args.steps)
    theirs, pipe = make_theirs(unet, cond_tokens, uncond_tokens, z, args.steps)
    sides = {"ours": ours, "theirs": theirs}

    # Same noise levels on both sides.
    pipe.scheduler.set_timesteps(args.steps)
    ours_ts = schedule.timesteps(args.steps, SPACING).long()
    assert torch.equal(ours_ts, pipe.scheduler.timesteps.long()), "the two loops visit different timesteps"

    timer = ForwardTimer(unet)
    results: dict[str, dict[str, list[float]]] = {k: {"total": [], "inside": []} for k in sides}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for run in sides.values():
                run()
        _, _, calls_ours, out_ours = timed(ours, timer)
        _, _, calls_theirs, out_theirs = timed(theirs, timer)
        max_diff = float((out_ours - out_theirs).abs().max())
        scale = float(out_theirs.abs().max())
        assert calls_ours == calls_theirs == args.steps, (calls_ours, calls_theirs)

        for r in range(args.rounds):
            order = ("ours", "theirs") if r % 2 == 0 else ("theirs", "ours")
            for name in order:
                total, inside, _, _ = timed(sides[name], timer)
                results[name]["total"].append(total)
                results[name]["inside"].append(inside)

        prof = [profile(name, run, 25) for name, run in sides.items()] if args.profile else []
    timer.remove()

    summary = {}
    for name, r in results.items():
        outside = [t - i for t, i in zip(r["total"], r["inside"])]
        summary[name] = {
            "median_total_s": statistics.median(r["total"]),
            "median_inside_s": statistics.median(r["inside"]),
            "median_outside_s": statistics.median(outside),
            "outside_share": statistics.median(o / t for o, t in zip(outside, r["total"])),
            "outside_per_step_ms": statistics.median(outside) / args.steps * 1e3,
            "totals_s": r["total"],
            "insides_s": r["inside"],
        }
    ratio = summary["ours"]["median_total_s"] / summary["theirs"]["median_total_s"]
    ratio_rounds = statistics.median(o / t for o, t in zip(results["ours"]["total"], results["theirs"]["total"]))
    report = {
        "size": args.size,
        "null_net": args.null_net,
        "unet_params": n_params,
        "latent_shape": list(z.shape),
        "text_shape": list(cond_tokens.shape),
        "steps": args.steps,
        "rounds": args.rounds,
        "guidance_scale": GUIDANCE,
        "spacing": SPACING,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "python": platform.python_version(),
        "max_abs_diff": max_diff,
        "max_abs_latent": scale,
        "ratio_ours_theirs": ratio,
        "ratio_median_per_round": ratio_rounds,
        "ours": summary["ours"],
        "theirs": summary["theirs"],
    }

    print(
        f"size={args.size}{' (NULL NET)' if args.null_net else ''} ({n_params / 1e6:.3f}M params)  latents={tuple(z.shape)}  text={tuple(cond_tokens.shape)}  "
        f"steps={args.steps}  cfg={GUIDANCE}  rounds={args.rounds}  threads={torch.get_num_threads()}  "
        f"torch {torch.__version__}"
    )
    print(f"sanity: max |ours - theirs| of the final latents = {max_diff:.3e} (max |latent| = {scale:.3g})")
    print()
    print(f"{'loop':<8} {'median wall':>12} {'in unet':>10} {'outside':>10} {'outside %':>10} {'outside/step':>13}")
    for name in ("ours", "theirs"):
        s = summary[name]
        print(
            f"{name:<8} {s['median_total_s'] * 1e3:>9.1f} ms {s['median_inside_s'] * 1e3:>7.1f} ms "
            f"{s['median_outside_s'] * 1e3:>7.2f} ms {s['outside_share'] * 100:>9.2f}% {s['outside_per_step_ms']:>10.3f} ms"
        )
    print(f"ratio ours/theirs (median wall): {ratio:.3f}   (median of per-round ratios: {ratio_rounds:.3f})")
    share = summary["ours"]["outside_share"]
    print(
        f"goals: ratio <= 1.0 {'met' if ratio <= 1.0 else 'NOT met'}; "
        f"< 5% of wall time outside the network {'met' if share < 0.05 else 'NOT met'} ({share * 100:.2f}%)"
    )
    if max_diff > 1e-4 * max(1.0, scale):
        print(f"WARNING: final latents differ by {max_diff:.3e} (> 1e-4)", file=sys.stderr)
    for block in prof:
        print()
        print(block)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


if __name__ == "__main__":
    main()
