"""LoRA files (Hu et al. 2021): read the diffusers/peft folder format and the kohya/A1111 single file,
write both, and turn one into a scoped weight patch of a model.

A LoRA is, per adapted module, a down matrix A (r x in), an up matrix B (out x r) and alpha; the module's
weight becomes W + scale * (alpha / r) * B @ A. dreamlab merges that delta into the request's view of the
model (:class:`~dreamlab.models.patches.WeightDelta`, undone bit for bit afterwards) rather than adding
branches to every layer: one request costs one weight update, and the network runs at full speed.

Formats:
- diffusers/peft (what ``dreamlab train lora`` writes, and diffusers' ``save_lora_weights`` /
  ``load_lora_weights`` read): a folder with ``pytorch_lora_weights.safetensors``, keys
  ``unet.<module>.lora_A.weight`` / ``lora_B.weight`` (and ``text_encoder.`` ...), alpha in the
  ``dreamlab_lora.json`` beside it (or the file's ``lora_adapter_metadata``), r when absent.
- kohya / A1111 (what people share): one ``.safetensors`` with ``lora_unet_<module with _>.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; ``lora_te_`` / ``lora_te1_`` for the text encoder. Module names are
  found by matching against the model's own module names, so any UNet with diffusers names works.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from ..errors import DreamlabError, InvalidRequestError

PEFT_FILE = "pytorch_lora_weights.safetensors"
META_FILE = "dreamlab_lora.json"
TARGETS = ("unet", "text_encoder")
_KOHYA_PREFIX = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder"}


@dataclass
class LoraLayer:
    down: Tensor  # (r, in) or (r, in, kh, kw)
    up: Tensor  # (out, r) or (out, r, 1, 1)
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> Tensor:
        """alpha / r * B @ A, shaped like the module's weight."""
        up, down = self.up.float(), self.down.float()
        d = up.flatten(1) @ down.flatten(1)
        if down.dim() == 4:
            d = d.reshape(up.shape[0], *down.shape[1:])
        return d * (self.alpha / self.rank)


@dataclass
class LoraWeights:
    """target ("unet", "text_encoder") -> module name (diffusers naming) -> layer."""

    layers: dict[str, dict[str, LoraLayer]]
    meta: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None

    def peft_state_dict(self) -> dict[str, Tensor]:
        return {f"{t}.{m}.lora_{ab}.weight": (l.down if ab == "A" else l.up).contiguous()
                for t, mods in self.layers.items() for m, l in mods.items() for ab in "AB"}

    def alphas(self) -> dict[str, float]:
        return {f"{t}.{m}": l.alpha for t, mods in self.layers.items() for m, l in mods.items()}


def target_module(view: Any, target: str) -> torch.nn.Module:
    """The network a target names in a model (bundle or view)."""
    if target == "unet":
        return view.unet
    enc = getattr(view, "text_encoder", None)
    if enc is None or not hasattr(enc, "model"):
        raise InvalidRequestError("this LoRA adapts a text encoder, and the model has no transformers text encoder")
    return enc.model


# --- reading -----------------------------------------------------------------------------------------


