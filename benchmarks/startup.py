"""Start-up of `dreamlab generate` from the shell: whole-command time, where it goes, and the floor.

Every figure comes from fresh subprocesses (the cost is a cold process's), N runs each, medians:

    command   wall and CPU seconds of `python -m dreamlab.cli generate PROMPT -o TMP --steps S --seed 1 -q`
              (CPU = user + sys of the child, from getrusage)
    phases    the same command with timers around its parts: torch's import, dreamlab's CLI, request and
              engine (up to the model load), the model's libraries (diffusers' UNet2DConditionModel/AutoencoderKL
              and transformers, imported on their own first so that the load is timed without them), the
              model load, sampling and decoding (generate), writing the PNG
    floor     `python -c pass`, `import torch`, and the libraries alone (torch, diffusers' two models,
              transformers' Auto classes and BertModel): what no change to dreamlab can go below
    imports   one run under `python -X importtime`: self time summed by top-level package, and the
              cumulative time of the modules the issue names (torch._dynamo, scipy.stats, sympy, ...)

    python benchmarks/startup.py [--runs 5] [--steps 30] [--prompt "red apple"] [--model DIR] [--threads N]
        [--json out.json]

Times are inflated on a shared machine: compare shares and ratios, and say what else was running.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict

PHASES = r"""
import json, sys, time
t = {"start": time.perf_counter()}
c = {"start": time.process_time()}
def mark(name):
    t[name], c[name] = time.perf_counter(), time.process_time()
import torch
mark("torch")
import dreamlab.generate as gen, dreamlab.loading.model as loading, dreamlab.metadata as meta
real_load, real_generate, real_save = loading.load_model, gen.generate, meta.save_png
def load_model(*a, **kw):
    mark("cli")
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer, BertModel
    mark("libraries")
    out = real_load(*a, **kw)
    mark("load")
    return out
def generate(*a, **kw):
    out = real_generate(*a, **kw)
    mark("generate")
    return out
def save_png(*a, **kw):
    out = real_save(*a, **kw)
    mark("save")
    return out
loading.load_model, gen.generate, meta.save_png = load_model, generate, save_png
from dreamlab.cli import main
assert main(sys.argv[1:]) == 0
print(json.dumps({"wall": t, "cpu": c}))
"""

FLOOR_LIBRARIES = ("import torch; from diffusers import AutoencoderKL, UNet2DConditionModel; "
                   "from transformers import AutoModel, AutoTokenizer, BertModel")
NAMED = ("torch", "torch._dynamo", "sympy", "torch.distributed.tensor", "diffusers", "diffusers.hooks", "peft",
         "accelerate", "transformers.modeling_utils", "transformers.models", "scipy.stats", "scipy.optimize")


def child_run(argv: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """(wall s, CPU s, stdout) of one subprocess."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if out.returncode:
        sys.exit(f"{' '.join(argv)} failed:\n{out.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, out.stdout + out.stderr


def median_of(fn, runs: int) -> dict:
    walls, cpus = [], []
    for _ in range(runs):
        w, c, _ = fn()
        walls.append(w)
        cpus.append(c)
    return {"wall": statistics.median(walls), "cpu": statistics.median(cpus), "walls": walls, "cpus": cpus}


def parse_importtime(text: str) -> tuple[dict[str, float], dict[str, float], float]:
    """(self seconds by top-level package, cumulative seconds of NAMED modules, total)."""
    by_package: dict[str, float] = defaultdict(float)
    named: dict[str, float] = {}
    total = 0.0
    for line in text.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line.split(":", 1)[1].split("|")
        depth = len(name) - len(name.lstrip())
        name = name.strip()
        by_package[name.split(".")[0]] += int(self_us) / 1e6
        if depth == 1:  # importtime indents a top-level import by one space
            total += int(cum_us) / 1e6
        if name in NAMED and name not in named:
            named[name] = int(cum_us) / 1e6
    return dict(by_package), named, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompt", default="red apple")
    ap.add_argument("--model", help="model folder (default: the installed default model)")
    ap.add_argument("--threads", type=int, help="passed to generate (default: torch's, one per core)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    py = sys.executable
    out_png = os.path.join(tempfile.mkdtemp(), "startup.png")
    gen_args = ["generate", args.prompt, "-o", out_png, "--steps", str(args.steps), "--seed", "1", "-q"]
    if args.model:
        gen_args += ["--model", args.model]
    if args.threads:
        gen_args += ["--threads", str(args.threads)]

    result: dict = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(), "runs": args.runs, "argv": gen_args}
    child_run([py, "-m", "dreamlab.cli", *gen_args])  # warm-up: page cache, bytecode where it is written

    result["floor"] = {
        "python -c pass": median_of(lambda: child_run([py, "-c", "pass"]), args.runs),
        "import torch": median_of(lambda: child_run([py, "-c", "import torch"]), args.runs),
        "libraries": median_of(lambda: child_run([py, "-c", FLOOR_LIBRARIES]), args.runs),
    }
    result["command"] = median_of(lambda: child_run([py, "-m", "dreamlab.cli", *gen_args]), args.runs)

    phase_runs = []
    for _ in range(args.runs):
        phase_runs.append(json.loads(child_run([py, "-c", PHASES, *gen_args])[2].strip().splitlines()[-1]))
    names = ["torch", "cli", "libraries", "load", "generate", "save"]
    phases = {}
    for kind in ("wall", "cpu"):
        for prev, name in zip(["start", *names], names):
            phases.setdefault(name, {})[kind] = statistics.median(r[kind][name] - r[kind][prev] for r in phase_runs)
    result["phases"] = phases

    _, _, text = child_run([py, "-X", "importtime", "-m", "dreamlab.cli", *gen_args])
    by_package, named, total = parse_importtime(text)
    result["importtime"] = {"total": total, "by_package": dict(sorted(by_package.items(), key=lambda kv: -kv[1])[:15]),
                            "named_cumulative": named}

    print(f"dreamlab {' '.join(gen_args[:2])!r} {' '.join(gen_args[4:])}: {args.runs} runs each, medians "
          f"(load average {result['loadavg'][0]:.1f} on {result['cpus']} CPUs)")
    print(f"{'':44s} {'wall s':>8s} {'CPU s':>8s}")
    c = result["command"]
    print(f"{'whole command':44s} {c['wall']:8.2f} {c['cpu']:8.2f}")
    for name, label in (("torch", "import torch"), ("cli", "dreamlab: CLI, request, engine"),
                        ("libraries", "import diffusers, transformers"),
                        ("load", "load the model"), ("generate", "encode the prompt, sample, decode"),
                        ("save", "write the PNG")):
        print(f"  {label:42s} {phases[name]['wall']:8.2f} {phases[name]['cpu']:8.2f}")
    for name, m in result["floor"].items():
        print(f"{'floor: ' + name:44s} {m['wall']:8.2f} {m['cpu']:8.2f}")
    print(f"\n-X importtime, one run: {total:.2f} s in imports; self time by package:")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in list(result["importtime"]["by_package"].items())[:10]))
    print("cumulative, where first imported:")
    print("  " + ", ".join(f"{k} {v:.2f}" for k, v in named.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
