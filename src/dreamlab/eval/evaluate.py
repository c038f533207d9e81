"""`dreamlab eval`: FID, KID and prompt alignment of a model, and the same for held-out real images
(the ceiling), all measured by the judge.

Prompts are the canonical captions ("red apple, twitter style") of the held-out (test split) images;
alignment counts a generated image as correct when the judge's top-1 / top-5 classes contain the
prompt's emoji. FID/KID compare generated images with the held-out real ones; the ceiling compares an
equal number of training images with them.

``prompts_from="train"`` asks for renderings the model was trained on instead (training concepts in their
trained style): set beside the default score, it separates how well the model has learnt its training
set from how well it carries a concept over to the style it never saw it in (the generalisation gap).

``prompts_skip=N`` leaves out the first N prompts of that fixed order: sampling settings (the guidance
scale, the step count) are tuned on prompts 100-183 (``--prompts-skip 100 --prompts 84``), which the
score (the first 100) never sees.

``prompt_format`` asks each rendering with another prompt built from its fields (PROMPT_FIELDS): the
score uses ``{caption}``; "{label}" (the concept alone), "{label}, {other_style}" (the style the model
was trained on it in) and "{label} AND {style}" (a composed prompt) take apart where alignment is lost.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from ..data.captions import CANONICAL_STYLE, canonical_caption, canonical_label
from ..data.dataset import EmojiDataset
from ..errors import DreamlabError, ModelNotFoundError
from ..images import resize
from ..loading.files import sha256_file
from .judge import judge_outputs, load_judge
from .metrics import fid, kid, topk_accuracy
from ..settings import EvalConfig, default_judge_dir  # noqa: F401  (the configuration, kept torch-free)




PROMPT_SPLITS = ("test", "train")
PROMPT_FIELDS = ("caption", "label", "style", "other_style")


def prompt_for(record: dict, fmt: str = "{caption}") -> str:
    """A rendering's prompt: ``fmt`` filled with its canonical caption ("waving hand, medium skin tone,
    twitter style"), label with any skin tone ("waving hand, medium skin tone"), style ("twitter style")
    and the other style ("google style"). Raises DreamlabError naming an unknown field."""
    other = next(s for s in CANONICAL_STYLE if s != record["style"])
    fields = {"caption": canonical_caption(record), "label": canonical_label(record),
              "style": CANONICAL_STYLE[record["style"]], "other_style": CANONICAL_STYLE[other]}
    try:
        return fmt.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise DreamlabError(f"--prompt-format {fmt!r}: {e!s} is not a field; use {{{'}, {'.join(PROMPT_FIELDS)}}}") from None


def _images(ds: EmojiDataset, records: list[dict]) -> torch.Tensor:
    idx = np.array([r["index"] for r in records])
    return torch.from_numpy(np.asarray(ds.images[idx])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)


def held_out_prompts(test: EmojiDataset, n: int) -> list[dict]:
    """One record per (base emoji, style) of the test split, base images first, in a fixed order."""
    seen, chosen = set(), []
    for r in sorted(test.records, key=lambda r: (r["skin_tone"] is not None, r["base"], r["style"])):
        key = (r["base"], r["style"])
        if key not in seen:
            seen.add(key)
            chosen.append(r)
    return chosen[:n]


def training_prompts(train: EmojiDataset, n: int) -> list[dict]:
    """``n`` training renderings without skin tone, spread over the whole set by a hash of their code and
    style (the training split is ordered by category, so its first records would all be smileys)."""
    from hashlib import sha256

    recs = [r for r in train.records if r["skin_tone"] is None]
    recs.sort(key=lambda r: sha256(f"{r['base']}/{r['style']}".encode()).digest())
    return recs[:n]


class _Evaluator:
    """The judge, the held-out real features and the ceiling, computed once for any number of models."""

    def __init__(self, cfg: EvalConfig):
        if cfg.prompts_from not in PROMPT_SPLITS:  # before anything is loaded
            raise DreamlabError(f"--prompts-from {cfg.prompts_from!r}: must be one of {', '.join(PROMPT_SPLITS)}")
        prompt_for({"label": "red apple", "style": "google"}, cfg.prompt_format)  # a bad format fails before anything is loaded
        if cfg.prompts_skip < 0 or cfg.prompts < 1:
            raise DreamlabError(f"--prompts {cfg.prompts} --prompts-skip {cfg.prompts_skip}: need at least one prompt and no negative skip")
        self.cfg = cfg
        self.judge, bases, _ = load_judge(cfg.judge)
        self.pos = {b: i for i, b in enumerate(bases)}
        data = Path(cfg.data).expanduser()
        self.test = EmojiDataset(data, split="test")
        self.train = train = EmojiDataset(data, split="train")
        # the same prompts for every model scored (every snapshot of a run): chosen and checked once
        pick, split = (training_prompts, train) if cfg.prompts_from == "train" else (held_out_prompts, self.test)
        self.prompts = pick(split, cfg.prompts_skip + cfg.prompts)[cfg.prompts_skip:]
        if not self.prompts:
            raise DreamlabError(f"--prompts-skip {cfg.prompts_skip} leaves no prompts: the {cfg.prompts_from} split "
                                f"gives {len(pick(split, 10**9))}")
        if len(self.prompts) * cfg.per_prompt < 2:
            raise DreamlabError(f"FID and KID need at least 2 generated images; {len(self.prompts)} prompt(s) x --per-prompt "
                                f"{cfg.per_prompt} gives {len(self.prompts) * cfg.per_prompt}")
        real_test = _images(self.test, self.test.records)
        self.side = int(real_test.shape[-1])
        self.upscaler = None
        self.n_real = len(real_test)
        self.f_test, l_test = judge_outputs(self.judge, real_test)
        y_test = torch.tensor([self.pos[r["base"]] for r in self.test.records])
        g = torch.Generator().manual_seed(cfg.seed)
        sub = torch.randperm(len(train.records), generator=g)[: len(self.test.records)].tolist()
        f_train, _ = judge_outputs(self.judge, _images(train, [train.records[i] for i in sub]))
        self.ceiling = {
            "fid": fid(f_train, self.f_test),
            "kid": kid(f_train, self.f_test)[0],
            **{f"top{k}": v for k, v in topk_accuracy(l_test, y_test).items()},
        }

    def score(self, model_dir: str | Path | None) -> dict:
        from tqdm import tqdm

        from ..generate import generate, make_request
        from ..loading.model import attach_upscaler, load_model

        cfg = self.cfg
        model = load_model(model_dir)
        if cfg.upscaler:
            self.upscaler = self.upscaler or load_model(cfg.upscaler)  # once for all the snapshots of a run
            attach_upscaler(model, self.upscaler, f"--upscaler {cfg.upscaler}")
        generated, labels = [], []
        t0 = time.time()
        for i, r in enumerate(tqdm(self.prompts, desc="generating", leave=False)):
            req = make_request(prompt=prompt_for(r, cfg.prompt_format), seed=cfg.seed + i * cfg.per_prompt, batch=cfg.per_prompt,
                               steps=cfg.steps, sampler=cfg.sampler, schedule=cfg.schedule, cfg_scale=cfg.cfg_scale)
            # the judge sees 64x64: smaller outputs (a cascade's base alone) are enlarged bicubically
            generated.append(resize(generate(model, req).pixels, self.side))
            labels += [self.pos[r["base"]]] * cfg.per_prompt
        seconds = time.time() - t0
        gen = torch.cat(generated)
        f_gen, l_gen = judge_outputs(self.judge, gen)
        return {
            "model": {"fid": fid(f_gen, self.f_test), "kid": kid(f_gen, self.f_test)[0],
                      **{f"top{k}": v for k, v in topk_accuracy(l_gen, torch.tensor(labels)).items()}},
            "real_held_out": self.ceiling,
            "n_generated": len(gen),
            "n_real_held_out": self.n_real,
            "seconds_per_image": seconds / max(1, len(gen)),
            "training": _training_info(model_dir, cfg.upscaler),
            "settings": dict(cfg.__dict__),
        }


def _training_info(model_dir: str | Path | None, upscaler: str | Path | None = None) -> dict:
    """The training a model records (steps, train_hours); for a cascade, both stages' and their total hours."""
    from ..loading.model import default_model_dir, read_spec

    root = Path(model_dir).expanduser() if model_dir else default_model_dir()
    spec = read_spec(root)
    stages = None
    if spec.cascade is not None:
        stages = _training_info(root / spec.cascade.base), _training_info(root / spec.cascade.sr)
    elif upscaler:
        stages = spec.training, _training_info(upscaler)
    if stages is None:
        return spec.training
    return {"train_hours": sum(s.get("train_hours", 0.0) for s in stages), "base": stages[0], "super_resolution": stages[1]}