def read_lora(path: str | Path, *, allow_pickle: bool = False) -> LoraWeights:
    """A LoRA from a diffusers/peft folder (``dreamlab train lora --out``) or a kohya/A1111 file."""
    from ..loading.checkpoint import read_checkpoint

    p = Path(path).expanduser()
    if p.is_dir():
        files = [p / PEFT_FILE] if (p / PEFT_FILE).is_file() else sorted(p.glob("*.safetensors"))
        if not files:
            pickles = sorted(q.name for q in p.iterdir() if q.suffix in (".bin", ".pt", ".ckpt", ".pth"))
            if pickles and allow_pickle:
                files = [p / pickles[0]]
            elif pickles:
                raise DreamlabError(f"{p} holds only pickled LoRA weights ({', '.join(pickles)}); pickles can run code "
                                    "when loaded: use a .safetensors version, or pass --allow-pickle")
            else:
                raise DreamlabError(f"{p} holds no LoRA weights (expected {PEFT_FILE})")
        ckpt = read_checkpoint(files[0], allow_pickle=allow_pickle)
        meta = json.loads((p / META_FILE).read_text()) if (p / META_FILE).is_file() else {}
    elif p.is_file():
        ckpt = read_checkpoint(p, allow_pickle=allow_pickle)
        meta = {}
    else:
        raise DreamlabError(f"no LoRA at {p}")
    tensors, file_meta = ckpt.tensors, ckpt.metadata
    if "lora_adapter_metadata" in file_meta and not meta:
        try:
            meta = {"peft": json.loads(file_meta["lora_adapter_metadata"])}
        except ValueError:
            pass
    if any(k.startswith(tuple(_KOHYA_PREFIX)) for k in tensors):
        layers = _from_kohya(tensors, ckpt.path.name)
    else:
        layers = _from_peft(tensors, meta, ckpt.path.name)
    return LoraWeights(layers, meta, p)


def _from_peft(tensors: Mapping[str, Tensor], meta: dict, name: str) -> dict[str, dict[str, LoraLayer]]:
    alphas = meta.get("alphas", {})
    default_alpha = (meta.get("peft") or {}).get("lora_alpha")
    pairs: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        for ab in ("lora_A", "lora_B"):
            suffix = f".{ab}.weight"
            if key.endswith(suffix):
                target, _, module = key.removesuffix(suffix).partition(".")
                if target not in TARGETS:  # peft keys without the target prefix are the UNet's
                    target, module = "unet", key.removesuffix(suffix)
                pairs.setdefault((target, module), {})[ab] = t
                break
        else:
            raise DreamlabError(f"{name}: {key} is not a LoRA tensor (expected ...lora_A.weight / lora_B.weight)")
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (target, module), ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise DreamlabError(f"{name}: {target}.{module} has only {next(iter(ab))}")
        r = int(ab["lora_A"].shape[0])
        alpha = float(alphas.get(f"{target}.{module}", default_alpha if default_alpha is not None else r))
        layers.setdefault(target, {})[module] = LoraLayer(ab["lora_A"], ab["lora_B"], alpha)
    if not layers:
        raise DreamlabError(f"{name} holds no LoRA tensors")
    return layers


def _from_kohya(tensors: Mapping[str, Tensor], name: str) -> dict[str, dict[str, LoraLayer]]:
    """Kohya keys, module names still with underscores (resolved against a model by :func:`lora_deltas`)."""
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        stem, _, kind = key.partition(".")
        prefix = next((p for p in _KOHYA_PREFIX if stem.startswith(p)), None)
        if prefix is None or kind not in ("lora_down.weight", "lora_up.weight", "alpha"):
            if kind in ("hada_w1_a", "lokr_w1", "dora_scale") or "hada" in key or "lokr" in key:
                raise DreamlabError(f"{name}: {key} is a LyCORIS/DoRA tensor; only plain LoRA is supported")
            raise DreamlabError(f"{name}: {key} is not a kohya LoRA tensor")
        groups.setdefault((_KOHYA_PREFIX[prefix], stem.removeprefix(prefix)), {})[kind] = t
    layers: dict[str, dict[str, LoraLayer]] = {}
    for (target, stem), g in groups.items():
        if "lora_down.weight" not in g or "lora_up.weight" not in g:
            raise DreamlabError(f"{name}: {stem} lacks its lora_down or lora_up weight")
        down = g["lora_down.weight"]
        alpha = float(g["alpha"].item()) if "alpha" in g else float(down.shape[0])
        layers.setdefault(target, {})["_" + stem] = LoraLayer(down, g["lora_up.weight"], alpha)  # "_": unresolved
    return layers


# --- applying ----------------------------------------------------------------------------------------


