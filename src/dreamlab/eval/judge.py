"""The judge: an emoji classifier trained on real images, standing in for Inception and CLIP.

Its penultimate features (256-d) give FID and KID; its top-1 / top-5 accuracy on images generated for
a prompt gives prompt alignment. Classes are base emoji (skin tones and styles of one emoji share a
class). Input: RGBA composited on white (what a viewer sees), 64x64. Augmented with small shifts,
scales and brightness changes so it judges generated images by content rather than by pixel
statistics of one renderer; no flips (they change meaning: arrows, hands).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..data.dataset import EmojiDataset
from ..errors import ModelNotFoundError
from ..train.common import Log, lr_at
from ..settings import JudgeConfig  # noqa: F401  (the configuration, kept torch-free)


def on_white(rgba: Tensor) -> Tensor:
    """(B, 4, H, W) in [-1, 1] -> (B, 3, H, W) in [-1, 1], composited over white."""
    rgb, a = rgba[:, :3], (rgba[:, 3:4] + 1) / 2
    return rgb * a + (1 - a)


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = None if stride == 1 and cin == cout else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.skip is None else self.skip(x)))


class Judge(nn.Module):
    """A small ResNet: 64x64 -> 32 (stem) -> 16 -> 8 -> 4 -> pooled features -> class logits."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128, 256)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Block(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)
        self.widths = widths

    def features(self, rgba: Tensor) -> Tensor:
        return self.blocks(self.stem(on_white(rgba))).mean(dim=(2, 3))

    def forward(self, rgba: Tensor) -> Tensor:
        return self.head(self.features(rgba))




def class_index(records: list[dict]) -> tuple[list[str], list[str]]:
    """Sorted base codes, and the label of each (the base emoji's own label, not a skin-tone variant's)."""
    labels = {r["base"]: r["label"] for r in records if r["unified"] == r["base"]}
    for r in records:
        labels.setdefault(r["base"], r["label"])
    bases = sorted(labels)
    return bases, [labels[b] for b in bases]


def augment(x: Tensor, g: torch.Generator) -> Tensor:
    """Random shift (up to 4 px), scale (0.85-1.1) and brightness, on RGBA in [-1, 1]."""
    B = x.shape[0]
    scale = torch.empty(B).uniform_(0.85, 1.1, generator=g)
    shift = torch.empty(B, 2).uniform_(-4 / 32, 4 / 32, generator=g)
    theta = torch.zeros(B, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # Transparent (alpha = -1) outside the image after the warp.
    x = F.grid_sample(x + torch.tensor([0, 0, 0, 1.0]).view(1, 4, 1, 1), grid, align_corners=False, padding_mode="zeros")
    x = x - torch.tensor([0, 0, 0, 1.0]).view(1, 4, 1, 1)
    bright = torch.empty(B, 1, 1, 1).uniform_(-0.1, 0.1, generator=g)
    return torch.cat([(x[:, :3] + bright).clamp(-1, 1), x[:, 3:]], dim=1)


def _tensor(ds: EmojiDataset) -> Tensor:
    idx = np.array([r["index"] for r in ds.records])
    return torch.from_numpy(np.asarray(ds.images[idx])).permute(0, 3, 1, 2).float().div_(127.5).sub_(1)


def train_judge(cfg: JudgeConfig) -> Path:
    from tqdm import tqdm

    torch.manual_seed(cfg.seed)
    out = Path(cfg.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    train, test = EmojiDataset(Path(cfg.data), split="train"), EmojiDataset(Path(cfg.data), split="test")
    bases, labels = class_index(train.records + test.records)
    pos = {b: i for i, b in enumerate(bases)}
    x_train, y_train = _tensor(train), torch.tensor([pos[r["base"]] for r in train.records])
    x_test, y_test = _tensor(test), torch.tensor([pos[r["base"]] for r in test.records])
    model = Judge(len(bases))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, len(x_train) // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    g = torch.Generator().manual_seed(cfg.seed)
    log = Log(out)
    step = 0
    log.rewind(step)  # the judge always trains from scratch
    for epoch in range(cfg.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"judge {epoch + 1}/{cfg.epochs}", leave=False)
        for k in bar:
            idx = perm[k * cfg.batch_size:(k + 1) * cfg.batch_size]
            for grp in opt.param_groups:
                grp["lr"] = lr_at(step, cfg.lr, steps_per_epoch, total, min_ratio=0.01)
            logits = model(augment(x_train[idx], g))
            loss = F.cross_entropy(logits, y_train[idx], label_smoothing=cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
        acc = evaluate_accuracy(model, x_test, y_test) if len(x_test) else {}
        log.write(step, loss=loss.item(), **{f"test_top{k}": v for k, v in acc.items()})
    log.plot(("loss",))
    save_judge(model, bases, labels, out, {"config": asdict(cfg), "test_accuracy": acc, "trained_at": time.time()})
    return out


@torch.no_grad()
def evaluate_accuracy(model: Judge, x: Tensor, y: Tensor, batch: int = 256) -> dict[int, float]:
    from .metrics import topk_accuracy

    model.eval()
    logits = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    return topk_accuracy(logits, y)


def save_judge(model: Judge, bases: list[str], labels: list[str], out: Path, info: dict) -> None:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "judge.safetensors"))
    (out / "judge.json").write_text(json.dumps({"widths": list(model.widths), "bases": bases, "labels": labels, **info}, indent=1))


def load_judge(folder: str | Path) -> tuple[Judge, list[str], list[str]]:
    folder = Path(folder)
    if not (folder / "judge.safetensors").exists():
        raise ModelNotFoundError(f"no judge at {folder}; train one with `dreamlab train judge`")
    meta = json.loads((folder / "judge.json").read_text())
    model = Judge(len(meta["bases"]), tuple(meta["widths"]))
    model.load_state_dict(load_file(str(folder / "judge.safetensors")))
    return model.eval(), meta["bases"], meta["labels"]


@torch.no_grad()
def judge_outputs(model: Judge, images: Tensor, batch: int = 256) -> tuple[Tensor, Tensor]:
    """(features (N, 256), logits (N, classes)) of RGBA images in [-1, 1]."""
    feats, logits = [], []
    for i in range(0, len(images), batch):
        f = model.features(images[i:i + batch])
        feats.append(f)
        logits.append(model.head(f))
    return torch.cat(feats), torch.cat(logits)