def evaluate(cfg: EvalConfig) -> dict:
    """FID, KID and top-1/top-5 alignment of ``cfg.model`` (the default model when None), with the ceiling."""
    return _Evaluator(cfg).score(cfg.model)


def evaluate_run(cfg: EvalConfig, run: str | Path) -> list[dict]:
    """Evaluate every snapshot of a `dreamlab train unet` run: alignment against training hours.

    Writes ``curve.json`` and ``curve.png`` in the run folder."""
    run = Path(run).expanduser()
    snaps = sorted(p for p in (run / "snapshots").glob("step-*") if (p / "dreamlab.json").exists())
    if not snaps:
        raise ModelNotFoundError(f"no snapshots in {run / 'snapshots'}; `dreamlab train unet` writes them every --snapshot-every steps")
    # Scores already in curve.json are kept when they were measured the same way (same settings, same
    # judge), so the curve can be redrawn as training goes on at the cost of the new snapshots only.
    key = {**_settings(cfg), "judge_sha256": sha256_file(Path(cfg.judge).expanduser() / "judge.safetensors")}
    curve = curve_file(cfg, run)
    try:
        old = json.loads(curve.read_text()) if curve.exists() else []
    except json.JSONDecodeError:
        old = []
    known = {p["snapshot"]: p for p in old if isinstance(p, dict) and p.get("measured_with") == key}
    ev = None
    points = []
    for snap in snaps:
        if snap.name in known:
            points.append(known[snap.name])
            continue
        ev = ev or _Evaluator(cfg)
        result = ev.score(snap)
        points.append({"snapshot": snap.name, **result["training"], **result["model"],
                       "ceiling_top5": ev.ceiling["top5"], "ceiling_top1": ev.ceiling["top1"], "measured_with": key})
        print(json.dumps({k: v for k, v in points[-1].items() if k != "measured_with"}))
        curve.write_text(json.dumps(points, indent=2))  # progress survives an interrupted run
    curve.write_text(json.dumps(points, indent=2))
    plot_curve(points, curve.with_suffix(".png"))
    return points