def lora_deltas(lora: LoraWeights, view: Any) -> dict[str, dict[str, Tensor]]:
    """target -> parameter name -> delta, checked against ``view``'s networks: a module the model lacks, or
    of another shape, is named in a one-line error (a LoRA made for another architecture)."""
    out: dict[str, dict[str, Tensor]] = {}
    what = lora.source.name if lora.source else "the LoRA"
    for target, mods in lora.layers.items():
        net = target_module(view, target)
        modules = dict(net.named_modules())
        by_underscore = {n.replace(".", "_"): n for n in modules}
        deltas: dict[str, Tensor] = {}
        for module, layer in mods.items():
            name = by_underscore.get(module[1:]) if module.startswith("_") else module
            if name is None or name not in modules or not hasattr(modules[name], "weight"):
                raise InvalidRequestError(f"{what} was made for another architecture: the {target} has no module "
                                          f"{module.lstrip('_')}")
            weight = modules[name].weight
            delta = layer.delta()
            if delta.shape != weight.shape:
                raise InvalidRequestError(f"{what} was made for another architecture: {target} {name} is "
                                          f"{tuple(weight.shape)}, the LoRA's delta {tuple(delta.shape)}")
            deltas[f"{name}.weight"] = delta
        out[target] = deltas
    return out


# --- writing -----------------------------------------------------------------------------------------


def save_lora(lora: LoraWeights, folder: str | Path, meta: Mapping[str, Any] | None = None) -> Path:
    """The diffusers/peft folder: ``pytorch_lora_weights.safetensors`` (fp16) + ``dreamlab_lora.json``."""
    from safetensors.torch import save_file

    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in lora.peft_state_dict().items()}
    ranks = {layer.rank for mods in lora.layers.values() for layer in mods.values()}
    alphas = lora.alphas()
    info = {**(meta or lora.meta), "alphas": alphas, "ranks": sorted(ranks)}
    peft_meta = {"r": max(ranks), "lora_alpha": next(iter(alphas.values())),
                 "target_modules": sorted({m.rsplit(".", 1)[-1] for m in alphas})}
    save_file(tensors, str(folder / PEFT_FILE), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(peft_meta)})
    (folder / META_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return folder


def save_kohya(lora: LoraWeights, path: str | Path, view: Any | None = None) -> Path:
    """One kohya/A1111 ``.safetensors`` file (diffusers' ``convert_state_dict_to_kohya``, with each
    module's real alpha rather than its rank)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import save_file

    if any(m.startswith("_") for mods in lora.layers.values() for m in mods):
        if view is None:
            raise DreamlabError("this LoRA was read from a kohya file; give the model to resolve its module names")
        lora = resolved(lora, view)
    kohya = convert_state_dict_to_kohya(lora.peft_state_dict())
    for target, mods in lora.layers.items():
        prefix = "lora_unet_" if target == "unet" else "lora_te1_"  # diffusers' names for the two
        for module, layer in mods.items():
            kohya[f"{prefix}{module.replace('.', '_')}.alpha"] = torch.tensor(float(layer.alpha))
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in kohya.items()}, str(path),
              metadata={"ss_network_module": "networks.lora", **{f"dreamlab_{k}": str(v) for k, v in lora.meta.items()
                                                                   if isinstance(v, (str, int, float))}})
    return path


def resolved(lora: LoraWeights, view: Any) -> LoraWeights:
    """The LoRA with kohya's underscore names replaced by the model's module names."""
    layers: dict[str, dict[str, LoraLayer]] = {}
    for target, mods in lora.layers.items():
        by_underscore = {n.replace(".", "_"): n for n, _ in target_module(view, target).named_modules()}
        layers[target] = {}
        for module, layer in mods.items():
            name = by_underscore.get(module[1:]) if module.startswith("_") else module
            if name is None:
                raise InvalidRequestError(f"the {target} has no module {module.lstrip('_')}")
            layers[target][name] = layer
    return LoraWeights(layers, lora.meta, lora.source)
