"""Load a single-file Stable Diffusion checkpoint (SD 1.x, 2.x, SDXL base) into a :class:`ModelBundle`.

The file is read (``checkpoint.py``), its architecture detected from its tensor names and shapes
(``detect.py``), and each component converted to diffusers' names by diffusers' own single-file
conversion functions, then loaded strictly into a network built from a config: the configs bundled in
``dreamlab/configs/stable-diffusion/<arch>/`` (diffusers-format folders, so ``from_single_file(config=)``
takes them too) or a diffusers folder given as ``config``. The CLIP tokenizer is the one built from
open_clip's BPE vocabulary (``dreamlab/configs/clip-tokenizer/``). Nothing is fetched from a hub.

The prediction type is not in SD 2.x's weights; it is, in this order: the one asked for, the sidecar
``<name>.yaml`` (the original inference config's ``parameterization``), the file's
``modelspec.prediction_type`` metadata, a ``v_pred`` key (ComfyUI's mark), and otherwise diffusers'
guess: v-prediction for SD 2.x unless it was trained 875,000 steps (2.x-base), epsilon for the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import torch
from torch import Tensor

from ..core.prediction import Prediction
from ..core.schedules import DiscreteSchedule
from ..errors import CheckpointError, DreamlabError
from ..models.bundle import ModelBundle
from ..models.clip import ClipTextEncoder
from ..models.space import VAESpace
from .checkpoint import Checkpoint, read_checkpoint
from .detect import Architecture, Encoder, detect
from .files import sha256_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BUNDLED = CONFIGS / "stable-diffusion"
TOKENIZER = CONFIGS / "clip-tokenizer"
_PREDICTIONS = {"epsilon": Prediction.EPS, "eps": Prediction.EPS, "v": Prediction.V, "v_prediction": Prediction.V,
                "x0": Prediction.X0, "sample": Prediction.X0}


def parse_prediction(value: str | Prediction) -> Prediction:
    try:
        return value if isinstance(value, Prediction) else _PREDICTIONS[value.lower()]
    except KeyError:
        raise DreamlabError(f"unknown prediction type {value!r}; one of epsilon, v, x0") from None


@dataclass
class Components:
    """A checkpoint's networks in diffusers' classes, and what was decided about it."""

    checkpoint: Path
    arch: Architecture
    unet: torch.nn.Module
    vae: torch.nn.Module
    encoders: list[tuple[object, torch.nn.Module]]  # (tokenizer, text model), in the architecture's order
    scheduler: dict  # diffusers scheduler config, prediction_type set
    prediction: Prediction
    prediction_from: str  # what decided it, in words
    files: dict[str, str] = field(default_factory=dict)  # what it was made from -> sha256


def load_components(path: Path, *, allow_pickle: bool = False, prediction: str | Prediction | None = None,
                    config: str | Path | None = None, dtype: torch.dtype | None = None) -> Components:
    """``config``: a diffusers-format folder whose component configs (and tokenizers, if it has them) to use
    instead of the bundled ones, as diffusers' ``from_single_file(config=)``. ``dtype`` None keeps the
    file's."""
    c = convert_checkpoint(read_checkpoint(path, allow_pickle=allow_pickle), prediction=prediction, config=config,
                           dtype=dtype)
    sidecar = path.with_suffix(".yaml")  # hashed once the file has converted: a 7 GB file takes a while
    c.files = {path.name: sha256_file(path), **({sidecar.name: sha256_file(sidecar)} if sidecar.is_file() else {}), **c.files}
    return c


