"""What every trainer shares: processes, resumable checkpoints, EMA, logs, loss plots.

Multi-process training uses torch.distributed with DDP, launched by torchrun (gloo on CPU, nccl on
GPU): ``torchrun --nproc_per_node 2 -m dreamlab.cli train unet ...``. A single process needs no launcher.

A checkpoint is a folder ``checkpoints/step-NNNNNNN`` holding the model and its EMA in diffusers format
(safetensors), the optimizer state and ``state.json``; it is written to a temporary folder and renamed,
so a run killed at any moment resumes from the last complete checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ..errors import DreamlabError


# --------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t) / self.world


def init_distributed(device: str = "auto") -> Dist:
    """Join the process group torchrun set up (RANK / WORLD_SIZE in the environment), if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- schedule


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to min_ratio * base_lr at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class EMA:
    """Exponential moving average of parameters (Polyak averaging), with warm-up of the decay as in
    diffusers' EMAModel: decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: torch.nn.Module, decay: float = 0.999):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items() if v.is_floating_point()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach().float(), 1 - d)

    def copy_to(self, model: torch.nn.Module) -> None:
        state = model.state_dict()
        model.load_state_dict({**state, **{k: v.to(state[k].dtype) for k, v in self.shadow.items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay, self.updates, self.shadow = state["decay"], state["updates"], state["shadow"]


# ------------------------------------------------------------------------------------------ checkpoints


def _atomic_dir(final: Path) -> Path:
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: torch.nn.Module,
    ema: EMA,
    optimizer: torch.optim.Optimizer,
    extra: dict[str, Any],
    keep: int = 2,
    states: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoints/step-N atomically; keep the newest ``keep`` ones. ``states``: more state dicts
    to resume (a distillation's target network), read back by :func:`load_states`."""
    ckpt_root = out_dir / "checkpoints"
    final = ckpt_root / f"step-{step:07d}"
    tmp = _atomic_dir(final)
    try:
        model.save_pretrained(tmp / "model")
        torch.save({"optimizer": optimizer.state_dict(), "ema": ema.state_dict(), **({"states": states} if states else {})},
                   tmp / "training_state.pt")
        (tmp / "state.json").write_text(json.dumps({"step": step, **extra}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DreamlabError(f"cannot write checkpoint {final}: {e.strerror or e} (the previous checkpoint is intact)") from None
    for old in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    done = sorted(p for p in (out_dir / "checkpoints").glob("step-*") if (p / "state.json").exists())
    return done[-1] if done else None


def load_training_state(ckpt: Path, optimizer: torch.optim.Optimizer, ema: EMA) -> dict[str, Any]:
    # Our own file, but still loaded without unpickling arbitrary objects.
    blob = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    ema.load_state_dict(blob["ema"])
    return json.loads((ckpt / "state.json").read_text())


def load_states(ckpt: Path) -> dict[str, Any]:
    """The ``states`` a checkpoint was saved with (empty if none)."""
    return torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=True).get("states", {})


def resume(
    out_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, d: Dist, init: str | None = None,
    new_modules: tuple[str, ...] = (),
) -> int:
    """Load the last complete checkpoint into model, optimizer and EMA; the step to continue from.

    Without a checkpoint, ``init`` (a diffusers folder of weights, e.g. the EMA weights committed as a
    fallback when the full checkpoints are lost) seeds the model and its EMA; the optimizer starts fresh.
    Parameters whose names start with one of ``new_modules`` may be missing from ``init`` (a path added to
    a trained model): they keep the values the model was built with. Anything else that does not match
    is an error naming it.
    """
    ckpt = latest_checkpoint(out_dir)
    if ckpt is None:
        if init:
            state, own = type(model).from_pretrained(init).state_dict(), model.state_dict()
            missing = [k for k in own if k not in state and not k.startswith(new_modules)]
            unexpected = [k for k in state if k not in own]
            if missing or unexpected:
                raise DreamlabError(
                    f"--init {init}: its weights do not fit this network (missing {missing[:3]}, unexpected "
                    f"{unexpected[:3]}): check --block-out-channels, --layers-per-block and the other shape options"
                )
            try:
                model.load_state_dict(state, strict=False)
            except RuntimeError as e:  # same names, other shapes
                raise DreamlabError(f"--init {init}: its weights do not fit this network: {str(e).splitlines()[-1].strip()}") from None
            ema.__init__(model, ema.decay)
            if d.main:
                print(f"initialised from {init}")
        return 0
    model.load_state_dict(type(model).from_pretrained(ckpt / "model").state_dict())
    step = load_training_state(ckpt, optimizer, ema)["step"]
    if d.main:
        print(f"resumed from {ckpt} at step {step}")
    return step


def update(loss: torch.Tensor, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ema: EMA, lr: float) -> None:
    """One optimiser step with gradient clipping at norm 1, then the EMA update."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    ema.update(model)


# ------------------------------------------------------------------------------------------------- logs


class Log:
    """Appends metrics to ``log.jsonl`` and redraws ``loss.png`` from the whole file."""

    def __init__(self, out_dir: Path, enabled: bool = True):
        self.path = out_dir / "log.jsonl"
        self.plot_path = out_dir / "loss.png"
        self.enabled = enabled
        self.start = time.time()

    def write(self, step: int, **metrics: float) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), **metrics}) + "\n")

    def rewind(self, step: int) -> None:
        """Drop records after ``step``: a killed run resumes from its last checkpoint, and the steps it
        logged past that checkpoint are trained again, so they must not appear twice in the curves."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        tmp = self.path.with_name(f".tmp-{self.path.name}")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)

    def records(self) -> Iterator[dict[str, Any]]:
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    yield json.loads(line)

    def plot(self, keys: tuple[str, ...] = ("loss",)) -> None:
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        recs = list(self.records())
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if not pts:
                continue
            steps, vals = zip(*pts)
            ax.plot(steps, vals, alpha=0.3, label=f"{key}")
            if len(vals) >= 20:
                k = max(5, len(vals) // 50)
                smooth = [sum(vals[max(0, i - k):i + 1]) / len(vals[max(0, i - k):i + 1]) for i in range(len(vals))]
                ax.plot(steps, smooth, label=f"{key} (smoothed)")
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(self.plot_path, dpi=100)
        plt.close(fig)


def save_config(out_dir: Path, config: Any) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    data = asdict(config) if hasattr(config, "__dataclass_fields__") else dict(config)
    (out_dir / "config.json").write_text(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------------------ compute clock


class ComputeClock:
    """Seconds of training compute as the trainers record them (``train_hours``): wall time between
    ticks, with what ``skip`` marks (exports, sample grids) left out."""

    def __init__(self, spent: float = 0.0):
        self.spent = spent
        self._mark = time.time()

    def tick(self) -> float:
        now = time.time()
        self.spent += now - self._mark
        self._mark = now
        return self.spent

    def skip(self) -> None:
        self._mark = time.time()


# ------------------------------------------------------------------------------------------ exports

# what a model folder derived from a base (a student, an instruction model) copies from it
BASE_COMPONENTS = ("vae", "scheduler", "text_encoder", "tokenizer", "model_index.json")


def write_model_folder(unet: torch.nn.Module, ema: EMA | None, base: Path, dest: Path, spec: dict[str, Any],
                       dtype: torch.dtype | None = None) -> Path:
    """A model folder at ``dest``: the base folder's components, ``unet`` (with the EMA weights when
    given, in ``dtype``) and ``spec`` as its dreamlab.json; written beside ``dest`` and renamed."""
    import copy
    import json

    shadow = copy.deepcopy(unet)
    if ema is not None:
        ema.copy_to(shadow)
    tmp = _atomic_dir(dest)
    for part in BASE_COMPONENTS:
        src = base / part
        if src.is_dir():
            shutil.copytree(src, tmp / part, ignore=shutil.ignore_patterns(".*"))
        elif src.is_file():
            shutil.copy2(src, tmp / part)
    (shadow.to(dtype) if dtype is not None else shadow).save_pretrained(tmp / "unet")
    (tmp / "dreamlab.json").write_text(json.dumps(spec, indent=2))
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(dest)
    return dest
