"""Instruction-editing pairs made here (InstructPix2Pix, Brooks et al. 2023, section 3.1), for
``dreamlab train instruct``: ``dreamlab data instruct --out DIR --n N``.

The paper wrote (caption, instruction, edited caption) triples with GPT-3 and rendered each with Stable
Diffusion and prompt-to-prompt, keeping the pairs CLIP judged good. Here the triples come from templates
over caption edits the default model can render (the emoji catalog's own labels: colours, swaps within a
subcategory, facial expressions, skin tones, the google / twitter styles, an added or removed attribute),
the pairs from prompt-to-prompt on the default model with randomised settings, and the filter is the
judge (the source recognised, the target recognised, the source's structure kept). Everything is recorded
(``pairs.jsonl``: every candidate with its seed, settings and scores, kept or not; ``recipe.json``: the
model, the judge, the thresholds and the arguments), so the same command rebuilds the same set, and a run
that stops resumes where it was.

Only emoji whose (base, style) is in the training split are used, as source and as target: the held-out
test split stays unseen, for the measurements (docs/control.md).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .captions import CANONICAL_STYLE, tone_phrase
from .catalog import sha256_file

DEFAULT_OUT_DIR = Path("~/.cache/dreamlab/data/instruct")
RECIPE_VERSION = 1

COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "brown", "black", "white", "pink")
TONES = ("light", "medium-light", "medium", "medium-dark", "dark")
# subcategories whose members are swapped for one another ("turn the cat into a dog")
SWAP_GROUPS = ("animal-mammal", "animal-bird", "animal-marine", "animal-bug", "animal-reptile", "food-fruit",
               "food-vegetable", "food-prepared", "food-sweet", "plant-flower", "transport-ground", "transport-air",
               "sport", "drink", "sky & weather", "clothing", "household", "tool", "game")
FACE_GROUPS = ("face-smiling", "face-affection", "face-tongue", "face-hand", "face-neutral-skeptical", "face-sleepy",
               "face-unwell", "face-concerned", "face-negative", "face-glasses", "face-hat", "face-costume")
KINDS = ("colour", "swap", "expression", "tone", "style", "add", "remove")

TEMPLATES: dict[str, tuple[str, ...]] = {
    "colour": ("make it {colour}", "turn it {colour}", "change the colour to {colour}", "make the {noun} {colour}",
               "paint it {colour}", "colour it {colour}"),
    "swap": ("turn the {a} into a {b}", "replace the {a} with a {b}", "make it a {b}", "swap the {a} for a {b}",
             "change it to a {b}", "make the {a} a {b}"),
    "expression": ("make it a {b}", "change the expression to a {b}", "turn the face into a {b}",
                   "give it the look of a {b}", "make the face a {b}"),
    "tone": ("give it {tone} skin", "make the skin {tone}", "change the skin tone to {tone}",
             "use a {tone} skin tone", "make it {tone} skin tone"),
    "style": ("make it {style} style", "draw it in the {style} style", "redraw it as {style} art",
              "change the style to {style}", "render it {style} style"),
    "add": ("add {thing}", "give it {thing}", "put {thing} on it", "make it have {thing}"),
    "remove": ("remove the {thing}", "take away the {thing}", "get rid of the {thing}", "without the {thing}"),
}
STYLE_WORDS = {"google": ("google", "noto"), "twitter": ("twitter", "twemoji")}


@dataclass(frozen=True)
class Edit:
    """One caption edit: the source and target prompts (canonical captions) and the instruction."""

    kind: str
    source: str  # source prompt
    target: str  # target prompt
    instruction: str
    source_label: str  # the judge's label of the source emoji (its base's)
    target_label: str


def _caption(label: str, style: str, tone: str | None = None) -> str:
    return ", ".join(p for p in (label, f"{tone} skin tone" if tone else None, CANONICAL_STYLE[style]) if p)


def _short(label: str, words: int = 3) -> bool:
    return len(label.split()) <= words and ":" not in label


def _noun(label: str) -> str:
    return label.split()[-1]


def _articles(text: str) -> str:
    """"a" before a vowel becomes "an" ("make it a orange" does not happen, "a apple" does)."""
    words = text.split(" ")
    return " ".join("an" if w == "a" and i + 1 < len(words) and words[i + 1][:1] in "aeiou" else w
                    for i, w in enumerate(words))


def edit_catalog(records: list[dict[str, Any]], split: str = "train") -> dict[str, list[tuple]]:
    """The caption edits the catalog allows, per kind, as (source label, target label, style, extra);
    ``extra`` is the template's fill. ``split="train"`` (the training pairs): source and target are emoji
    whose (base, style) is in the training split; ``split="test"`` (the measurements): the source is a
    held-out one and the target any emoji."""
    train = [r for r in records if r["split"] == split]
    base = {(r["label"], r["style"]): r for r in train if r["unified"] == r["base"]}
    pool = records if split == "test" else train
    labels_by_style: dict[str, set[str]] = {}
    for r in pool:
        if r["unified"] == r["base"]:
            labels_by_style.setdefault(r["style"], set()).add(r["label"])
    out: dict[str, list[tuple]] = {k: [] for k in KINDS}
    groups: dict[tuple[str, str], list[str]] = {}
    for (label, style), r in sorted(base.items()):
        have = labels_by_style[style]
        words = label.split()
        for i, w in enumerate(words):
            if w in COLOURS:
                for c in COLOURS:
                    other = " ".join(words[:i] + [c] + words[i + 1:])
                    if c != w and other in have:
                        out["colour"].append((label, other, style, {"colour": c, "noun": _noun(label)}))
        for other in sorted(have):
            if other.startswith(label + " with ") and _short(other, 6):
                out["add"].append((label, other, style, {"thing": other[len(label) + len(" with "):]}))
            if label.startswith(other + " with ") and _short(label, 6):
                out["remove"].append((label, other, style, {"thing": label[len(other) + len(" with "):]}))
        to = "twitter" if style == "google" else "google"
        if label in labels_by_style.get(to, ()):
            out["style"].append((label, label, style, {"style": STYLE_WORDS[to], "to": to}))
    for r in sorted(pool, key=lambda r: (r["label"], r["style"])):
        if r["unified"] == r["base"] and r["subcategory"] in SWAP_GROUPS + FACE_GROUPS and _short(r["label"]):
            key = (r["subcategory"] if r["subcategory"] in SWAP_GROUPS else "face", r["style"])
            members = groups.setdefault(key, [])
            if r["label"] not in members:
                members.append(r["label"])
    for (group, style), members in sorted(groups.items()):
        kind = "expression" if group == "face" else "swap"
        for a in members:
            if (a, style) not in base:
                continue
            for b in members:
                if a != b:
                    out[kind].append((a, b, style, {"a": a, "b": b}))
    toned: dict[tuple[str, str], set[str]] = {}
    for r in pool:
        t = r.get("skin_tone")
        if t and t != "mixed" and r["base"] != r["unified"]:
            toned.setdefault((r["label"], r["style"]), set()).add(t)
    for (label, style), tones in sorted(toned.items()):
        if not _short(label, 4) or (label, style) not in base:
            continue
        for t in sorted(tones):
            out["tone"].append((label, label, style, {"tone": t, "from": None}))
            for f in sorted(tones):
                if f != t:
                    out["tone"].append((label, label, style, {"tone": t, "from": f}))
    return out


def make_edit(kind: str, entry: tuple, rng: random.Random) -> Edit:
    """The prompts and a randomly worded instruction of one catalog entry."""
    a, b, style, fill = entry
    template = rng.choice(TEMPLATES[kind])
    if kind == "style":
        source, target = _caption(a, style), _caption(b, fill["to"])
        instruction = template.format(style=rng.choice(fill["style"]))
    elif kind == "tone":
        source, target = _caption(a, style, fill["from"]), _caption(b, style, fill["tone"])
        instruction = template.format(tone=fill["tone"])
    else:
        source, target = _caption(a, style), _caption(b, style)
        instruction = _articles(template.format(**fill))
    return Edit(kind, source, target, instruction, a, b)


def draw_edits(records: list[dict[str, Any]], n: int, seed: int) -> Iterator[tuple[int, Edit]]:
    """``n`` (index, edit) candidates: the kinds in turn (so every kind is as common as the others), a
    random entry of each, a random wording. Deterministic in (records, seed)."""
    catalog = {k: v for k, v in edit_catalog(records).items() if v}
    kinds = sorted(catalog, key=KINDS.index)
    for i in range(n):
        rng = random.Random(f"{seed}:{i}")
        kind = kinds[i % len(kinds)]
        yield i, make_edit(kind, rng.choice(catalog[kind]), rng)


@dataclass
class InstructDataConfig:
    """What `dreamlab data instruct` records in its recipe."""

    out: str = str(DEFAULT_OUT_DIR)
    data: str = "~/.cache/dreamlab/data/emoji"
    n: int = 3000  # candidates (edits drawn); the kept pairs are fewer
    seed: int = 0
    steps: int = 20
    cfg_scale: float = 5.0
    cross_replace: tuple[float, float] = (0.5, 0.9)  # drawn uniformly per candidate
    self_replace: tuple[float, float] = (0.2, 0.6)
    min_cos: float = 0.4  # judge-feature cosine of the edit with its source (structure kept; a colour or an
    #                       object swap moves the features a lot, so this is loose and the IoU does the rest)
    min_iou: float = 0.5  # IoU of the alpha masks
    min_change: float = 0.02  # mean absolute pixel change: the edit did something
    topk: int = 5  # the source and the target must be in the judge's top k
    shard: tuple[int, int] = (0, 1)  # (k, N): this process makes the candidates i with i % N == k
    model: str | None = None  # default: the shipped default model
    judge: str | None = None  # default: the shipped judge
    extra: dict[str, Any] = field(default_factory=dict)


def build_instruct_data(cfg: InstructDataConfig, *, log=print) -> Path:
    """Make (or continue making) the pairs of ``cfg`` in ``cfg.out``; returns that folder."""
    import numpy as np
    import torch

    from ..errors import DreamlabError
    from ..eval.judge import judge_outputs, load_judge
    from ..generate import generate
    from ..loading.model import default_model_dir, load_model
    from ..request import make_request

    out = Path(cfg.out).expanduser()
    (out / "images").mkdir(parents=True, exist_ok=True)
    meta = Path(cfg.data).expanduser() / "metadata.jsonl"
    if not meta.exists():
        raise DreamlabError(f"no emoji data at {cfg.data}: run `dreamlab data emoji` first")
    records = [json.loads(line) for line in meta.read_text().splitlines() if line.strip()]
    model_dir = Path(cfg.model).expanduser() if cfg.model else default_model_dir()
    judge_dir = Path(cfg.judge).expanduser() if cfg.judge else Path(__file__).resolve().parents[1] / "weights" / "judge"
    model = load_model(model_dir)
    judge, _, labels = load_judge(judge_dir)
    index = {label: i for i, label in enumerate(labels)}
    recipe = {"version": RECIPE_VERSION, "config": asdict(cfg),
              "model": {"name": model.name, "unet": model.files.get("unet/diffusion_pytorch_model.safetensors")},
              "judge": sha256_file(judge_dir / "judge.safetensors"), "method": "prompt-to-prompt (dreamlab edit), judge-filtered",
              "torch": torch.__version__}
    recipe = json.loads(json.dumps(recipe))  # as it reads back (tuples become lists)
    rfile = out / "recipe.json"
    if rfile.exists():
        old = json.loads(rfile.read_text())
        keep = ("version", "model", "judge")
        free = ("n", "out", "shard")  # what may differ between the runs that fill one folder
        if any(old.get(k) != recipe[k] for k in keep) or {k: v for k, v in old["config"].items() if k not in free} != \
                {k: v for k, v in recipe["config"].items() if k not in free}:
            raise DreamlabError(f"{out} holds pairs made with another recipe ({rfile}): choose another --out")
    rfile.write_text(json.dumps(recipe, indent=1))
    k, shards = cfg.shard
    if not 0 <= k < shards:
        raise DreamlabError(f"--shard {k}/{shards}: K must be in 0..N-1")
    pfile = out / ("pairs.jsonl" if shards == 1 else f"pairs-{k}of{shards}.jsonl")
    rows = read_pairs(out, kept=False) if any(out.glob("pairs*.jsonl")) else []
    done, kept = {r["id"] for r in rows}, sum(r["kept"] for r in rows)
    t0, made = time.time(), 0
    with open(pfile, "a") as f:
        for i, e in draw_edits(records, cfg.n, cfg.seed):
            if i in done or i % shards != k:
                continue
            rng = random.Random(f"settings:{cfg.seed}:{i}")
            seed = rng.randrange(2**31)
            cross, self_ = rng.uniform(*cfg.cross_replace), rng.uniform(*cfg.self_replace)
            req = make_request(prompt=e.source, seed=seed, steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                               edit={"target": e.target, "cross_replace": round(cross, 3), "self_replace": round(self_, 3)})
            res = generate(model, req)
            src, dst = res.sources[0], res.images[0]
            a, b = (np.asarray(im.convert("RGBA"), dtype=np.float32) / 127.5 - 1 for im in (src, dst))
            feats, logits = judge_outputs(judge, torch.from_numpy(np.stack([a, b])).permute(0, 3, 1, 2))
            feats = torch.nn.functional.normalize(feats, dim=1)
            top = logits.topk(cfg.topk, dim=1).indices.tolist()
            ia, ib = a[..., 3] > 0, b[..., 3] > 0
            union = (ia | ib).sum()
            scores = {"source_ok": index.get(e.source_label) in top[0], "target_ok": index.get(e.target_label) in top[1],
                      "cos": round(float(feats[0] @ feats[1]), 4),
                      "iou": round(float((ia & ib).sum() / union) if union else 1.0, 4),
                      "change": round(float(np.abs(a - b).mean()) / 2, 4)}
            ok = bool(scores["source_ok"] and scores["target_ok"] and scores["cos"] >= cfg.min_cos
                      and scores["iou"] >= cfg.min_iou and scores["change"] >= cfg.min_change)
            row = {"id": i, **asdict(e), "seed": seed, "cross_replace": round(cross, 3), "self_replace": round(self_, 3),
                   "scores": scores, "kept": ok}
            if ok:
                row["source_file"], row["edited_file"] = f"images/{i:06d}-source.png", f"images/{i:06d}-edited.png"
                src.save(out / row["source_file"])
                dst.save(out / row["edited_file"])
                kept += 1
            f.write(json.dumps(row) + "\n")
            f.flush()
            made += 1
            if made % 25 == 0:
                rate = (time.time() - t0) / made
                log(f"{len(done) + made}/{cfg.n} candidates, {kept} kept ({rate:.2f} s each)")
    log(f"{out}: {kept} pairs kept of {cfg.n} candidates")
    return out


def read_pairs(folder: str | Path, *, kept: bool = True) -> list[dict[str, Any]]:
    """The rows of a pairs folder (only the kept ones by default), by id: ``pairs.jsonl`` and the files of
    shards (``pairs-KofN.jsonl``) together; a line cut off by a stopped run is skipped."""
    found: dict[int, dict[str, Any]] = {}
    for file in sorted(Path(folder).expanduser().glob("pairs*.jsonl")):
        for line in file.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            found.setdefault(row["id"], row)
    return [found[i] for i in sorted(found) if found[i]["kept"] or not kept]


def summary(folder: str | Path) -> dict[str, Any]:
    """Counts per kind: candidates, kept, and why the others failed."""
    rows = read_pairs(folder, kept=False)
    recipe = Path(folder).expanduser() / "recipe.json"
    cfg = InstructDataConfig(**{k: v for k, v in json.loads(recipe.read_text())["config"].items()
                                if k in ("min_cos", "min_iou", "min_change")}) if recipe.exists() else InstructDataConfig()
    out: dict[str, Any] = {}
    for r in rows:
        k = out.setdefault(r["kind"], {"candidates": 0, "kept": 0, "source_missed": 0, "target_missed": 0,
                                       "structure_lost": 0, "unchanged": 0})
        k["candidates"] += 1
        k["kept"] += r["kept"]
        s = r["scores"]
        k["source_missed"] += not s["source_ok"]
        k["target_missed"] += not s["target_ok"]
        k["structure_lost"] += s["cos"] < cfg.min_cos or s["iou"] < cfg.min_iou
        k["unchanged"] += s["change"] < cfg.min_change
    return out


def add_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("instruct", help="make instruction-editing pairs with prompt-to-prompt (InstructPix2Pix data)",
                              description="Draw caption edits from the emoji catalog, render each with prompt-to-prompt "
                              "on the default model and keep the pairs the judge accepts; resumable, recorded in "
                              "pairs.jsonl and recipe.json.")
    d = InstructDataConfig()
    p.add_argument("--out", default=d.out, help="output folder (default: %(default)s)")
    p.add_argument("--data", default=d.data, help="the emoji data (for the catalog; default: %(default)s)")
    p.add_argument("--n", type=int, default=d.n, help="candidates to render (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--model", help="the model that renders the pairs (default: the shipped default model)")
    p.add_argument("--judge", help="the judge folder (default: the shipped judge)")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="make only the candidates i with i %% N == K (run N processes on one --out; default: all)")
    p.add_argument("--threads", type=int)
    p.add_argument("--summary", action="store_true", help="print the counts of an existing folder and stop")
    p.set_defaults(func=_run_cli)
    return p


def _run_cli(args: argparse.Namespace) -> int:
    from ..errors import DreamlabError

    if args.n < 1 or args.steps < 2:
        raise DreamlabError("--n must be at least 1 and --steps at least 2")
    if args.summary:
        print(json.dumps(summary(args.out), indent=1))
        return 0
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        k, n = (int(v) for v in args.shard.split("/"))
    except ValueError:
        raise DreamlabError(f"--shard {args.shard!r}: write K/N, e.g. 0/2") from None
    cfg = InstructDataConfig(out=args.out, data=args.data, n=args.n, seed=args.seed, steps=args.steps,
                             model=args.model, judge=args.judge, shard=(k, n))
    build_instruct_data(cfg)
    print(json.dumps(summary(cfg.out), indent=1))
    return 0


__all__ = ["Edit", "InstructDataConfig", "build_instruct_data", "draw_edits", "edit_catalog", "make_edit",
           "read_pairs", "summary", "tone_phrase"]