def convert_checkpoint(ckpt: Checkpoint, *, prediction: str | Prediction | None = None, config: str | Path | None = None,
                       dtype: torch.dtype | None = None) -> Components:
    """The networks of a checkpoint already read (its tensors may be on the meta device: shapes only)."""
    arch = detect(ckpt.shapes)
    pred, why = resolve_prediction(ckpt, arch, prediction)
    configs = Path(config) if config is not None else _bundled(arch, pred)
    files: dict[str, str] = {}

    def read(rel: str) -> dict:
        file = configs / rel
        if not file.is_file():
            raise DreamlabError(f"{configs} has no {rel} (a config folder is a diffusers-format model folder)")
        files[f"config/{rel}"] = sha256_file(file)
        return json.loads(file.read_text())

    unet = _unet(ckpt, read("unet/config.json"), dtype, arch)
    vae = _vae(ckpt, read("vae/config.json"), dtype, arch)
    encoders = [(_tokenizer(configs, spec, files), _text_model(ckpt, spec, read(f"{spec.folder}/config.json"), dtype, arch))
                for spec in arch.encoders]
    scheduler = {**read("scheduler/scheduler_config.json"), "prediction_type": pred.value}
    return Components(ckpt.path, arch, unet, vae, encoders, scheduler, pred, why, files)


def load_single_file(path: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                     allow_pickle: bool = False, prediction: str | Prediction | None = None,
                     config: str | Path | None = None) -> ModelBundle:
    c = load_components(path, allow_pickle=allow_pickle, prediction=prediction, config=config, dtype=dtype)
    space = VAESpace(c.vae.to(device))
    return ModelBundle(
        unet=c.unet.to(device).eval().requires_grad_(False),
        text_encoder=ClipTextEncoder(c.encoders, penultimate=c.arch.penultimate, device=device),
        space=space,
        schedule=DiscreteSchedule.from_diffusers_config(c.scheduler),
        prediction=c.prediction,
        sample_size=int(c.unet.config.sample_size) * space.factor,
        name=path.stem,
        source=str(path.resolve()),
        files=c.files,
    )


def resolve_prediction(ckpt: Checkpoint, arch: Architecture, given: str | Prediction | None) -> tuple[Prediction, str]:
    if given is not None:
        return parse_prediction(given), "given"
    sidecar = ckpt.path.with_suffix(".yaml")
    if sidecar.is_file():
        return _yaml_parameterization(sidecar), f"the sidecar {sidecar.name}"
    if "modelspec.prediction_type" in ckpt.metadata:
        return parse_prediction(ckpt.metadata["modelspec.prediction_type"]), "the file's modelspec.prediction_type"
    if "v_pred" in ckpt.tensors:
        return Prediction.V, "the file's v_pred key"
    if arch.name == "sd2":  # diffusers' guess (single_file_utils._legacy_load_scheduler)
        if ckpt.global_step == 875000:
            return Prediction.EPS, "875,000 training steps: a 2.x-base, as diffusers guesses"
        return Prediction.V, "diffusers' guess for SD 2.x without a hint: the 768-v models"
    return Prediction.EPS, "the family's default"


def _yaml_parameterization(file: Path) -> Prediction:
    """``model.params.parameterization`` of an original inference config (``v2-inference-v.yaml``: "v");
    the original trainers' default is eps."""
    import yaml

    try:
        params = ((yaml.safe_load(file.read_text()) or {}).get("model") or {}).get("params") or {}
        return _PREDICTIONS[str(params.get("parameterization", "eps"))]
    except (yaml.YAMLError, AttributeError, KeyError, OSError) as e:
        raise DreamlabError(f"cannot read the prediction type from {file.name}: {str(e).splitlines()[0]}") from None


def _bundled(arch: Architecture, prediction: Prediction) -> Path:
    """SD 2.x has two bundled configs: 2.x-base (epsilon, 512 px) and 768-v; the others one each."""
    v = BUNDLED / f"{arch.name}-v"
    return v if prediction == Prediction.V and v.is_dir() else BUNDLED / arch.name