def curve_file(cfg: EvalConfig, run: str | Path) -> Path:
    """Where ``evaluate_run`` keeps a run's curve (``.json``; the plot beside it as ``.png``): the base
    alone and as a cascade (``--upscaler``) side by side."""
    name = "curve" + ("-cascade" if cfg.upscaler else "") + ("-train-prompts" if cfg.prompts_from == "train" else "")
    name += f"-skip{cfg.prompts_skip}" if cfg.prompts_skip else ""
    if cfg.prompt_format != "{caption}":
        name += "-prompts-" + hashlib.sha256(cfg.prompt_format.encode()).hexdigest()[:8]
    return Path(run).expanduser() / f"{name}.json"


def _settings(cfg: EvalConfig) -> dict:
    settings = {k: getattr(cfg, k) for k in ("prompts", "per_prompt", "steps", "sampler", "cfg_scale", "seed")}
    if cfg.schedule is not None:  # (curves measured before this option existed stay valid)
        settings["schedule"] = cfg.schedule
    if cfg.prompts_from != "test":  # (likewise)
        settings["prompts_from"] = cfg.prompts_from
    if cfg.prompts_skip:  # (likewise)
        settings["prompts_skip"] = cfg.prompts_skip
    if cfg.prompt_format != "{caption}":  # (likewise)
        settings["prompt_format"] = cfg.prompt_format
    if cfg.upscaler:  # (curves measured before this option existed stay valid)
        settings["upscaler_sha256"] = sha256_file(Path(cfg.upscaler).expanduser() / "unet" / "diffusion_pytorch_model.safetensors")
    return settings


def plot_curve(points: list[dict], dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = [p.get("train_hours", float("nan")) for p in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(hours, [p["top5"] for p in points], "o-", label="model top-5")
    ax.plot(hours, [p["top1"] for p in points], "o-", label="model top-1")
    ax.axhline(points[0]["ceiling_top5"], color="gray", ls="--", label="held-out real top-5 (ceiling)")
    ax.axhline(points[0]["ceiling_top5"] / 2, color="gray", ls=":", label="half the ceiling (target)")
    ax.set_xlabel("training hours")
    ax.set_ylabel("prompt alignment (judge accuracy)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(dest, dpi=100)
    plt.close(fig)


def format_table(result: dict) -> str:
    rows = [("", "FID", "KID", "top-1", "top-5")]
    model = "model (training prompts)" if result.get("settings", {}).get("prompts_from") == "train" else "model"
    for name, key in ((model, "model"), ("held-out real (ceiling)", "real_held_out")):
        m = result[key]
        rows.append((name, f"{m['fid']:.2f}", f"{m['kid']:.4f}", f"{m['top1']:.3f}", f"{m['top5']:.3f}"))
    width = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, width)) for r in rows)


def save_result(result: dict, path: Path) -> None:
    path.write_text(json.dumps(result, indent=2))