def _tokenizer(configs: Path, spec: Encoder, files: dict[str, str]):
    from transformers import CLIPTokenizer

    folder = configs / spec.tokenizer_folder
    if folder.is_dir():
        files.update({f"config/{spec.tokenizer_folder}/{p.name}": sha256_file(p) for p in sorted(folder.iterdir()) if p.is_file()})
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    files.update({f"config/clip-tokenizer/{n}": sha256_file(TOKENIZER / n) for n in ("vocab.json", "merges.txt")})
    return CLIPTokenizer.from_pretrained(TOKENIZER, local_files_only=True, pad_token=spec.pad_token, model_max_length=77)


def _unet(ckpt: Checkpoint, config: dict, dtype, arch: Architecture):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    what = f"the UNet of this {arch.title} checkpoint"
    return _build(lambda: UNet2DConditionModel.from_config(config), _convert(convert_ldm_unet_checkpoint, ckpt, config, what),
                  dtype, what)


def _vae(ckpt: Checkpoint, config: dict, dtype, arch: Architecture):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    what = f"the autoencoder of this {arch.title} checkpoint"
    return _build(lambda: AutoencoderKL.from_config(config), _convert(convert_ldm_vae_checkpoint, ckpt, config, what),
                  dtype, what)


def _convert(fn, ckpt: Checkpoint, config: dict, what: str) -> dict[str, Tensor]:
    """diffusers' conversion of one component; it indexes the weights it needs and fails on one that is absent."""
    try:
        return {k: v for k, v in fn(ckpt.tensors, config).items() if v is not None}
    except (KeyError, IndexError) as e:
        raise CheckpointError(f"{what} lacks weights its config needs ({e})") from None


def _text_model(ckpt: Checkpoint, spec: Encoder, config: dict, dtype, arch: Architecture):
    import transformers
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    kind = (config.get("architectures") or ["CLIPTextModel"])[0]
    if kind not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        raise DreamlabError(f"{spec.folder}/config.json names {kind}; a CLIP text model is expected")
    cfg = transformers.CLIPTextConfig.from_dict(config)
    with _empty():
        model = getattr(transformers, kind)(cfg)
    mine = {k: v for k, v in ckpt.tensors.items() if k.startswith(spec.prefix)}
    if spec.layout == "clip":
        state = convert_ldm_clip_checkpoint(mine)
    else:
        state = convert_open_clip_checkpoint(model, mine, prefix=spec.prefix)
    wrapped = hasattr(model, "text_model")  # transformers 5 flattened CLIPTextModel; WithProjection still wraps
    state = {(k if wrapped else k.removeprefix("text_model.")): v for k, v in state.items()
             if not k.endswith("position_ids") and _used(k, model, int(cfg.num_hidden_layers))}
    return _build(lambda: model, state, dtype, f"text encoder {spec.prefix}* of this {arch.title} checkpoint")


def _used(key: str, model, layers: int) -> bool:
    """SD 2.x conditions on OpenCLIP's penultimate layer: the file's last layer, and its projection, go unused
    (diffusers drops them by name for ViT-H; here by the config's number of layers)."""
    layer = re.search(r"(?:^|\.)encoder\.layers\.(\d+)\.", key)
    if layer is not None:
        return int(layer[1]) < layers
    return key != "text_projection.weight" or hasattr(model, "text_projection")


def _empty():
    from accelerate import init_empty_weights

    return init_empty_weights()  # parameters on the meta device: nothing is initialised only to be overwritten


def _build(make: Callable[[], torch.nn.Module], state: Mapping[str, Tensor], dtype, what: str) -> torch.nn.Module:
    """A network from its config with exactly the given weights: every weight present, none left over."""
    with _empty():
        model = make()
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} weights missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"{len(wrong)} of another shape (e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)}, "
                 f"expected {tuple(expected[wrong[0]].shape)})" if wrong else ""]
        raise CheckpointError(f"{what} does not fit its config: {'; '.join(p for p in parts if p)}. A variant "
                              "architecture needs its own configs: `dreamlab convert --config DIR`")
    model.load_state_dict({k: v.to(dtype) if dtype is not None else v for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)
